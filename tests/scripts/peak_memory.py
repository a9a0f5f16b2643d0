"""Peak memory of bilateral attention forward + backward, per case, in a fresh process: the
growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) with the outputs
and all six gradients kept alive. argv[1]: a JSON list of [backend, B, H, M, N, D], or
[backend, B, H, M, N, D, "attn_mask"] for cross_attention of M queries over N keys with a
per-query mask [B, M, N] (made before the reset: the mask is an input). Prints a JSON list of
{"backend", "shape", "extra", "inputs", "logits"} (bytes; and "mask" for a masked case). Linux only.

    python tests/scripts/peak_memory.py '[["cpu", 1, 2, 64, 70000, 8]]'
"""
import json
import sys

import torch

import spatialformer_kernels as sk
from spatialformer_kernels.testing import make_bilateral_inputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def measure_masked_cross(backend, B, H, M, N, D):
    q, k, v = (t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, seed=0)[3:])
    q = q[:, :, :M].detach().requires_grad_()
    mask = torch.rand(B, M, N) < 0.3
    warm = [t.requires_grad_() for t in make_bilateral_inputs(1, 1, 4, 8, D)[3:]]
    sk.cross_attention(*warm, attn_mask=torch.ones(1, 8, 8, dtype=torch.bool), backend=backend).sum().backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = status("VmRSS")
    sk.cross_attention(q, k, v, attn_mask=mask, backend=backend).sum().backward()
    extra = status("VmHWM") - before
    return {"backend": backend, "shape": [B, H, M, N, D, "attn_mask"], "extra": extra,
            "inputs": sum(t.numel() * t.element_size() for t in (q, k, v)), "logits": B * H * M * N * 4,
            "mask": mask.numel()}

def measure(backend, B, H, M, N, D, op=None):
    if op == "attn_mask":
        return measure_masked_cross(backend, B, H, M, N, D)
    inputs = [t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, seed=0)]
    warm = [t.requires_grad_() for t in make_bilateral_inputs(1, 1, 4, 8, D)]
    sum(o.sum() for o in sk.bilateral_attention(*warm, backend=backend)).backward()  # loads the kernel
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = status("VmRSS")
    o_s, o_x = sk.bilateral_attention(*inputs, backend=backend)
    (o_s.sum() + o_x.sum()).backward()
    extra = status("VmHWM") - before
    return {"backend": backend, "shape": [B, H, M, N, D], "extra": extra,
            "inputs": sum(t.numel() * t.element_size() for t in inputs), "logits": B * H * M * N * 4}

print(json.dumps([measure(*case) for case in json.loads(sys.argv[1])]))
