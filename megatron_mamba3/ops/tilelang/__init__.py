"""TileLang CUDA kernels for the Mamba-3 scan (SISO and MIMO); `backend.BACKEND` registers them.

Importing this package needs neither TileLang nor CUDA: kernels are built on first use.
"""
