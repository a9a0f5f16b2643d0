"""Single-direction cross-attention: op registration, autograd and the public function.

Used by the sequential BCA block (spatial tokens attend to the image, then the image
attends to the updated spatial tokens). Both shapes are served by the same kernels: few
queries over many keys (split over the keys) and many queries over few keys.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch
from ..reference import cross_attention_reference
from ..validation import resolve_scale, validate_cross


# attn_mask comes last, with a default, so calls written before it existed (TorchScript models
# calling torch.ops.spatialformer.cross_attention positionally) keep working.
@torch.library.custom_op("spatialformer::cross_attention", mutates_args=())
def _cross_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    key_mask: Optional[Tensor],
    backend: str,
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    return dispatch.op_kernels(backend, q, k).cross_fwd(q, k, v, scale, key_mask, attn_mask)


@_cross_attention_op.register_fake
def _(q, k, v, scale, key_mask, backend, attn_mask=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float64)


@torch.library.custom_op("spatialformer::cross_attention_backward", mutates_args=())
def _cross_attention_backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    scale: float,
    key_mask: Optional[Tensor],
    backend: str,
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.op_kernels(backend, q, k).cross_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask)


@_cross_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale, key_mask, backend, attn_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, key_mask, backend, attn_mask = inputs  # the op passes its defaulted attn_mask too
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_mask, attn_mask)
    ctx.scale, ctx.backend = scale, backend


def _input_grads(ctx, do, direct: bool):
    """(dq, dk, dv) from the saved tensors. direct: call the backend's kernel instead of the
    registered backward op, unless autograd is recording (create_graph), where the op refuses a
    second derivative."""
    q, k, v, o, lse, key_mask, attn_mask = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    if direct and not torch.is_grad_enabled():
        return dispatch.kernels(ctx.backend).cross_bwd(do, q, k, v, o, lse, ctx.scale, key_mask, attn_mask)
    return _cross_attention_backward_op(do, q, k, v, o, lse, ctx.scale, key_mask, ctx.backend, attn_mask)


def _backward(ctx, do, _dlse):
    return (*_input_grads(ctx, do, direct=False), None, None, None, None)


_cross_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCross(torch.autograd.Function):
    """Eager training calls (dispatch.eager_call_ok): the op's forward and backward kernels
    without the torch.library layers, saving what the op saves (`_setup_context`)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, key_mask, backend, attn_mask):
        outputs = dispatch.kernels(backend).cross_fwd(q, k, v, scale, key_mask, attn_mask)
        _setup_context(ctx, (q, k, v, scale, key_mask, backend, attn_mask), outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, do):
        return (*_input_grads(ctx, do, direct=True), None, None, None, None)


# FLOP counts for torch.utils.flop_counter: q@k^T and p@v forward; five matmuls backward.
@register_flop_formula(torch.ops.spatialformer.cross_attention)
def _forward_flops(q_shape, k_shape, *args, **kwargs) -> int:
    batch, heads, n_queries, head_dim = q_shape
    return 2 * (2 * batch * heads * n_queries * k_shape[2] * head_dim)


@register_flop_formula(torch.ops.spatialformer.cross_attention_backward)
def _backward_flops(do_shape, q_shape, k_shape, *args, **kwargs) -> int:
    batch, heads, n_queries, head_dim = do_shape
    return 5 * (2 * batch * heads * n_queries * k_shape[2] * head_dim)


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    key_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of q [B, H, Lq, D] over k, v [B, H, Lk, D] -> [B, H, Lq, D], any strides.

    o = softmax(scale * q @ k^T, masked keys removed) @ v. scale defaults to D**-0.5.
    key_mask: optional bool [B, Lk], True = the key takes part (padding, for every query).
    attn_mask: optional bool [B, Lq, Lk], True = query i attends to key j, the same for every
    head; any strides, so a broadcast view (e.g. `m[:, None, :].expand(B, Lq, Lk)`) costs no
    memory, and the kernels never materialise more than the mask itself (Mask2Former's
    masked cross-attention: each object query restricted to its previous mask). A key takes
    part where both masks keep it; a query row with no kept key gets zeros and zero
    gradients. backend as in `bilateral_attention`.

    Example:
        >>> q = torch.randn(2, 2, 64, 32); k = v = torch.randn(2, 2, 3136, 32)
        >>> o = cross_attention(q, k, v)  # [2, 2, 64, 32]
        >>> o = cross_attention(q, k, v, attn_mask=torch.rand(2, 64, 3136) < 0.3)
    """
    validate_cross(q, k, v, key_mask, attn_mask)
    scale = resolve_scale(scale, q.shape[-1])
    name = dispatch.resolve_backend(backend, q.device, q.dtype)
    if name == "reference" or q.numel() == 0 or k.numel() == 0:
        return cross_attention_reference(q, k, v, scale, key_mask, attn_mask=attn_mask)
    if not dispatch.eager_call_ok(q, k, v, key_mask, attn_mask):  # tracing, a mode or a transform: the op
        return _cross_attention_op(q, k, v, scale, key_mask, name, attn_mask)[0]
    if dispatch.needs_autograd(q, k, v):  # eager training
        return _EagerCross.apply(q, k, v, scale, key_mask, name, attn_mask)
    return dispatch.kernels(name).cross_fwd(q, k, v, scale, key_mask, attn_mask)[0]  # eager inference
