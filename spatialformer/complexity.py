"""Parameters and FLOPs of SpatialFormer models, measured with torch.utils.flop_counter.

FlopCounterMode counts matmuls, convolutions and SDPA (2 FLOPs per multiply-add); the BCA
op registers its own formula, so every backend counts the same. LayerNorm, softmax and
activations are not counted (the usual convention for "FLOPs" tables).

    python -m spatialformer.complexity            # T/S/B at 224x224, markdown table
"""
from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import spatialformer as _models  # noqa: F401  (registers the models in timm)

MODELS = ("spatialformer_tiny", "spatialformer_small", "spatialformer_base")


def measure(name: str, img_size: int = 224, backend: str = "reference") -> dict:
    """{"model", "params", "flops"} for one forward pass of one image."""
    model = timm.create_model(name, backend=backend).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    return {"model": name, "params": params, "flops": counter.get_total_flops()}


def markdown_table(rows: list[dict], img_size: int) -> str:
    lines = [f"| model | params (M) | GFLOPs at {img_size}x{img_size} |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    print(markdown_table([measure(name, args.img_size) for name in args.models], args.img_size))


if __name__ == "__main__":
    main()
