"""How often outputs and gradients at |logits| = 1e4 stay within the tolerance rule.

The numerics tests (tests/test_numerics.py) check fixed inputs; this draws fresh ones. Each draw scales random
q, k so that the largest |scale * q.k| over both directions is 1e4 (the issue's bound),
runs forward + backward on the backend and the reference (same dtype and float64), and
prints every output or gradient that breaks the rule (spatialformer_kernels.testing).

    python benchmarks/large_logit_sweep.py --backend cpu --draws 12
    python benchmarks/large_logit_sweep.py --backend triton --shape 1 2 64 100 32 --draws 4
"""
from __future__ import annotations

import argparse

import torch

from spatialformer_kernels.testing import (
    BILATERAL_RESULT_NAMES,
    bilateral_results,
    large_logit_inputs,
    reference_bilateral_results,
    tolerance_report,
)

SCALE = 0.25


def draw(shape, dtype, seed, largest=1e4):
    """Six inputs whose largest |SCALE * q.k| is `largest`, and the two grad outputs."""
    inputs = large_logit_inputs(dtype, SCALE, largest, shape, seed=seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    grads = [torch.randn(inputs[i].shape, generator=generator).to(dtype) for i in (0, 3)]
    return inputs, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 2, 64, 200, 32], metavar=("B", "H", "M", "N", "D"))
    parser.add_argument("--draws", type=int, default=12)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    failing = 0
    for seed in range(args.draws):
        inputs, grads = draw(args.shape, dtype, seed)
        got = bilateral_results(inputs, grads, args.backend, SCALE)
        same, exact = reference_bilateral_results(inputs, grads, SCALE)
        broken = []
        for name, a, s, e in zip(BILATERAL_RESULT_NAMES, got, same, exact):
            ok, message = tolerance_report(a, s, e, dtype)
            if not ok:
                broken.append(f"{name}: {message}")
        failing += bool(broken)
        print(f"draw {seed}: " + ("within the rule" if not broken else "; ".join(broken)), flush=True)
    print(f"{args.draws - failing} of {args.draws} draws within the rule "
          f"({args.backend}, {args.dtype}, B H M N D = {' '.join(map(str, args.shape))})")


if __name__ == "__main__":
    main()
