"""Train a small SpatialFormer segmenter on the synthetic shapes (spatialformer.seg_data).

Mask2Former's recipe at CPU scale: the set-prediction loss on the main and every auxiliary
output (spatialformer.seg_loss), AdamW, linear warm-up then cosine decay, gradient clipping.
The model is deliberately small so that a 2-core CPU reaches a useful mIoU in minutes: a
one-block-per-stage SpatialFormer (widths 32-128), a 64-wide decoder with 3 layers (one
round over the three feature levels; the decoder class defaults to Mask2Former's 9) and 20
queries; each is a flag. Every `--eval-every` steps it measures mIoU on the held-out split,
prints it and appends it to OUT/curve.json and OUT/curve.csv (step, wall time, train loss,
mIoU, per-class IoU). Checkpoints are safetensors files written by spatialformer.train's
helpers (model, optimizer, RNG, step); `--resume` continues exactly where a run stopped.

    python -m spatialformer.train_seg --steps 1200 --out runs/shapes
    python -m spatialformer.train_seg --steps 2000 --out runs/shapes --resume
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from .seg_data import CLASS_NAMES, NUM_CLASSES, ShapesDataset, make_shapes_dataset
from .seg_loss import SetCriterion
from .segmentation import SpatialFormerSegmenter, build_segmenter, semantic_inference
from .train import batch_indices, load_checkpoint, save_checkpoint

CHECKPOINT_NAME = "checkpoint.safetensors"
PROGRESS_NAME = "progress.json"  # the checkpoint's step and the wall time spent up to it
CURVE_JSON, CURVE_CSV = "curve.json", "curve.csv"


@dataclass
class SegTrainConfig:
    """Everything a run depends on (saved to OUT/config.json for the record)."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    image_size: int = 64
    train_size: int = 2000
    heldout_size: int = 256
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    colour_hint: bool = True  # shape colours hint at the class (seg_data); False: shape only, slower to learn
    backend: Optional[str] = "auto"
    # backbone: a reduced spatialformer_tiny (head dim 32 as in the paper's models)
    embed_dims: Sequence[int] = (32, 64, 96, 128)
    backbone_heads: Sequence[int] = (1, 2, 3, 4)
    depths: Sequence[int] = (1, 1, 1, 1)
    # decoder
    num_queries: int = 20
    hidden_dim: int = 64
    decoder_heads: int = 2
    decoder_layers: int = 3
    ffn_dim: int = 128
    pixel_decoder_convs: int = 1


def make_seg_model(config: SegTrainConfig) -> SpatialFormerSegmenter:
    torch.manual_seed(config.seed)
    return build_segmenter(
        "spatialformer_tiny",
        num_classes=NUM_CLASSES,
        num_queries=config.num_queries,
        hidden_dim=config.hidden_dim,
        decoder_heads=config.decoder_heads,
        decoder_layers=config.decoder_layers,
        ffn_dim=config.ffn_dim,
        pixel_decoder_convs=config.pixel_decoder_convs,
        backend=config.backend,
        embed_dims=tuple(config.embed_dims),
        num_heads=tuple(config.backbone_heads),
        depths=tuple(config.depths),
    )


def learning_rate(step: int, config: SegTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak: a function of the step alone, so a resumed run matches."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = true class, columns = predicted class."""
    index = labels.flatten() * num_classes + predicted.flatten()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> List[float]:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class that is neither present nor predicted."""
    true_positive = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - true_positive
    return (true_positive / union).tolist()  # 0/0 = nan: left out of the mean


def mean_iou(per_class: Sequence[float]) -> float:
    valid = [value for value in per_class if not math.isnan(value)]
    return sum(valid) / len(valid) if valid else float("nan")


@torch.no_grad()
def evaluate_miou(model: SpatialFormerSegmenter, data: ShapesDataset, batch_size: int = 64) -> Dict:
    """{"miou": float, "iou": [per class]} of `model`'s semantic inference on `data`."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        images, labels = data.images[start : start + batch_size], data.labels[start : start + batch_size]
        predicted = semantic_inference(model(images), labels.shape[-2:])
        confusion += confusion_matrix(predicted.cpu(), labels.cpu(), NUM_CLASSES)
    model.train(was_training)
    per_class = iou_from_confusion(confusion)
    return {"miou": mean_iou(per_class), "iou": per_class}


def _read_curve(out: Path, up_to_step: int) -> List[Dict]:
    """The curve logged before a resume, without evaluations past the checkpoint (they will be redone)."""
    path = out / CURVE_JSON
    if not path.exists():
        return []
    return [record for record in json.loads(path.read_text()) if record["step"] <= up_to_step]


def _write_curve(out: Path, curve: List[Dict]) -> None:
    (out / CURVE_JSON).write_text(json.dumps(curve, indent=1))
    with open(out / CURVE_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "wall_s", "train_loss", "miou"] + [f"iou_{name}" for name in CLASS_NAMES])
        for record in curve:
            writer.writerow(
                [record["step"], f"{record['wall_s']:.1f}", f"{record['train_loss']:.4f}", f"{record['miou']:.4f}"]
                + [f"{value:.4f}" for value in record["iou"]]
            )


def train(
    config: SegTrainConfig, out: Optional[Path] = None, resume: bool = False, progress: bool = True, log=print
) -> Dict:
    """Train and return {"history": [(step, loss)], "curve": [eval records], "final_miou": float}.

    Without `out`, nothing is written (no checkpoint, no curve files). Evaluations happen at
    every multiple of eval_every and at the last step; wall_s counts from the run's first
    step, across resumes, evaluations included.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_data = make_shapes_dataset(config.train_size, config.image_size, config.seed, "train", config.colour_hint).to(
        device
    )
    heldout = make_shapes_dataset(
        config.heldout_size, config.image_size, config.seed, "heldout", config.colour_hint
    ).to(device)
    model = make_seg_model(config).to(device)
    criterion = SetCriterion(NUM_CLASSES).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    start, wall_before, curve = 0, 0.0, []
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / CHECKPOINT_NAME
        if resume and checkpoint.exists():
            start = load_checkpoint(checkpoint, model, optimizer)
            saved = json.loads((out / PROGRESS_NAME).read_text()) if (out / PROGRESS_NAME).exists() else {}
            wall_before = float(saved.get("wall_s", 0.0))
            curve = _read_curve(out, start)
            log(f"resumed from {checkpoint} at step {start}")
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1))

    history: List = []
    window: List[float] = []
    began = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="train_seg")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        index = batch_indices(step, config.batch_size, len(train_data), config.seed).to(device)
        outputs = model(train_data.images[index])
        loss = criterion(outputs, train_data.targets(index))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        history.append((step, loss.item()))
        window.append(loss.item())
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            result = evaluate_miou(model, heldout)
            wall = wall_before + time.perf_counter() - began
            record = {"step": done, "wall_s": wall, "train_loss": sum(window) / len(window), **result}
            window.clear()
            curve.append(record)
            bar.set_postfix(loss=f"{loss.item():.2f}", miou=f"{record['miou']:.3f}")
            log(
                f"step {done:5d}  wall {wall:7.1f} s  train loss {record['train_loss']:.3f}  "
                f"heldout mIoU {record['miou']:.3f}  "
                + "  ".join(f"{name} {value:.2f}" for name, value in zip(CLASS_NAMES, record["iou"]))
            )
            if out is not None:
                _write_curve(out, curve)
        else:
            bar.set_postfix(loss=f"{loss.item():.2f}")
        if out is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(out / CHECKPOINT_NAME, model, optimizer, done)
            wall = wall_before + time.perf_counter() - began
            (out / PROGRESS_NAME).write_text(json.dumps({"step": done, "wall_s": wall}))
    final = curve[-1]["miou"] if curve else evaluate_miou(model, heldout)["miou"]
    return {"history": history, "curve": curve, "final_miou": final}


def main(argv: Optional[List[str]] = None) -> None:
    defaults = SegTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in (
        "steps",
        "batch_size",
        "image_size",
        "train_size",
        "heldout_size",
        "eval_every",
        "checkpoint_every",
        "seed",
        "num_queries",
        "hidden_dim",
        "decoder_heads",
        "decoder_layers",
        "ffn_dim",
        "pixel_decoder_convs",
        "warmup_steps",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "grad_clip"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("embed_dims", "backbone_heads", "depths"):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            nargs=4,
            default=list(getattr(defaults, name)),
            help="per backbone stage",
        )
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    parser.add_argument("--shape-only", action="store_true", help="shape colours say nothing about the class")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = vars(parser.parse_args(argv))
    out, resume, progress = args.pop("out"), args.pop("resume"), not args.pop("no_progress")
    config = SegTrainConfig(colour_hint=not args.pop("shape_only"), **args)
    try:
        result = train(config, out, resume, progress, log=tqdm.write if progress else print)
    except KeyboardInterrupt:
        saved = out / PROGRESS_NAME
        step = json.loads(saved.read_text())["step"] if saved.exists() else 0
        raise SystemExit(f"interrupted; the last checkpoint is at step {step}: continue with --resume")
    print(
        f"final heldout mIoU {result['final_miou']:.3f} (curve: {out / CURVE_CSV}, checkpoint: {out / CHECKPOINT_NAME})"
    )


if __name__ == "__main__":
    main()
