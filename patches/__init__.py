"""Pinned, explicit, fail-closed changes to Megatron-Core; installed as `megatron_mamba3.patches`.

Empty until a missing seam needs one (see shared MEGATRON_NOTES: the final-norm seam and the CPU
redirections come with the hybrid-model issue).
"""
