"""Decoder query initialisation from SpatialFormer's output spatial tokens.

The output spatial tokens (an 8x8 grid) are replicated to a 16x16 grid of 256 candidates
(each token to its 2x2 cell), a learnable embedding per candidate position makes the
copies distinct, a learned linear score ranks them, and the top `num_queries` (100) are
kept as the initial queries of a detection or segmentation decoder.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange, repeat
from timm.layers import trunc_normal_
from torch import Tensor, nn


class SpatialQueries(NamedTuple):
    queries: Tensor  # [B, K, C], ordered by descending score
    scores: Tensor  # [B, K], the learned scores of the kept candidates
    positions: Tensor  # [B, K, 2] int64 (row, col) of each kept candidate in the replicated grid


class SpatialQueryInit(nn.Module):
    """Spatial tokens [B, grid*grid, C] -> the top `num_queries` of `replicas * grid*grid` candidates.

    Gradients reach the kept candidates' tokens and embeddings through the queries, and the
    scorer through the returned scores (supervise them, e.g. with the matching cost).

    Example:
        >>> init = SpatialQueryInit(dim=320)
        >>> q = init(model.forward_spatial_tokens(images))  # q.queries: [B, 100, 320]
    """

    def __init__(self, dim: int, grid_size: int = 8, upsample: int = 2, num_queries: int = 100):
        super().__init__()
        self.grid_size, self.upsample = grid_size, upsample
        self.num_candidates = (grid_size * upsample) ** 2
        if not 1 <= num_queries <= self.num_candidates:
            raise ValueError(f"num_queries must be in 1..{self.num_candidates}, got {num_queries}")
        self.num_queries = num_queries
        self.candidate_embedding = nn.Parameter(torch.zeros(self.num_candidates, dim))
        trunc_normal_(self.candidate_embedding, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, spatial_tokens: Tensor) -> SpatialQueries:
        expected = self.grid_size * self.grid_size
        if spatial_tokens.dim() != 3 or spatial_tokens.shape[1] != expected:
            raise ValueError(f"spatial_tokens must be [B, {expected}, C], got {tuple(spatial_tokens.shape)}")
        grid = rearrange(spatial_tokens, "b (h w) c -> b h w c", h=self.grid_size)
        candidates = repeat(grid, "b h w c -> b (h rh w rw) c", rh=self.upsample, rw=self.upsample)
        candidates = self.norm(candidates + self.candidate_embedding)
        all_scores = self.score(candidates).squeeze(-1)
        scores, index = all_scores.topk(self.num_queries, dim=1)
        queries = torch.gather(candidates, 1, index.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        side = self.grid_size * self.upsample
        positions = torch.stack([index // side, index % side], dim=-1)
        return SpatialQueries(queries, scores, positions)
