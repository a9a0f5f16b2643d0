"""Bilateral attention on inputs whose element offsets pass 2**31 (byte offsets 2**32), on the
backends named in argv, against the reference under the tolerance rule. Prints one JSON report.

The six inputs live in one bf16 storage, each a [3, 2, L, 16] view with batch stride 3 * 2**29
and head stride 2**29 elements, so the last sample starts ~3.76e9 elements (7.5 GB) into the
storage. The storage comes from torch.empty (mmap), so only the pages the views touch become
resident (a few MB).

    python tests/scripts/large_offsets.py cpu triton
"""
import json
import resource
import sys

import torch
from spatialformer_kernels.testing import bilateral_results, reference_bilateral_results, tolerance_report

B, H, M, N, D, dtype = 3, 2, 5, 40, 16, torch.bfloat16
stride_b, stride_h = 3 * 2**29, 2**29
lengths = (M, M, M, N, N, N)
offsets = [sum(lengths[:i]) * D for i in range(6)]
storage = torch.empty((B - 1) * stride_b + (H - 1) * stride_h + sum(lengths) * D, dtype=dtype)
views = [storage.as_strided((B, H, L, D), (stride_b, stride_h, D, 1), o) for L, o in zip(lengths, offsets)]
generator = torch.Generator().manual_seed(0)
data = [torch.randn(B, H, L, D, generator=generator).to(dtype) for L in lengths]
for view, values in zip(views, data):
    view.copy_(values)
grads_out = [torch.randn(B, H, L, D, generator=generator).to(dtype) for L in (M, N)]
last = max(v.storage_offset() + sum((s - 1) * st for s, st in zip(v.shape, v.stride())) for v in views)

same, exact = reference_bilateral_results(data, grads_out)
report = {"last_element_offset": last, "storage_bytes": storage.numel() * 2}
for backend in sys.argv[1:]:
    got = bilateral_results(views, grads_out, backend)
    report[backend] = [tolerance_report(g, s, e, dtype) for g, s, e in zip(got, same, exact)]
report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(report))
