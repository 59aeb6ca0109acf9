"""megatron-mamba3: the Mamba-3 mixer for Megatron-Core hybrid models."""

from setuptools import find_packages, setup

setup(
    name="megatron-mamba3",
    version="0.1.0",
    description="Mamba-3 mixer (SISO and MIMO) for Megatron-Core hybrid models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=[
        *find_packages(include=["megatron_mamba3", "megatron_mamba3.*"]),
        "megatron_mamba3.layer_specs",
        "megatron_mamba3.patches",
    ],
    # The top-level layer_specs/ and patches/ folders install inside megatron_mamba3, so their
    # import names cannot collide with other distributions.
    package_dir={
        "megatron_mamba3.layer_specs": "layer_specs",
        "megatron_mamba3.patches": "patches",
    },
    install_requires=["torch==2.9.0", "megatron-core==0.19.2", "psutil"],  # psutil: Megatron's dist-checkpoint writer
    extras_require={
        # torch_xla's scan backward under SPMD lowers through jax (its [pallas] extra) and torchax,
        # which imports flax; flax 0.12.0 is the newest that keeps torch_xla 2.9's jax 0.7.1.
        # tilelang: tests/unit/test_tilelang_smem.py lowers the kernels on the CPU.
        "test": ["pytest", "numpy", "torch_xla[pallas]==2.9.0", "flax==0.12.0", "tilelang==0.1.15"],
        "tpu": ["torch_xla[tpu,pallas]==2.9.0", "flax==0.12.0"],
        "te": ["transformer-engine"],
        "gpu": ["tilelang==0.1.15"],
    },
)
