"""Which kernels SpatialFormer layers use: per layer, or the process-wide default.

A layer built with backend=None (the default) follows the process-wide default at call
time; an explicit backend on a layer wins. The process-wide default is, in order: the
innermost `use_backend(...)` context, the SPATIALFORMER_BACKEND environment variable,
then "auto" (in the spirit of timm's fused-attention switch).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from spatialformer_kernels.dispatch import BACKENDS

ENV_VAR = "SPATIALFORMER_BACKEND"
_context_stack: list[str] = []


def check_backend_name(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def default_backend() -> str:
    """The process-wide default backend for layers built with backend=None."""
    if _context_stack:
        return _context_stack[-1]
    return check_backend_name(os.environ.get(ENV_VAR, "auto"))


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within this context, layers built with backend=None run `backend`.

    Example:
        >>> with spatialformer.use_backend("reference"):
        ...     logits = model(images)
    """
    _context_stack.append(check_backend_name(backend))
    try:
        yield
    finally:
        _context_stack.pop()


def resolve_layer_backend(layer_backend: Optional[str]) -> str:
    return layer_backend if layer_backend is not None else default_backend()
