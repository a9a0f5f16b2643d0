"""SpatialFormer layers: spatial tokens, bilateral cross-attention (BCA) and joint self-attention.

Token layouts: spatial tokens s are [B, M, C] (M = 64, an 8x8 grid), image tokens x are
[B, N, C]. Attention layers project to per-head tensors [B, H, L, D] as strided views of
the fused qkv projection (no copy), which every kernel backend reads in place.

The block internals are not published with the paper; these are our documented choices
(docs/design.md section 3): pre-norm, per-stream q/k/v projections, MLP ratio 4, qkv bias.

timm conventions: the layers script with torch.jit.script and trace with torch.fx. The
attention calls go through the small functions `_bilateral_heads`, `_cross_heads` and
`_joint_heads`, which are FX leaves (torch.fx.wrap, and timm's no-trace registry) so a traced
graph still picks the kernels at call time; BilateralCrossAttention is a leaf module for
timm's FX feature extraction. Scripted, they cannot call the Python dispatch: they call the
registered ops `torch.ops.spatialformer.bilateral_attention` / `cross_attention` with the
layer's backend ("auto" for a layer on the process-wide default), which pick the kernel (or
the reference) when they run.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    Mlp,
    build_sincos2d_pos_embed,
    register_notrace_function,
    register_notrace_module,
    trunc_normal_,
)
from torch import Tensor, nn

from spatialformer_kernels import bilateral_attention, cross_attention
from spatialformer_kernels.reference import cross_attention_reference

from .backend import check_backend_name, resolve_layer_backend

BCA_MODES = ("parallel", "sequential")


class SpatialTokens(nn.Module):
    """The initial spatial tokens: a fixed 2D sin-cos encoding of the grid plus a learnable embedding.

    Returns [B, grid*grid, dim] for a batch of B.
    """

    def __init__(self, dim: int, grid_size: int = 8):
        super().__init__()
        self.grid_size = grid_size
        sincos = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)
        self.register_buffer("sincos", sincos, persistent=False)
        self.embedding = nn.Parameter(torch.zeros(grid_size * grid_size, dim))
        trunc_normal_(self.embedding, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def forward(self, batch_size: int) -> Tensor:
        tokens = self.sincos.to(self.embedding.dtype) + self.embedding
        return tokens.unsqueeze(0).expand(batch_size, -1, -1)


def _split_heads(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*C] -> three [B, H, L, D] strided views (no copy)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(out: Tensor) -> Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    return out.transpose(1, 2).flatten(2)


@register_notrace_function
def _bilateral_heads(
    q_s: Tensor,
    k_s: Tensor,
    v_s: Tensor,
    q_x: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    image_mask: Optional[Tensor],
    backend: Optional[str],
) -> Tuple[Tensor, Tensor]:
    """Both BCA directions on [B, H, L, D] heads with the layer's backend (None: the process-wide default)."""
    if torch.jit.is_scripting():
        # No Python dispatch in TorchScript: the registered op resolves the layer's backend
        # ("auto" for a layer that follows the process-wide default) when it runs.
        scale = float(q_s.shape[-1]) ** -0.5
        o_s, o_x, _, _ = torch.ops.spatialformer.bilateral_attention(
            q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, backend if backend is not None else "auto"
        )
        return o_s, o_x
    return bilateral_attention(
        q_s, k_s, v_s, q_x, k_x, v_x, image_mask=image_mask, backend=resolve_layer_backend(backend)
    )


@register_notrace_function
def _cross_heads(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """One attention direction on [B, H, L, D] heads with the layer's backend."""
    if torch.jit.is_scripting():  # as in _bilateral_heads
        scale = float(q.shape[-1]) ** -0.5
        name = backend if backend is not None else "auto"
        return torch.ops.spatialformer.cross_attention(q, k, v, scale, key_mask, name)[0]
    return cross_attention(q, k, v, key_mask=key_mask, backend=resolve_layer_backend(backend))


@register_notrace_function
def _joint_heads(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """Joint self-attention on [B, H, L, D] heads: SDPA, or the reference for backend "reference"."""
    if not torch.jit.is_scripting():
        if resolve_layer_backend(backend) == "reference":
            return cross_attention_reference(q, k, v, q.shape[-1] ** -0.5, key_mask)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# Leaves for every torch.fx tracer (register_notrace_function covers timm's own tracer).
torch.fx.wrap("_bilateral_heads")
torch.fx.wrap("_cross_heads")
torch.fx.wrap("_joint_heads")


@register_notrace_module
class BilateralCrossAttention(nn.Module):
    """Bilateral cross-attention between spatial tokens [B, M, C] and image tokens [B, N, C].

    Per-stream q/k/v and output projections. `forward(s, x)` is the parallel mode (one fused
    launch) and returns the two updates (ds [B, M, C], dx [B, N, C]); the sequential mode
    uses `attend_spatial` then `attend_image` (see BCABlock).

    Example:
        >>> attn = BilateralCrossAttention(64, num_heads=2)
        >>> ds, dx = attn(torch.randn(2, 64, 64), torch.randn(2, 3136, 64))
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend_name(backend)
        self.qkv_s = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj_s = nn.Linear(dim, dim)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.jit.ignore
    def _backend(self) -> str:
        """The backend this layer runs now (eager): its own, else the process-wide default."""
        return resolve_layer_backend(self.backend)

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        q_s, k_s, v_s = _split_heads(self.qkv_s(s), self.num_heads)
        q_x, k_x, v_x = _split_heads(self.qkv_x(x), self.num_heads)
        o_s, o_x = _bilateral_heads(q_s, k_s, v_s, q_x, k_x, v_x, image_mask, self.backend)
        return self.proj_drop(self.proj_s(_merge_heads(o_s))), self.proj_drop(self.proj_x(_merge_heads(o_x)))

    def image_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Image-stream q_x, k_x, v_x, each [B, H, N, D]."""
        return _split_heads(self.qkv_x(x), self.num_heads)

    def attend_spatial(self, s: Tensor, k_x: Tensor, v_x: Tensor, image_mask: Optional[Tensor] = None) -> Tensor:
        """Sequential mode, step 1: spatial queries over the image tokens -> ds [B, M, C]."""
        q_s, _, _ = _split_heads(self.qkv_s(s), self.num_heads)
        o_s = _cross_heads(q_s, k_x, v_x, image_mask, self.backend)
        return self.proj_drop(self.proj_s(_merge_heads(o_s)))

    def attend_image(self, q_x: Tensor, s: Tensor) -> Tensor:
        """Sequential mode, step 2: image queries over the (updated) spatial tokens -> dx [B, N, C]."""
        _, k_s, v_s = _split_heads(self.qkv_s(s), self.num_heads)
        o_x = _cross_heads(q_x, k_s, v_s, None, self.backend)
        return self.proj_drop(self.proj_x(_merge_heads(o_x)))


class BCABlock(nn.Module):
    """Pre-norm BCA block: bilateral cross-attention, then an MLP on each stream, each with a residual.

    mode="parallel" (default): both directions read the block's inputs (one fused launch).
    mode="sequential": the spatial tokens update first; the image tokens then attend to the
    updated spatial tokens (two cross_attention calls).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        mode: str = "parallel",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if mode not in BCA_MODES:
            raise ValueError(f"mode must be one of {BCA_MODES}, got {mode!r}")
        self.mode = mode
        self.norm_s = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.attn = BilateralCrossAttention(dim, num_heads, qkv_bias, proj_drop, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm_mlp_s = nn.LayerNorm(dim)
        self.norm_mlp_x = nn.LayerNorm(dim)
        self.mlp_s = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.mlp_x = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        s_n, x_n = self.norm_s(s), self.norm_x(x)
        if self.mode == "parallel":
            ds, dx = self.attn(s_n, x_n, image_mask)
            s, x = s + self.drop_path(ds), x + self.drop_path(dx)
        else:
            q_x, k_x, v_x = self.attn.image_qkv(x_n)
            s = s + self.drop_path(self.attn.attend_spatial(s_n, k_x, v_x, image_mask))
            x = x + self.drop_path(self.attn.attend_image(q_x, self.norm_s(s)))
        s = s + self.drop_path(self.mlp_s(self.norm_mlp_s(s)))
        x = x + self.drop_path(self.mlp_x(self.norm_mlp_x(x)))
        return s, x


class JointSelfAttention(nn.Module):
    """Self-attention over the concatenation [spatial; image] of [B, M + N, C] tokens.

    Runs PyTorch SDPA for every kernel backend; backend="reference" runs the pure-PyTorch
    reference instead (for parity checks). key_mask: optional bool [B, M + N].
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend_name(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, tokens: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        q, k, v = _split_heads(self.qkv(tokens), self.num_heads)
        out = _joint_heads(q, k, v, key_mask, self.backend)
        return self.proj_drop(self.proj(_merge_heads(out)))


class SABlock(nn.Module):
    """Pre-norm joint self-attention block over [spatial; image] tokens, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = JointSelfAttention(dim, num_heads, qkv_bias, proj_drop, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        n_spatial = s.shape[1]
        tokens = torch.cat([s, x], dim=1)
        key_mask: Optional[Tensor] = None
        if image_mask is not None:
            key_mask = torch.cat([image_mask.new_ones(s.shape[0], n_spatial), image_mask], dim=1)
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), key_mask))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens[:, :n_spatial], tokens[:, n_spatial:]
