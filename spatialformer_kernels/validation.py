"""Input checks for the public ops, run before any kernel launches.

Every error names the argument and the offending shapes, dtypes or devices.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256


def _check_tensors(named: Sequence[tuple[str, object]]) -> None:
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, L, D], got shape {tuple(value.shape)}")
    first_name, first = named[0]
    for name, value in named[1:]:
        if value.dtype != first.dtype:
            raise TypeError(
                f"all inputs must share one dtype: {first_name} is {first.dtype} but {name} is {value.dtype}"
            )
        if value.device != first.device:
            raise ValueError(
                f"all inputs must be on one device: {first_name} is on {first.device} "
                f"but {name} is on {value.device}"
            )
    if first.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{first_name} has dtype {first.dtype}; supported dtypes are {names}")


def _check_batch_heads_dim(named: Sequence[tuple[str, torch.Tensor]], same_length: Sequence[Sequence[str]]) -> None:
    """All inputs share B, H and D. When they do not, and reading some of them as [B, L, H, D]
    makes every input agree (same B, H, D, and the same token count within each group of
    `same_length`), the message names those tensors and suggests `.transpose(1, 2)`; otherwise
    it blames the tensor outside the (B, H, D) that most inputs share."""
    def bhd(t, swapped=False):
        return (t.shape[0], t.shape[2 if swapped else 1], t.shape[3])

    if all(bhd(t) == bhd(named[0][1]) for _, t in named):
        return
    tensors = dict(named)
    fewest_swaps = None
    for expected in dict.fromkeys(bhd(t, swapped) for _, t in named for swapped in (False, True)):
        if not all(expected in (bhd(t), bhd(t, True)) for _, t in named):
            continue
        swapped = {name: bhd(t) != expected for name, t in named}
        lengths_agree = all(
            len({tensors[name].shape[1 if swapped[name] else 2] for name in group}) == 1 for group in same_length
        )
        if lengths_agree and (fewest_swaps is None or sum(swapped.values()) < sum(fewest_swaps[1].values())):
            fewest_swaps = (expected, swapped)
    if fewest_swaps is not None:
        expected, swapped = fewest_swaps
        names = [name for name, _ in named if swapped[name]]
        shapes = ", ".join(f"{name} {tuple(tensors[name].shape)}" for name in names)
        raise ValueError(
            f"{shapes}: expected [B, H, L, D] with (B, H, D) = {expected}, but the H and L axes look swapped "
            f"(a [B, L, H, D] tensor); pass {names[0]}.transpose(1, 2), a view without a copy"
        )
    counts = {}
    for _, t in named:
        counts[bhd(t)] = counts.get(bhd(t), 0) + 1
    expected = max(counts, key=counts.get)  # ties: the first input's
    name, value = next((name, t) for name, t in named if bhd(t) != expected)
    agreeing = next(f"{other} {tuple(t.shape)}" for other, t in named if bhd(t) == expected)
    raise ValueError(f"[B, H, *, D] of {name} {tuple(value.shape)} does not match {agreeing}")


def _check_same_dims(named: Sequence[tuple[str, torch.Tensor]], dims: Sequence[int], what: str) -> None:
    first_name, first = named[0]
    for name, value in named[1:]:
        if any(value.shape[d] != first.shape[d] for d in dims):
            raise ValueError(
                f"{what} of {name} {tuple(value.shape)} does not match {first_name} {tuple(first.shape)}"
            )


def _check_head_dim(name: str, tensor: torch.Tensor) -> None:
    head_dim = tensor.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D of {name} {tuple(tensor.shape)} is {head_dim}; "
            f"supported range is {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
        )


def _check_bool_tensor(name: str, mask: torch.Tensor, true_means: str) -> None:
    """The type checks every optional boolean mask shares (its shape and device are the caller's)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = {true_means}), got {mask.dtype}")


def _check_mask(mask_name: str, mask: Optional[torch.Tensor], keys_name: str, keys: torch.Tensor) -> None:
    if mask is None:
        return
    _check_bool_tensor(mask_name, mask, "real token")
    expected = (keys.shape[0], keys.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{mask_name} must have shape [B, N] = {list(expected)} to match {keys_name} "
            f"{tuple(keys.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != keys.device:
        raise ValueError(f"{mask_name} is on {mask.device} but {keys_name} is on {keys.device}")


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """Return the softmax scale: `scale`, or D**-0.5 when it is None."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _plainly_valid(groups, mask, mask_length_dim) -> bool:
    """The common case, checked in one pass (the launch path's host cost matters at small
    shapes): tensors of rank 4 with one dtype (supported) and device, the shapes equal within
    each group and sharing B, H and D across groups, D in range, and the mask absent or a bool
    [B, L] on that device (L = the first group's dim `mask_length_dim` of its last group). False
    sends the inputs through the checks that explain what is wrong."""
    first = groups[0][0]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        return False
    dtype, device = first.dtype, first.device
    batch, heads, _, head_dim = first.shape
    if dtype not in SUPPORTED_DTYPES or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return False
    for group in groups:
        shape = group[0].shape if isinstance(group[0], torch.Tensor) else None
        if shape is None or len(shape) != 4 or shape[0] != batch or shape[1] != heads or shape[3] != head_dim:
            return False
        for t in group:
            if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype or t.device != device:
                return False
    if mask is None:
        return True
    keys = groups[-1][0]
    return (
        isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device == device
        and tuple(mask.shape) == (batch, keys.shape[mask_length_dim])
    )


def validate_bilateral(q_s, k_s, v_s, q_x, k_x, v_x, image_mask) -> None:
    """Check the inputs of `bilateral_attention` (see its docstring for shapes)."""
    if _plainly_valid(((q_s, k_s, v_s), (q_x, k_x, v_x)), image_mask, 2):
        return
    spatial = [("q_s", q_s), ("k_s", k_s), ("v_s", v_s)]
    image = [("q_x", q_x), ("k_x", k_x), ("v_x", v_x)]
    _check_tensors(spatial + image)
    _check_batch_heads_dim(spatial + image, [[n for n, _ in spatial], [n for n, _ in image]])
    _check_same_dims(spatial, (2,), "spatial token count M")
    _check_same_dims(image, (2,), "image token count N")
    _check_head_dim("q_s", q_s)
    _check_mask("image_mask", image_mask, "k_x", k_x)


def _check_attn_mask(attn_mask: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> None:
    if attn_mask is None:
        return
    _check_bool_tensor("attn_mask", attn_mask, "attend")
    expected = (q.shape[0], q.shape[2], k.shape[2])
    if tuple(attn_mask.shape) != expected:
        shape, hint = tuple(attn_mask.shape), ""
        if len(shape) == 4 and shape[1] == 1 and (shape[0], *shape[2:]) == expected:
            hint = "; the mask is shared by every head: pass attn_mask[:, 0], a view without a copy"
        elif len(shape) == 3 and q.shape[1] > 1 and shape == (q.shape[0] * q.shape[1], *expected[1:]):
            hint = " ([B * H, Lq, Lk], as nn.MultiheadAttention takes it); one mask serves every head"
        raise ValueError(
            f"attn_mask must have shape [B, Lq, Lk] = {list(expected)} to match q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}, got {tuple(attn_mask.shape)}{hint}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")


def validate_cross(q, k, v, key_mask, attn_mask=None) -> None:
    """Check the inputs of `cross_attention` (see its docstring for shapes)."""
    if _plainly_valid(((q,), (k, v)), key_mask, 2):
        _check_attn_mask(attn_mask, q, k)
        return
    named = [("q", q), ("k", k), ("v", v)]
    _check_tensors(named)
    _check_batch_heads_dim(named, [["k", "v"]])
    _check_same_dims(named[1:], (2,), "key count")
    _check_head_dim("q", q)
    _check_mask("key_mask", key_mask, "k", k)
    _check_attn_mask(attn_mask, q, k)
