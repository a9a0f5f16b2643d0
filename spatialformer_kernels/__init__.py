"""spatialformer-kernels: fused bilateral cross-attention for SpatialFormer.

    >>> import torch, spatialformer_kernels as sk
    >>> q_s = k_s = v_s = torch.randn(2, 2, 64, 32)
    >>> q_x = k_x = v_x = torch.randn(2, 2, 3136, 32)
    >>> o_s, o_x = sk.bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x)
"""
from .dispatch import available_backends, runnable_backends
from .ops.bilateral_attention import bilateral_attention
from .ops.cross_attention import cross_attention

__version__ = "0.1.0"
__all__ = ["available_backends", "runnable_backends", "bilateral_attention", "cross_attention", "__version__"]
