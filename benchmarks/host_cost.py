"""Host (Python) cost per call of the public functions, with the kernels stubbed.

    python benchmarks/host_cost.py [--calls 1000]

At the GPU benchmark shapes a call's Python work is comparable to the kernels' GPU time, so
it is measured on its own, on any machine, without a GPU:
- op layers: `bilateral_attention` on small CPU tensors whose C++ kernel functions are
  replaced by ones returning preallocated outputs, so what is timed is validation, dispatch,
  the torch.library op or the eager path, and autograd: an inference call (no_grad) and a
  forward + backward (torch.autograd.grad);
- Triton: the static check's host-cost model (perf_model.host_cost) for the bilateral bf16
  cls224-stage1 forward and backward, on meta tensors: a call on a launch plan (every call
  after a signature's first; triton/launch.py), the launchers' own work (a signature's first
  call) and Triton's argument binding for their launches; the driver's launch call not included.
Prints median microseconds per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

import spatialformer_kernels as sk  # noqa: E402
from spatialformer_kernels import dispatch  # noqa: E402


def median_us(fn, calls: int) -> float:
    for _ in range(calls // 20 + 1):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def op_layers(calls: int) -> dict:
    B, H, M, N, D = 4, 2, 64, 256, 32
    leaves = [torch.randn(B, H, L, D, requires_grad=True) for L in (M, M, M, N, N, N)]
    outputs = (torch.randn(B, H, M, D), torch.randn(B, H, N, D),
               torch.randn(B, H, M, dtype=torch.float64), torch.randn(B, H, N, dtype=torch.float64))
    grads = tuple(torch.randn(B, H, L, D) for L in (M, M, M, N, N, N))
    grad_outputs = (torch.randn(B, H, M, D), torch.randn(B, H, N, D))
    kernels = dispatch.kernels("cpu")
    saved = kernels.bilateral_fwd, kernels.bilateral_bwd
    kernels.bilateral_fwd = lambda *args, **kwargs: tuple(o.view_as(o) for o in outputs)
    kernels.bilateral_bwd = lambda *args, **kwargs: grads
    try:
        def inference():
            with torch.no_grad():
                return sk.bilateral_attention(*leaves, backend="cpu")

        def forward_backward():
            return torch.autograd.grad(sk.bilateral_attention(*leaves, backend="cpu"), leaves, grad_outputs)

        return {"op layers, inference call": median_us(inference, calls),
                "op layers, forward + backward": median_us(forward_backward, calls)}
    finally:
        kernels.bilateral_fwd, kernels.bilateral_bwd = saved


def triton_launchers() -> dict:
    from spatialformer_kernels.backends.triton import launch_record as lr
    from spatialformer_kernels.backends.triton import perf_model as pm

    B, H, M, N, _ = lr.SHAPES["cls224-stage1"]
    case = lr.Case("cls224-stage1", "bilateral", B, H, M, N, 32, "bf16", False)
    out = {}
    for backward, label in ((False, "forward"), (True, "backward")):
        cost = pm.host_cost(case, backward)
        out[f"Triton {label} call on its launch plan (cls224-stage1 bf16)"] = cost["planned_us"]
        out[f"Triton {label} launcher (cls224-stage1 bf16)"] = cost["launcher_us"]
        out[f"Triton {label} argument binding, {cost['launches']} launches"] = cost["binder_us"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = op_layers(args.calls)
    if "triton" in dispatch.available_backends():
        rows.update(triton_launchers())
    for name, us in rows.items():
        print(f"{name:55s} {us:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
