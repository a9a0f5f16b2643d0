"""Swap the attention kernels of an existing model in place.

Kernels are a per-layer setting, not part of the weights: swapping changes no parameter,
buffer or state_dict key, so a model trained or saved on one backend runs on another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from spatialformer_kernels import available_backends

from .backend import check_backend_name
from .layers import BilateralCrossAttention, JointSelfAttention
from .segmentation import MaskedCrossAttention, QuerySelfAttention

DECODER_LAYERS = (MaskedCrossAttention, QuerySelfAttention)  # the segmentation decoder's (segmentation.py)
ATTENTION_LAYERS = (BilateralCrossAttention, JointSelfAttention) + DECODER_LAYERS


@dataclass
class SwapSummary:
    """What `swap_attention` changed: layer names by kind, and each layer's previous backend."""

    backend: Optional[str]
    bilateral: list[str] = field(default_factory=list)
    joint: list[str] = field(default_factory=list)
    decoder: list[str] = field(default_factory=list)  # a segmenter's masked cross- and query self-attention
    previous: dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def num_swapped(self) -> int:
        return len(self.bilateral) + len(self.joint) + len(self.decoder)

    def __str__(self) -> str:
        text = (
            f"swapped {self.num_swapped} attention layers to backend={self.backend!r}: "
            f"{len(self.bilateral)} bilateral cross-attention, {len(self.joint)} joint self-attention"
        )
        return text + (f", {len(self.decoder)} segmentation decoder attention" if self.decoder else "")


def swap_attention(model: nn.Module, backend: Optional[str] = "auto") -> SwapSummary:
    """Switch every SpatialFormer attention layer inside `model` to `backend`, in place.

    backend: "auto", "reference", "triton", "cpu", or None (follow the process-wide default,
    see `spatialformer.use_backend`). An explicit kernel backend that this machine cannot
    run is refused before anything changes. Returns a SwapSummary.

    Example:
        >>> model = timm.create_model("spatialformer_tiny", backend="reference")
        >>> model.load_state_dict(torch.load("checkpoint.pt"))
        >>> print(spatialformer.swap_attention(model, "auto"))
    """
    check_backend_name(backend)
    if backend not in (None, "auto", "reference") and backend not in available_backends():
        raise RuntimeError(
            f"backend {backend!r} is not available on this machine (available: {', '.join(available_backends())})"
        )
    summary = SwapSummary(backend)
    for name, module in model.named_modules():
        if isinstance(module, ATTENTION_LAYERS):
            summary.previous[name] = module.backend
            module.backend = backend
            if isinstance(module, BilateralCrossAttention):
                summary.bilateral.append(name)
            elif isinstance(module, DECODER_LAYERS):
                summary.decoder.append(name)
            else:
                summary.joint.append(name)
    if summary.num_swapped == 0:
        raise ValueError(f"{type(model).__name__} has no SpatialFormer attention layer to swap")
    return summary
