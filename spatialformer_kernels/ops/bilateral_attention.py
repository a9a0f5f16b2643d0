"""Bilateral cross-attention: op registration, autograd and the public function.

The fused kernels live with their backends (spatialformer_kernels/backends/: Triton for CUDA,
the C++ kernel for CPU), chosen in dispatch.py; this file registers them once as
`torch.ops.spatialformer.bilateral_attention` (+ `_backward`) with fake implementations
and autograd, so torch.compile(fullgraph=True) traces the op as a single node. Eager calls
that need none of that (no tracing, no dispatch mode, no functorch transform) call the
backend's kernels directly, through a plain torch.autograd.Function when autograd records
the call: see dispatch.eager_call_ok.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch
from ..reference import bilateral_attention_reference
from ..validation import resolve_scale, validate_bilateral


@torch.library.custom_op("spatialformer::bilateral_attention", mutates_args=())
def _bilateral_attention_op(
    q_s: Tensor,
    k_s: Tensor,
    v_s: Tensor,
    q_x: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    scale: float,
    image_mask: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.op_kernels(backend, q_s, q_x).bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask)


@_bilateral_attention_op.register_fake
def _(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, backend):
    batch, heads, n_spatial, _ = q_s.shape
    n_image = q_x.shape[2]
    return (
        q_s.new_empty(q_s.shape),
        q_x.new_empty(q_x.shape),
        q_s.new_empty((batch, heads, n_spatial), dtype=torch.float64),
        q_x.new_empty((batch, heads, n_image), dtype=torch.float64),
    )


@torch.library.custom_op("spatialformer::bilateral_attention_backward", mutates_args=())
def _bilateral_attention_backward_op(
    do_s: Tensor,
    do_x: Tensor,
    q_s: Tensor,
    k_s: Tensor,
    v_s: Tensor,
    q_x: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    o_s: Tensor,
    o_x: Tensor,
    lse_s: Tensor,
    lse_x: Tensor,
    scale: float,
    image_mask: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return dispatch.op_kernels(backend, q_s, q_x).bilateral_bwd(
        do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask
    )


@_bilateral_attention_backward_op.register_fake
def _(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask, backend):
    return tuple(t.new_empty(t.shape) for t in (q_s, k_s, v_s, q_x, k_x, v_x))


def _setup_context(ctx, inputs, output):
    q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, backend = inputs
    o_s, o_x, lse_s, lse_x = output
    ctx.save_for_backward(q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, image_mask)
    ctx.scale, ctx.backend = scale, backend


def _input_grads(ctx, do_s, do_x, direct: bool):
    """The six input gradients from the saved tensors. direct: call the backend's kernel instead
    of the registered backward op, unless autograd is recording (create_graph), where the op
    refuses a second derivative."""
    q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, image_mask = ctx.saved_tensors
    do_s = torch.zeros_like(o_s) if do_s is None else do_s
    do_x = torch.zeros_like(o_x) if do_x is None else do_x
    args = (do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, ctx.scale, image_mask)
    if direct and not torch.is_grad_enabled():
        return dispatch.kernels(ctx.backend).bilateral_bwd(*args)
    return _bilateral_attention_backward_op(*args, ctx.backend)


def _backward(ctx, do_s, do_x, _dlse_s, _dlse_x):
    return (*_input_grads(ctx, do_s, do_x, direct=False), None, None, None)


_bilateral_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBilateral(torch.autograd.Function):
    """Eager training calls (dispatch.eager_call_ok): the op's forward and backward kernels
    without the torch.library layers, saving what the op saves (`_setup_context`)."""

    @staticmethod
    def forward(ctx, q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, backend):
        outputs = dispatch.kernels(backend).bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask)
        _setup_context(ctx, (q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, backend), outputs)
        return outputs[:2]

    @staticmethod
    def backward(ctx, do_s, do_x):
        return (*_input_grads(ctx, do_s, do_x, direct=True), None, None, None)


# FLOP counts for torch.utils.flop_counter: per direction q@k^T and p@v (2 matmuls) forward,
# five matmuls backward (recomputed logits, dv, dp, dq, dk).
@register_flop_formula(torch.ops.spatialformer.bilateral_attention)
def _forward_flops(q_s_shape, k_s_shape, v_s_shape, q_x_shape, *args, **kwargs) -> int:
    batch, heads, n_spatial, head_dim = q_s_shape
    return 2 * 2 * (2 * batch * heads * n_spatial * q_x_shape[2] * head_dim)


@register_flop_formula(torch.ops.spatialformer.bilateral_attention_backward)
def _backward_flops(do_s_shape, do_x_shape, *args, **kwargs) -> int:
    batch, heads, n_spatial, head_dim = do_s_shape
    return 2 * 5 * (2 * batch * heads * n_spatial * do_x_shape[2] * head_dim)


def bilateral_attention(
    q_s: Tensor,
    k_s: Tensor,
    v_s: Tensor,
    q_x: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    *,
    scale: Optional[float] = None,
    image_mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Bilateral cross-attention between M spatial tokens and N image tokens, both directions.

    q_s, k_s, v_s: [B, H, M, D]; q_x, k_x, v_x: [B, H, N, D]; any strides.
    Returns (o_s [B, H, M, D], o_x [B, H, N, D]) in the input dtype:

        o_s = softmax(scale * q_s @ k_x^T, image_mask on the N axis) @ v_x
        o_x = softmax(scale * q_x @ k_s^T) @ v_s

    scale defaults to D**-0.5. image_mask: optional bool [B, N], True = real token; a
    sample with no real token gets o_s = 0 and zero gradients. backend: "auto",
    "reference", "triton" or "cpu" (see `available_backends()`).

    Example:
        >>> q_s = k_s = v_s = torch.randn(2, 2, 64, 32)
        >>> q_x = k_x = v_x = torch.randn(2, 2, 3136, 32)
        >>> o_s, o_x = bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x)
    """
    validate_bilateral(q_s, k_s, v_s, q_x, k_x, v_x, image_mask)
    scale = resolve_scale(scale, q_s.shape[-1])
    name = dispatch.resolve_backend(backend, q_s.device, q_s.dtype)
    if name == "reference" or q_s.numel() == 0 or q_x.numel() == 0:
        # Empty inputs never launch a kernel; the reference returns correctly shaped zeros.
        return bilateral_attention_reference(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask)
    tensors = (q_s, k_s, v_s, q_x, k_x, v_x, image_mask)
    if not dispatch.eager_call_ok(*tensors):  # tracing, a mode or a transform: the registered op
        o_s, o_x, _, _ = _bilateral_attention_op(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, name)
    elif dispatch.needs_autograd(*tensors):  # eager training
        o_s, o_x = _EagerBilateral.apply(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, name)
    else:  # eager inference
        o_s, o_x, _, _ = dispatch.kernels(name).bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask)
    return o_s, o_x
