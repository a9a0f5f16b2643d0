"""Triton kernel backend: the four functions of the contract in dispatch.py.

The kernels and launchers live in fused.py (and wide.py); this facade maps the
bilateral op onto both directions and cross_attention onto one of them, picked by shape:
few queries over many keys (Lq <= Lk) is direction s (split over the keys, merged by the
combine step), many queries over few keys is direction x (a complete softmax per query tile).
"""
from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_fused = None
_run = None


def _kernels():
    """fused.py, imported on first use (it defines the Triton kernels) and kept."""
    global _fused, _run
    if _fused is None:
        from . import fused
        from .launch import run

        _fused, _run = fused, run
    return _fused


# The launchers behind the four functions, positional: launch.run keeps a plan of each one's
# allocations and launches per call signature.
def _bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask):
    return _fused.attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask=image_mask)


def _bilateral_bwd(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask):
    return _fused.attention_bwd(
        do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask=image_mask
    )


def _cross_s_fwd(q, k, v, scale, key_mask, attn_mask):
    # q_s = q, k_x = k, v_x = v; q_x only gives N (= Lk) and k_s, v_s only M: never read.
    o, _, lse, _ = _fused.attention_fwd(q, q, q, k, k, v, scale, image_mask=key_mask, run_x=False,
                                        pair_mask=attn_mask)
    return o, lse


def _cross_x_fwd(q, k, v, scale, key_mask, attn_mask):
    # q_x = q, k_s = k, v_s = v; q_s only gives M (= Lk) and k_x, v_x only N: never read.
    _, o, _, lse = _fused.attention_fwd(k, k, v, q, q, q, scale, spatial_mask=key_mask, run_s=False,
                                        pair_mask=attn_mask)
    return o, lse


def _cross_s_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask):
    dq, _, _, _, dk, dv = _fused.attention_bwd(
        do, None, q, q, q, k, k, v, o, None, lse, None, scale, image_mask=key_mask, run_x=False,
        pair_mask=attn_mask,
    )
    return dq, dk, dv


def _cross_x_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask):
    _, dk, dv, dq, _, _ = _fused.attention_bwd(
        None, do, k, k, v, q, q, q, None, o, None, lse, scale, spatial_mask=key_mask, run_s=False,
        pair_mask=attn_mask,
    )
    return dq, dk, dv


def bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask):
    """-> (o_s [B, H, M, D], o_x [B, H, N, D], lse_s [B, H, M], lse_x [B, H, N])."""
    _kernels()
    return _run(_bilateral_fwd, (q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask))


def bilateral_bwd(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask):
    """-> (dq_s, dk_s, dv_s, dq_x, dk_x, dv_x), shaped like the inputs."""
    _kernels()
    return _run(_bilateral_bwd, (do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask))


def queries_on_spatial_side(q: torch.Tensor, k: torch.Tensor) -> bool:
    """cross_attention path: True = direction s (queries are the short side)."""
    return q.shape[2] <= k.shape[2]


def cross_fwd(q, k, v, scale, key_mask, attn_mask):
    """q [B, H, Lq, D] over k, v [B, H, Lk, D] -> (o [B, H, Lq, D], lse [B, H, Lq]); attn_mask
    bool [B, Lq, Lk] (queries first in either direction) or None."""
    _kernels()
    launcher = _cross_s_fwd if queries_on_spatial_side(q, k) else _cross_x_fwd
    return _run(launcher, (q, k, v, scale, key_mask, attn_mask))


def cross_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask):
    """-> (dq, dk, dv), shaped like q, k, v."""
    _kernels()
    launcher = _cross_s_bwd if queries_on_spatial_side(q, k) else _cross_x_bwd
    return _run(launcher, (do, q, k, v, o, lse, scale, key_mask, attn_mask))
