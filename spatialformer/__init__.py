"""SpatialFormer layers and models; importing this registers spatialformer_{tiny,small,base} in timm."""
from .backend import ENV_VAR as BACKEND_ENV_VAR
from .backend import default_backend, use_backend
from .layers import BCABlock, BilateralCrossAttention, JointSelfAttention, SABlock, SpatialTokens
from .queries import SpatialQueries, SpatialQueryInit
from .seg_loss import HungarianMatcher, SetCriterion
from .segmentation import (
    FPNPixelDecoder,
    MaskedAttentionDecoder,
    SpatialFormerSegmenter,
    build_segmenter,
    semantic_inference,
)
from .spatialformer import SpatialFormer, spatialformer_base, spatialformer_small, spatialformer_tiny
from .swap import SwapSummary, swap_attention

__all__ = [
    "BACKEND_ENV_VAR",
    "BCABlock",
    "BilateralCrossAttention",
    "FPNPixelDecoder",
    "HungarianMatcher",
    "JointSelfAttention",
    "MaskedAttentionDecoder",
    "SABlock",
    "SetCriterion",
    "SpatialFormer",
    "SpatialFormerSegmenter",
    "SpatialQueries",
    "SpatialQueryInit",
    "SpatialTokens",
    "SwapSummary",
    "build_segmenter",
    "default_backend",
    "semantic_inference",
    "spatialformer_base",
    "spatialformer_small",
    "spatialformer_tiny",
    "swap_attention",
    "use_backend",
]
