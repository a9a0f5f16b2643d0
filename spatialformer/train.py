"""Train a reduced SpatialFormer end to end on scikit-learn's digits.

Needs the `train` extra (`pip install "spatialformer-kernels[train]"`, or `pip install
".[train]"` in a checkout), which brings scikit-learn: the 1,797 8x8 digit images ship inside
it, so nothing is downloaded at run time. They are upsampled to 32x32 RGB. Checkpoints
(model, optimizer, RNG state, step) are safetensors files, and a resumed run continues
exactly where it stopped. Under torchrun (WORLD_SIZE > 1) it trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); each rank takes an interleaved share
of every global batch, so the gradients equal one process's on the combined batch.

    python -m spatialformer.train --steps 300 --backend auto --out runs/digits
    torchrun --nproc-per-node 2 -m spatialformer.train --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .spatialformer import SpatialFormer

IMAGE_SIZE = 32
NUM_CLASSES = 10


def load_digits_split(device: str | torch.device = "cpu", test_fraction: float = 0.2, seed: int = 0):
    """(train_images, train_labels, test_images, test_labels): images [n, 3, 32, 32] normalised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ModuleNotFoundError(
            "spatialformer.train trains on scikit-learn's digits, and scikit-learn is not installed: "
            'pip install "spatialformer-kernels[train]" (or pip install ".[train]" in a checkout)',
            name="sklearn",
        ) from error

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return tuple(t.to(device) for t in (images[train], labels[train], images[test], labels[test]))


def make_model(backend: Optional[str] = "auto", seed: int = 0) -> SpatialFormer:
    """A reduced SpatialFormer (head dim 32, one block per stage) for 32x32 digits."""
    torch.manual_seed(seed)
    return SpatialFormer(
        embed_dims=(32, 64, 64, 96), num_heads=(1, 2, 2, 3), depths=(1, 1, 1, 1), num_classes=NUM_CLASSES, backend=backend
    )


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of a step: a fixed permutation per epoch, so a resumed run sees the same data."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size]


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    metadata = {"step": str(step), "param_groups": json.dumps(optim_state["param_groups"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG state; return the step to continue from."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    return int(metadata["step"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(labels), batch_size)
    )
    model.train()
    return correct / len(labels)


def train(
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    backend: Optional[str] = "auto",
    out: Optional[Path] = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train and return {"history": [(step, loss, accuracy)], "test_accuracy": float}.

    loss/accuracy are those of the global batch (on every rank under DDP).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    device = torch.device("cpu")
    if distributed:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")

    train_x, train_y, test_x, test_y = load_digits_split(device)
    model = make_model(backend, seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    start = 0
    checkpoint = Path(out) / "checkpoint.safetensors" if out is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        start = load_checkpoint(checkpoint, model, optimizer)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    history = []
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress or rank != 0, desc="train")
    for step in bar:
        index = batch_indices(step, batch_size, len(train_y), seed).to(device)
        local = index[rank::world]
        logits = wrapped(train_x[local])
        loss = F.cross_entropy(logits, train_y[local])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats = torch.stack([loss.detach() * len(local), (logits.argmax(-1) == train_y[local]).sum().float()])
        if distributed:
            dist.all_reduce(stats)
        global_loss, accuracy = (stats / batch_size).tolist()
        history.append((step, global_loss, accuracy))
        bar.set_postfix(loss=f"{global_loss:.3f}", acc=f"{accuracy:.2f}")
        done = step + 1
        if checkpoint is not None and rank == 0 and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(checkpoint, model, optimizer, done)
    test_accuracy = evaluate(model, test_x, test_y)
    if distributed:
        dist.destroy_process_group()
    return {"history": history, "test_accuracy": test_accuracy}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args(argv)
    result = train(args.steps, args.batch_size, args.lr, args.backend, args.out, args.resume, args.checkpoint_every)
    if int(os.environ.get("RANK", "0")) == 0:
        for step, loss, accuracy in result["history"][:: max(1, len(result["history"]) // 10)]:
            print(f"step {step + 1:5d}  loss {loss:.4f}  batch accuracy {accuracy:.3f}")
        print(f"test accuracy {result['test_accuracy']:.3f} (checkpoint: {args.out / 'checkpoint.safetensors'})")


if __name__ == "__main__":
    main()
