"""SpatialFormer layers: spatial tokens, bilateral cross-attention (BCA) and joint self-attention.

Token layouts: spatial tokens s are [B, M, C] (M = 64, an 8x8 grid), image tokens x are
[B, N, C]. Attention layers project to per-head tensors [B, H, L, D] as strided views of
the fused qkv projection (no copy), which every kernel backend reads in place.

The block internals are not published with the paper; these are our documented choices
(docs/design.md section 3): pre-norm, per-stream q/k/v projections, MLP ratio 4, qkv bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, build_sincos2d_pos_embed, trunc_normal_
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


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*C] -> three [B, H, L, D] strided views (no copy)."""
    return rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=num_heads).unbind(0)


def _merge_heads(out: Tensor) -> Tensor:
    return rearrange(out, "b h l d -> b l (h d)")


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

    def _backend(self) -> str:
        return resolve_layer_backend(self.backend)

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        q_s, k_s, v_s = _split_heads(self.qkv_s(s), self.num_heads)
        q_x, k_x, v_x = _split_heads(self.qkv_x(x), self.num_heads)
        o_s, o_x = bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, image_mask=image_mask, backend=self._backend())
        return self.proj_drop(self.proj_s(_merge_heads(o_s))), self.proj_drop(self.proj_x(_merge_heads(o_x)))

    def image_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image-stream q_x, k_x, v_x, each [B, H, N, D]."""
        return _split_heads(self.qkv_x(x), self.num_heads)

    def attend_spatial(self, s: Tensor, k_x: Tensor, v_x: Tensor, image_mask: Optional[Tensor] = None) -> Tensor:
        """Sequential mode, step 1: spatial queries over the image tokens -> ds [B, M, C]."""
        q_s, _, _ = _split_heads(self.qkv_s(s), self.num_heads)
        o_s = cross_attention(q_s, k_x, v_x, key_mask=image_mask, backend=self._backend())
        return self.proj_drop(self.proj_s(_merge_heads(o_s)))

    def attend_image(self, q_x: Tensor, s: Tensor) -> Tensor:
        """Sequential mode, step 2: image queries over the (updated) spatial tokens -> dx [B, N, C]."""
        _, k_s, v_s = _split_heads(self.qkv_s(s), self.num_heads)
        o_x = cross_attention(q_x, k_s, v_s, backend=self._backend())
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

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
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
        if resolve_layer_backend(self.backend) == "reference":
            out = cross_attention_reference(q, k, v, q.shape[-1] ** -0.5, key_mask)
        else:
            attn_mask = None if key_mask is None else key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
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

    def forward(self, s: Tensor, x: Tensor, image_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        n_spatial = s.shape[1]
        tokens = torch.cat([s, x], dim=1)
        key_mask = None
        if image_mask is not None:
            key_mask = torch.cat([image_mask.new_ones(s.shape[0], n_spatial), image_mask], dim=1)
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), key_mask))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens[:, :n_spatial], tokens[:, n_spatial:]
