"""Whole-model benchmark: SpatialFormer images per second, per kernel backend, on the
measurement core of `spatialformer_kernels.bench` (which never imports the models; the
pytest suite benchmarks/test_throughput.py runs these rows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
from typing import Optional

import timm
import torch
import torch.nn.functional as F

from spatialformer_kernels import dispatch
from spatialformer_kernels.bench.measurement import measure, peak_memory
from spatialformer_kernels.bench.workload import DTYPE_NAMES
from spatialformer_kernels.testing import assert_close

MODEL_VARIANTS = ("tiny", "small", "base")


def model_backends(device: torch.device) -> list[str]:
    """The model paths to compare: each kernel backend that runs on the device (Triton only on
    CUDA: its interpreter is far too slow for a whole model), and the reference."""
    kernels = [b for b in dispatch.runnable_backends(device) if b != "reference"]
    return [b for b in kernels if b != "triton" or device.type == "cuda"] + ["reference"]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_model_parity(variant: str, backend: str, device: torch.device, dtype: torch.dtype, batch: int, img_size: int) -> None:
    """Logits of the `backend` path match the reference path (same weights) under the tolerance rule."""
    torch.manual_seed(0)
    reference = timm.create_model(f"spatialformer_{variant}", backend="reference").to(device).eval()
    model = timm.create_model(f"spatialformer_{variant}", backend=backend).to(device).eval()
    model.load_state_dict(reference.state_dict())
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        with _autocast(device, dtype):
            actual, same = model(images), reference(images)
        exact = reference.double()(images.double())
    assert_close(actual.to(same.dtype), same, exact, dtype if dtype != torch.float32 else torch.float32, f"spatialformer_{variant} logits ({backend})")


@dataclasses.dataclass
class ModelRow:
    model: str
    mode: str  # "inference" or "train"
    backend: str
    batch: int
    img_size: int
    dtype: str
    median_ms: float
    images_per_s: float
    repeats: int
    peak_mem_bytes: Optional[int]
    peak_mem_method: str
    speedup: Optional[float] = None  # reference time / this time
    samples_s: list = dataclasses.field(default_factory=list, repr=False)

    def metrics(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("samples_s")
        return out


def bench_model(
    variant: str, backend: str, mode: str, device: torch.device, dtype: torch.dtype, batch: int, img_size: int,
    budget_s: float = 1.0,
) -> ModelRow:  # fmt: skip
    """Images per second of SpatialFormer-<variant>: inference forward, or a training step
    (forward, cross-entropy, backward, AdamW step)."""
    torch.manual_seed(0)
    model = timm.create_model(f"spatialformer_{variant}", backend=backend).to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, dtype):
                return model(images)

    elif mode == "train":
        model.train()
        labels = torch.randint(0, model.num_classes, (batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

    else:
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    samples = measure(step, device, budget_s=budget_s, min_repeats=3, warmup=2)
    peak, method = peak_memory(step, device)
    median = statistics.median(samples)
    return ModelRow(
        f"spatialformer_{variant}", mode, backend, batch, img_size, DTYPE_NAMES[dtype], median * 1e3,
        batch / median, len(samples), peak, method, samples_s=samples,
    )  # fmt: skip
