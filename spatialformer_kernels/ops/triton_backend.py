"""Triton kernels (placeholder until the fused kernels land)."""
DTYPES = ()


def is_available() -> bool:
    return False
