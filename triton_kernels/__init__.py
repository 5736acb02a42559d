"""Triton kernels of unilora_kernels (installed as ``unilora_kernels.triton_kernels``)."""
