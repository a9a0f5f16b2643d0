"""The one pure-PyTorch reference for bilateral and cross attention.

Tests, benchmarks and the `backend="reference"` path all use these functions. The last four
(`bilateral_fwd`, `bilateral_bwd`, `cross_fwd`, `cross_bwd`) put the reference behind the
backend contract of dispatch.py, for the registered ops when they are called with backend
"reference" (or "auto" where no kernel runs), e.g. from a TorchScript model. They are
plain differentiable PyTorch, materialise the [B, H, Lq, Lk] logits and follow the exact
semantics of docs/design.md section 1:

    o = softmax(scale * q @ k^T, masked keys removed) @ v

A query row whose keys are all masked out gets o = 0 and zero gradients (never NaN); its
log-sum-exp is -inf.
"""
from __future__ import annotations

from typing import Optional

import torch


def cross_attention_reference_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: Optional[torch.Tensor] = None,
    upcast: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, Lq, D] over k, v [B, H, Lk, D]; returns (o [B, H, Lq, D], lse [B, H, Lq]).

    key_mask: optional bool [B, Lk], True = the key takes part. attn_mask: optional bool
    [B, Lq, Lk] (broadcast over heads), True = the query attends to the key; a key takes part
    for a query where both masks keep it. upcast=True computes in
    float32 for float16/bfloat16 inputs. o is in the input dtype; lse is float64 for every
    input dtype (the kernels' contract: a float32 LSE is off by up to 5e-4 at |logits| ~ 1e4,
    too coarse to recompute P from).
    """
    out_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    logits = _masked_logits(torch.matmul(q, k.transpose(-1, -2)) * scale, key_mask, attn_mask)
    row_max = logits.amax(dim=-1, keepdim=True) if logits.shape[-1] > 0 else logits.new_zeros(*logits.shape[:-1], 1)
    # A row with no kept key has max -inf; shifting by 0 instead keeps exp(-inf) = 0 and no NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(logits - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    out = torch.matmul(probs, v).to(out_dtype)
    lse = (torch.log(row_sum.double()) + row_max.double()).squeeze(-1)
    return out, lse


def _masked_logits(logits, key_mask, attn_mask):
    """logits [B, H, Lq, Lk] with -inf where key_mask [B, Lk] or attn_mask [B, Lq, Lk] drops a key."""
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask[:, None, :, :], float("-inf"))
    return logits


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: Optional[torch.Tensor] = None,
    upcast: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of q [B, H, Lq, D] over k, v [B, H, Lk, D] -> [B, H, Lq, D]."""
    return cross_attention_reference_with_lse(q, k, v, scale, key_mask, upcast, attn_mask)[0]


def bilateral_attention_reference(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    scale: float,
    image_mask: Optional[torch.Tensor] = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of bilateral cross-attention; returns (o_s [B, H, M, D], o_x [B, H, N, D]).

    o_s: spatial queries q_s over image keys/values k_x, v_x (image_mask [B, N] drops keys).
    o_x: image queries q_x over spatial keys/values k_s, v_s.
    """
    o_s = cross_attention_reference(q_s, k_x, v_x, scale, image_mask, upcast)
    o_x = cross_attention_reference(q_x, k_s, v_s, scale, None, upcast)
    return o_s, o_x


# ----------------------------------------------------------------------------------------
# The reference behind the backend contract (dispatch.py)
# ----------------------------------------------------------------------------------------
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cross_fwd(q, k, v, scale, key_mask, attn_mask):
    """-> (o [B, H, Lq, D], lse [B, H, Lq] float64)."""
    return cross_attention_reference_with_lse(q, k, v, scale, key_mask, attn_mask=attn_mask)


def cross_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask):
    """-> (dq, dk, dv): the softmax backward written out (a registered op runs below autograd,
    so it cannot differentiate the reference), P recomputed from the saved LSE, delta as
    rowsum(P * dP) as PyTorch's softmax backward forms it; 16-bit inputs computed in float32."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q_, k_, v_, do_ = (t.to(work) for t in (q, k, v, do))
    logits = _masked_logits(torch.matmul(q_, k_.transpose(-1, -2)) * scale, key_mask, attn_mask)
    has_key = torch.isfinite(lse)[..., None]  # a row with no kept key: P = 0, zero gradients
    p = torch.where(has_key, torch.exp(logits - torch.where(has_key, lse[..., None], 0).to(work)), 0)
    dp = torch.matmul(do_, v_.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True)) * scale
    dq = torch.matmul(ds, k_)
    dk = torch.matmul(ds.transpose(-1, -2), q_)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask):
    """-> (o_s, o_x, lse_s, lse_x)."""
    o_s, lse_s = cross_fwd(q_s, k_x, v_x, scale, image_mask, None)
    o_x, lse_x = cross_fwd(q_x, k_s, v_s, scale, None, None)
    return o_s, o_x, lse_s, lse_x


def bilateral_bwd(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask):
    """-> (dq_s, dk_s, dv_s, dq_x, dk_x, dv_x)."""
    dq_s, dk_x, dv_x = cross_bwd(do_s, q_s, k_x, v_x, o_s, lse_s, scale, image_mask, None)
    dq_x, dk_s, dv_s = cross_bwd(do_x, q_x, k_s, v_s, o_x, lse_x, scale, None, None)
    return dq_s, dk_s, dv_s, dq_x, dk_x, dv_x
