"""Peak memory of bilateral attention forward + backward, per case, in a fresh process: the
growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) with the outputs
and all six gradients kept alive. argv[1]: a JSON list of [backend, B, H, M, N, D]. Prints a
JSON list of {"backend", "shape", "extra", "inputs", "logits"} (bytes). Linux only.

    python tests/scripts/peak_memory.py '[["cpu", 1, 2, 64, 70000, 8]]'
"""
import json
import sys

import spatialformer_kernels as sk
from spatialformer_kernels.testing import make_bilateral_inputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def measure(backend, B, H, M, N, D):
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
