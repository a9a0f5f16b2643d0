"""How often outputs and gradients at |logits| = 1e4 stay within the tolerance rule.

The robustness tests check fixed inputs; this draws fresh ones. Each draw scales random
q, k so that the largest |scale * q.k| over both directions is 1e4 (the issue's bound),
runs forward + backward on the backend and the reference (same dtype and float64), and
prints every output or gradient that breaks the rule (spatialformer_kernels.testing).

    python benchmarks/large_logit_sweep.py --backend cpu --draws 12
    python benchmarks/large_logit_sweep.py --backend triton --shape 1 2 64 100 32 --draws 4
"""
from __future__ import annotations

import argparse

import torch

import spatialformer_kernels as sk
from spatialformer_kernels.reference import bilateral_attention_reference
from spatialformer_kernels.testing import reference_pair, tolerance_report

SCALE = 0.25
NAMES = ("o_s", "o_x", "dq_s", "dk_s", "dv_s", "dq_x", "dk_x", "dv_x")


def draw(shape, dtype, seed, largest=1e4):
    """Six inputs whose largest |SCALE * q.k| is `largest`, and the two grad outputs."""
    generator = torch.Generator().manual_seed(seed)
    b, h, m, n, d = shape
    q_s, k_s, v_s, q_x, k_x, v_x = [
        torch.randn(b, h, length, d, generator=generator, dtype=torch.float64) for length in (m, m, m, n, n, n)
    ]
    peak = SCALE * max((q_s @ k_x.mT).abs().max(), (q_x @ k_s.mT).abs().max())
    gain = (largest / peak) ** 0.5
    inputs = [t.to(dtype) for t in (q_s * gain, k_s * gain, v_s, q_x * gain, k_x * gain, v_x)]
    grads = [torch.randn(inputs[i].shape, generator=generator).to(dtype) for i in (0, 3)]
    return inputs, grads


def outputs_and_grads(tensors, backend):
    inputs, grads = tensors[:6], tensors[6:]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if backend == "reference_fn":
        outs = bilateral_attention_reference(*leaves, SCALE)
    else:
        outs = sk.bilateral_attention(*leaves, scale=SCALE, backend=backend)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads))


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
        got = outputs_and_grads(inputs + grads, args.backend)
        same, exact = reference_pair(lambda *t: outputs_and_grads(list(t), "reference_fn"), inputs + grads)
        broken = []
        for name, a, s, e in zip(NAMES, got, same, exact):
            ok, message = tolerance_report(a, s, e, dtype)
            if not ok:
                broken.append(f"{name}: {message}")
        failing += bool(broken)
        print(f"draw {seed}: " + ("within the rule" if not broken else "; ".join(broken)), flush=True)
    print(f"{args.draws - failing} of {args.draws} draws within the rule "
          f"({args.backend}, {args.dtype}, B H M N D = {' '.join(map(str, args.shape))})")


if __name__ == "__main__":
    main()
