"""Mask2Former-style segmentation on SpatialFormer: pixel decoder, masked-attention decoder, heads.

The pipeline (SpatialFormer's segmentation framework, trained with Mask2Former's set loss in
`seg_loss.py`):

    images -> SpatialFormer backbone (one `forward_intermediates` pass)
           -> stage maps at reductions 4, 8, 16, 32 + the final 8x8 spatial tokens
    maps   -> FPNPixelDecoder -> memories at reductions 32, 16, 8 (hidden_dim channels)
                              -> per-pixel embeddings at reduction 4 (mask_dim channels)
    tokens -> SpatialQueryInit (8x8 replicated to 256 candidates, top num_queries kept)
           -> MaskedAttentionDecoder (num_layers layers, round-robin over the three memories)
           -> per layer: class logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4]

Choices where we depart from or simplify Mask2Former (each says why):
- Pixel decoder: a plain FPN (lateral 1x1 convs, nearest top-down additions, 3x3 output
  convs with GroupNorm, `convs_per_level` of them), not multi-scale deformable attention. The decoder only needs a
  feature pyramid with a common width; an FPN provides it with no extra op, and
  SpatialFormer's stages 3-4 already mix information globally with self-attention.
- Positional encodings: a fixed 2D sine encoding of normalised (row, col) coordinates for the
  memory pixels (like Mask2Former), and the same encoding of each query's cell in
  SpatialQueryInit's 16x16 candidate grid as the query's positional embedding (Mask2Former
  learns one free embedding per query; ours are tied to where the query came from, in the
  same coordinates as the pixels). Learnable level embeddings are added to the memories.
- Queries: they come from the backbone's spatial tokens, not from free parameters.
  SpatialQueryInit's scores are supervised by the criterion (`loss_query_score`: was the
  query matched), since top-k selection passes no gradient to the scorer otherwise.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor, nn

from spatialformer_kernels import cross_attention

from .backend import check_backend_name, resolve_layer_backend
from .layers import _joint_heads
from .queries import SpatialQueryInit

__all__ = [
    "FPNPixelDecoder",
    "MaskedAttentionDecoder",
    "MaskedDecoderLayer",
    "SpatialFormerSegmenter",
    "attention_mask_from_mask_logits",
    "build_segmenter",
    "semantic_inference",
    "sine_position_encoding",
]

NUM_FEATURE_LEVELS = 3  # reductions 32, 16, 8, visited in that order (coarse to fine)


# ---------------------------------------------------------------------------------------------
# Positional encoding


def sine_position_encoding(rows: Tensor, cols: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sine encoding of normalised coordinates in [0, 1] -> [..., dim].

    The first dim/2 channels encode the row, the last dim/2 the column; within each half,
    channel pairs (sin, cos) run over geometrically spaced frequencies. Coordinates are scaled
    by 2*pi, so the lowest frequency spans the whole image once and a pixel's code does not
    depend on the map's resolution, only on where the pixel is: that lets queries (encoded at
    their 16x16 grid cell) and memory pixels of every level share one coordinate system.
    """
    if dim % 4:
        raise ValueError(f"the positional encoding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    exponent = torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter
    frequencies = temperature ** (-exponent)  # [dim/4]

    def encode(coordinate: Tensor) -> Tensor:
        angles = (coordinate.float() * (2 * math.pi)).unsqueeze(-1) * frequencies
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., dim/2]

    return torch.cat([encode(rows), encode(cols)], dim=-1)


def _grid_position_encoding(height: int, width: int, dim: int, device: torch.device) -> Tensor:
    """The sine encoding of every pixel centre of a height x width map, row-major: [height*width, dim]."""
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return sine_position_encoding(grid_rows.flatten(), grid_cols.flatten(), dim)


# ---------------------------------------------------------------------------------------------
# Pixel decoder


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups: batch-size independent, so small CPU batches train as well as large ones."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        _group_norm(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPNPixelDecoder(nn.Module):
    """A feature pyramid over the backbone's four stage maps (reductions 4, 8, 16, 32).

    Top-down: each level's map is its 1x1 lateral projection plus the nearest-upsampled
    output of the coarser level, smoothed by `convs_per_level` 3x3 convs (GroupNorm, ReLU).
    The smoothing convs are the decoder's only local mixing of image features (SpatialFormer's
    BCA stages mix image tokens only through the spatial tokens and patch merging), hence the
    option of more than one. Returns the memories for the
    transformer decoder at reductions 32, 16, 8 (coarse first, hidden_dim channels each) and
    the per-pixel embeddings at reduction 4 (mask_dim channels) that the mask head dots with.
    A plain FPN instead of Mask2Former's deformable-attention encoder: see the module docstring.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, mask_dim: int, convs_per_level: int = 1):
        super().__init__()
        if len(in_channels) != NUM_FEATURE_LEVELS + 1:
            raise ValueError(
                f"expected {NUM_FEATURE_LEVELS + 1} backbone maps (reductions 4..32), got {len(in_channels)}"
            )
        self.lateral = nn.ModuleList(_conv_norm(c, hidden_dim, 1, relu=False) for c in in_channels)
        if convs_per_level < 1:
            raise ValueError(f"convs_per_level must be >= 1, got {convs_per_level}")
        self.smooth = nn.ModuleList(
            nn.Sequential(*[_conv_norm(hidden_dim, hidden_dim, 3, relu=True) for _ in range(convs_per_level)])
            for _ in in_channels
        )
        self.mask_projection = nn.Conv2d(hidden_dim, mask_dim, kernel_size=3, padding=1)

    def forward(self, maps: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor]:
        """maps: NCHW, finest first (reductions 4, 8, 16, 32) -> (memories coarse first, mask features)."""
        outputs: List[Tensor] = []
        previous: Optional[Tensor] = None
        for index in range(len(maps) - 1, -1, -1):
            current = self.lateral[index](maps[index])
            if previous is not None:
                current = current + F.interpolate(previous, size=current.shape[-2:], mode="nearest")
            previous = self.smooth[index](current)
            outputs.append(previous)
        # outputs: reductions 32, 16, 8, 4
        return outputs[:NUM_FEATURE_LEVELS], self.mask_projection(outputs[-1])


# ---------------------------------------------------------------------------------------------
# The masked-attention transformer decoder


@register_notrace_function
def _masked_cross_heads(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """Masked cross-attention on [B, H, L, D] heads with the layer's backend (None: the process-wide default).

    Mirrors layers._cross_heads: scripted models call the registered op with the backend
    name, which resolves it when it runs (the Python dispatch is not scriptable).
    """
    if torch.jit.is_scripting():
        scale = float(q.shape[-1]) ** -0.5
        name = backend if backend is not None else "auto"
        return torch.ops.spatialformer.cross_attention(q, k, v, scale, None, name, attn_mask)[0]
    return cross_attention(q, k, v, attn_mask=attn_mask, backend=resolve_layer_backend(backend))


torch.fx.wrap("_masked_cross_heads")


def _to_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, C] -> [B, H, L, C/H] as a strided view (the kernels read any strides)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _from_heads(x: Tensor) -> Tensor:
    return x.transpose(1, 2).flatten(2)


class MaskedCrossAttention(nn.Module):
    """Queries [B, Q, C] attend to a memory [B, L, C], each query only where `attn_mask` keeps a pixel.

    Runs `spatialformer_kernels.cross_attention` with `attn_mask` bool [B, Q, L] (True =
    attend), the same for every head. Positional encodings go into queries and keys, not
    values, so what a query reads is content and where it looks is content plus position.
    `backend` works as in the backbone's attention layers (None follows
    `spatialformer.use_backend`); `spatialformer.swap_attention` does not know this layer
    yet, so choose its backend when building (`build_segmenter(backend=...)`) or set it.
    """

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend_name(backend)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        q = _to_heads(self.q_proj(queries + query_pos), self.num_heads)
        k = _to_heads(self.k_proj(memory + memory_pos), self.num_heads)
        v = _to_heads(self.v_proj(memory), self.num_heads)
        return self.out_proj(_from_heads(_masked_cross_heads(q, k, v, attn_mask, self.backend)))


class QuerySelfAttention(nn.Module):
    """Self-attention among the queries (SDPA; the reference for backend "reference"), so they can
    negotiate which object each one explains (the set loss punishes duplicates)."""

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend_name(backend)
        self.qk_proj = nn.Linear(dim, 2 * dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, query_pos: Tensor) -> Tensor:
        q, k = self.qk_proj(queries + query_pos).chunk(2, dim=-1)
        v = self.v_proj(queries)
        heads = [_to_heads(t, self.num_heads) for t in (q, k, v)]
        return self.out_proj(_from_heads(_joint_heads(heads[0], heads[1], heads[2], None, self.backend)))


class MaskedDecoderLayer(nn.Module):
    """Masked cross-attention -> query self-attention -> FFN, each as x = LayerNorm(x + sublayer(x)).

    Post-norm, as Mask2Former's decoder layers (the query stream is renormalised after every
    residual; with at most 9 layers there is no deep identity path that pre-norm would
    protect). Cross-attention comes first, so a query reads its region of the image before
    comparing notes with the other queries. The heads read the queries through the decoder's
    own LayerNorm (MaskedAttentionDecoder.norm), which the initial queries need since no
    layer has normalised them yet.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.cross_attn = MaskedCrossAttention(dim, num_heads, backend)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = QuerySelfAttention(dim, num_heads, backend)
        self.norm_self = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        queries = self.norm_cross(
            queries + self.dropout(self.cross_attn(queries, query_pos, memory, memory_pos, attn_mask))
        )
        queries = self.norm_self(queries + self.dropout(self.self_attn(queries, query_pos)))
        return self.norm_ffn(queries + self.dropout(self.ffn(queries)))


class MaskHead(nn.Module):
    """Three-layer MLP: query features -> mask embeddings (dotted with the per-pixel embeddings)."""

    def __init__(self, dim: int, mask_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, mask_dim),
        )

    def forward(self, queries: Tensor) -> Tensor:
        return self.layers(queries)


def attention_mask_from_mask_logits(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """Mask logits [B, Q, h, w] -> the next layer's attn_mask bool [B, Q, size[0]*size[1]] (True = attend).

    The logits are resized (bilinear) to the memory level the next layer reads, and a query
    attends where its predicted mask is on (sigmoid >= 0.5, i.e. logit >= 0). A query whose
    resized mask is empty attends everywhere instead (Mask2Former's rule): otherwise it would
    read nothing (the op gives such a row zeros) and could never find an object again. The
    rule lives here, in the decoder, not in the op, whose contract for an empty row is zeros.
    The logits are detached: the threshold passes no gradient anyway (the mask is a routing
    decision, trained through the mask losses), and the resize then builds no autograd graph.
    """
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    attend = resized.flatten(2) >= 0
    return attend | ~attend.any(dim=-1, keepdim=True)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder: `num_layers` masked-attention layers over a feature pyramid.

    Layer i reads memory level i % 3 (reductions 32, 16, 8: coarse to fine, round-robin),
    with each query restricted to the mask it predicted before the layer (see
    `attention_mask_from_mask_logits`). Shared heads (LayerNorm, a class Linear and the mask
    MLP) predict from the initial queries and after every layer: num_layers + 1 predictions,
    the last is the output, the others are the auxiliary outputs the loss also supervises.
    Post-norm layers (MaskedDecoderLayer); 9 layers by default (three rounds over the levels).

    forward(queries [B, Q, C], query_pos [B, Q, C], memories (3 NCHW maps with C channels,
    coarse first), mask_features [B, mask_dim, H/4, W/4]) -> {"pred_logits" [B, Q, K+1],
    "pred_masks" [B, Q, H/4, W/4], "aux_outputs": [{"pred_logits", "pred_masks"}] * num_layers}.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        mask_dim: int = 256,
        dropout: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.level_embedding = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.layers = nn.ModuleList(
            MaskedDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, backend) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # the last class is "no object"
        self.mask_head = MaskHead(hidden_dim, mask_dim)

    def predict(self, queries: Tensor, mask_features: Tensor) -> Tuple[Tensor, Tensor]:
        """(class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4]) from the queries' current state."""
        normed = self.norm(queries)
        mask_embeddings = self.mask_head(normed)
        mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embeddings, mask_features)
        return self.class_head(normed), mask_logits

    def forward(self, queries: Tensor, query_pos: Tensor, memories: Sequence[Tensor], mask_features: Tensor) -> Dict:
        if len(memories) != NUM_FEATURE_LEVELS:
            raise ValueError(f"expected {NUM_FEATURE_LEVELS} memory levels (reductions 32, 16, 8), got {len(memories)}")
        sizes = [(m.shape[-2], m.shape[-1]) for m in memories]
        flat = [m.flatten(2).transpose(1, 2) + self.level_embedding.weight[level] for level, m in enumerate(memories)]
        positions = [
            _grid_position_encoding(h, w, self.hidden_dim, m.device).to(m.dtype) for (h, w), m in zip(sizes, memories)
        ]

        predictions = [self.predict(queries, mask_features)]
        for index, layer in enumerate(self.layers):
            level = index % NUM_FEATURE_LEVELS
            attn_mask = attention_mask_from_mask_logits(predictions[-1][1], sizes[level])
            queries = layer(queries, query_pos, flat[level], positions[level], attn_mask)
            predictions.append(self.predict(queries, mask_features))
        logits, masks = predictions[-1]
        aux = [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]]
        return {"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux}


# ---------------------------------------------------------------------------------------------
# The full model


class SpatialFormerSegmenter(nn.Module):
    """SpatialFormer backbone + FPN pixel decoder + SpatialQueryInit + MaskedAttentionDecoder.

    forward(images [B, 3, H, W], H and W multiples of 32) -> Mask2Former's output dict:
    "pred_logits" [B, Q, K+1] (last class = no object), "pred_masks" [B, Q, H/4, W/4] (logits),
    "aux_outputs" (the same for the initial queries and every layer but the last), plus
    "query_scores" [B, Q] (SpatialQueryInit's scores, supervised by the criterion).
    Build it with `build_segmenter`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 100,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        mask_dim: int = 256,
        dropout: float = 0.0,
        backend: Optional[str] = None,
        pixel_decoder_convs: int = 1,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        channels = [info["num_chs"] for info in backbone.feature_info]
        self.pixel_decoder = FPNPixelDecoder(channels, hidden_dim, mask_dim, pixel_decoder_convs)
        self.query_init = SpatialQueryInit(
            channels[-1], grid_size=backbone.spatial_tokens.grid_size, num_queries=num_queries
        )
        self.query_grid = self.query_init.grid_size * self.query_init.upsample
        self.query_proj = nn.Linear(channels[-1], hidden_dim) if channels[-1] != hidden_dim else nn.Identity()
        self.decoder = MaskedAttentionDecoder(
            num_classes, hidden_dim, num_heads, num_layers, ffn_dim, mask_dim, dropout, backend
        )

    def forward(self, images: Tensor) -> Dict:
        final_tokens, maps = self.backbone.forward_intermediates(images)
        spatial_tokens = final_tokens[:, : self.backbone.spatial_tokens.num_tokens]
        memories, mask_features = self.pixel_decoder(maps)
        init = self.query_init(spatial_tokens)
        query_pos = self.query_position_encoding(init.positions).to(images.dtype)
        outputs = self.decoder(self.query_proj(init.queries), query_pos, memories, mask_features)
        outputs["query_scores"] = init.scores
        return outputs

    def query_position_encoding(self, positions: Tensor) -> Tensor:
        """(row, col) cells [B, Q, 2] of the 16x16 candidate grid -> [B, Q, hidden_dim]: the sine
        encoding of each cell's centre, in the coordinates of the memory pixels' encoding."""
        cells = (positions.float() + 0.5) / self.query_grid
        return sine_position_encoding(cells[..., 0], cells[..., 1], self.decoder.hidden_dim)

    @staticmethod
    def semantic_inference(outputs: Dict, image_size: Tuple[int, int]) -> Tensor:
        return semantic_inference(outputs, image_size)


@torch.no_grad()
def semantic_inference(outputs: Dict, image_size: Tuple[int, int]) -> Tensor:
    """Mask2Former's semantic inference -> a label map [B, H, W] (int64, classes 0..K-1).

    Each pixel's score for class k is the sum over queries of P(class k | query) (softmax
    over the K+1 classes, the no-object column dropped) times the query's mask probability
    (sigmoid of the mask logits, bilinearly resized to image_size); the label is the argmax.
    Queries that predict "no object" thereby contribute little to any class.
    """
    class_probs = outputs["pred_logits"].softmax(-1)[..., :-1]
    masks = F.interpolate(outputs["pred_masks"], size=tuple(image_size), mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqk,bqhw->bkhw", class_probs, masks).argmax(1)


def build_segmenter(
    backbone: str = "spatialformer_tiny",
    num_classes: int = 150,
    *,
    num_queries: int = 100,
    hidden_dim: int = 256,
    decoder_heads: int = 8,
    decoder_layers: int = 9,
    ffn_dim: int = 2048,
    mask_dim: Optional[int] = None,
    dropout: float = 0.0,
    pixel_decoder_convs: int = 1,
    backend: Optional[str] = None,
    pretrained: bool = False,
    **backbone_kwargs,
) -> SpatialFormerSegmenter:
    """A SpatialFormer segmenter: `backbone` from timm (any `spatialformer_*`) + the Mask2Former-style decoder.

    Decoder defaults follow Mask2Former (100 queries, width 256, 8 heads, 9 layers, FFN 2048;
    mask_dim defaults to hidden_dim; pixel_decoder_convs: 3x3 convs per FPN level).
    `backend` ("auto", "reference", "triton", "cpu"; None follows `spatialformer.use_backend`)
    applies to the backbone's attention and the decoder's. Every other keyword argument goes to `timm.create_model` for the backbone
    (the decoder's arguments are prefixed or named so that none collides with the
    backbone's), e.g. a small configuration that trains on a CPU:

        >>> model = build_segmenter("spatialformer_tiny", num_classes=4, num_queries=20, hidden_dim=64,
        ...                         decoder_heads=2, decoder_layers=3, ffn_dim=128,
        ...                         embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))

    pretrained=True loads the backbone's weights as timm does (`pretrained_cfg_overlay=dict(file=PATH)`
    for a local file); the decoder starts from scratch.
    """
    check_backend_name(backend)
    model = timm.create_model(backbone, pretrained=pretrained, num_classes=0, backend=backend, **backbone_kwargs)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "spatial_tokens"):
        raise ValueError(
            f"{backbone!r} is not a SpatialFormer backbone (it needs spatial tokens and forward_intermediates)"
        )
    return SpatialFormerSegmenter(
        model,
        num_classes,
        num_queries=num_queries,
        hidden_dim=hidden_dim,
        num_heads=decoder_heads,
        num_layers=decoder_layers,
        ffn_dim=ffn_dim,
        mask_dim=hidden_dim if mask_dim is None else mask_dim,
        dropout=dropout,
        backend=backend,
        pixel_decoder_convs=pixel_decoder_convs,
    )
