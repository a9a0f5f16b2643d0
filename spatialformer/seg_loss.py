"""Mask2Former's set-prediction loss: Hungarian matching, then class, mask (BCE) and dice losses.

Targets, per image, as Mask2Former expects: {"labels": int64 [T], "masks": [T, H, W]} (bool
or float, any resolution; T may be 0). For semantic segmentation that is one mask per class
present in the image (`seg_data.semantic_targets`).

Masks are compared at full resolution of the predictions (stride 4), not on sampled points:
the targets are area-resized to the prediction size (a soft value at object borders), which
at the image sizes this package trains on (64-512 px) costs less than point sampling's
gathers, and keeps the matching cost and the loss exactly the quantities they are named for.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HungarianMatcher", "SetCriterion", "dice_loss", "mask_bce_loss", "pairwise_bce_cost", "pairwise_dice_cost"]

Target = Dict[str, Tensor]
Matching = List[Tuple[Tensor, Tensor]]  # per image: (prediction indices, target indices), int64


def resize_target_masks(masks: Tensor, size: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Target masks [T, H, W] -> [T, h, w] float in [0, 1], area-averaged (each value = the covered fraction)."""
    masks = masks.to(dtype)
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks.unsqueeze(1), size=tuple(size), mode="area").squeeze(1)


def pairwise_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean per-pixel sigmoid BCE between every prediction and every target: [Q, P] x [T, P] -> [Q, T].

    BCE(x, t) = softplus(x) - x * t, so the pairwise mean is one matmul, never [Q, T, P].
    """
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.T) / logits.shape[-1]


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - soft dice between every sigmoid prediction and every target: [Q, P] x [T, P] -> [Q, T]."""
    probs = logits.sigmoid()
    overlap = 2 * probs @ targets.T
    return 1 - (overlap + 1) / (probs.sum(-1, keepdim=True) + targets.sum(-1)[None, :] + 1)


def mask_bce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sigmoid BCE of matched pairs [N, P], mean over pixels, summed over pairs, divided by num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 - soft dice of matched pairs [N, P], summed over pairs, divided by num_masks (+1 smoothing:
    an empty target matched to an empty prediction costs nothing)."""
    probs = logits.sigmoid()
    dice = (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)
    return (1 - dice).sum() / num_masks


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets per image, minimising
    cost_class * (-P(target class)) + cost_mask * BCE + cost_dice * (1 - dice).

    The class cost uses probabilities, not log-probabilities, as Mask2Former does, so an
    uncertain class does not dominate a good mask. Weights default to Mask2Former's (2, 5, 5).
    Returns per image (prediction indices, target indices), sorted by prediction index, with
    min(Q, T) pairs (scipy's linear_sum_assignment).
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice

    def cost_matrix(self, logits: Tensor, mask_logits: Tensor, target: Target) -> Tensor:
        """The [Q, T] cost for one image: logits [Q, K+1], mask_logits [Q, h, w]."""
        probs = logits.float().softmax(-1)
        labels = target["labels"]
        flat_pred = mask_logits.float().flatten(1)
        flat_target = resize_target_masks(target["masks"], mask_logits.shape[-2:], torch.float32).flatten(1)
        return (
            self.cost_class * -probs[:, labels]
            + self.cost_mask * pairwise_bce_cost(flat_pred, flat_target)
            + self.cost_dice * pairwise_dice_cost(flat_pred, flat_target)
        )

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: Sequence[Target]) -> Matching:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as error:  # scipy is in install_requires; say so if an environment lacks it
            raise ModuleNotFoundError(
                "the set-prediction matcher needs scipy: pip install scipy", name="scipy"
            ) from error

        matching: Matching = []
        for logits, mask_logits, target in zip(outputs["pred_logits"], outputs["pred_masks"], targets, strict=True):
            device = logits.device
            if target["labels"].numel() == 0:
                empty = torch.empty(0, dtype=torch.int64, device=device)
                matching.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, mask_logits, target).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            matching.append(
                (
                    torch.as_tensor(rows, dtype=torch.int64, device=device),
                    torch.as_tensor(cols, dtype=torch.int64, device=device),
                )
            )
        return matching


class SetCriterion(nn.Module):
    """Mask2Former's loss on the main and every auxiliary output, each matched on its own.

    Per output: cross-entropy over K+1 classes for every query (matched queries to their
    target's class, the rest to "no object", whose class weight is `no_object_weight` so the
    ~95% unmatched queries do not drown the rest), and for matched queries the mask BCE and
    dice losses, normalised by the number of target masks in the batch. With
    "query_scores" in the outputs (SpatialFormerSegmenter), a BCE teaches SpatialQueryInit's
    scorer which candidates end up matched in the main output.

    forward(outputs, targets) -> dict: "loss" (the weighted total to backpropagate), and the
    unweighted terms "loss_ce", "loss_mask", "loss_dice" of the main output, "loss_ce_0" ...
    of aux output 0 ..., and "loss_query_score".
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        query_score_weight: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(class_weight, mask_weight, dice_weight)
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.query_score_weight = query_score_weight
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def output_losses(
        self, output: Dict, targets: Sequence[Target], num_masks: float
    ) -> Tuple[Dict[str, Tensor], Matching]:
        """The three terms of one output (main or auxiliary) and its matching."""
        logits, mask_logits = output["pred_logits"], output["pred_masks"]
        matching = self.matcher(output, targets)
        batch, num_queries = logits.shape[:2]
        target_classes = torch.full((batch, num_queries), self.num_classes, dtype=torch.int64, device=logits.device)
        for image, (pred_index, target_index) in enumerate(matching):
            target_classes[image, pred_index] = targets[image]["labels"][target_index]
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.class_weights.to(logits.device))

        size = mask_logits.shape[-2:]
        matched_pred = [mask_logits[image, pred_index] for image, (pred_index, _) in enumerate(matching)]
        matched_target = [
            resize_target_masks(targets[image]["masks"][target_index], size, torch.float32)
            for image, (_, target_index) in enumerate(matching)
        ]
        pred = torch.cat(matched_pred).float().flatten(1)
        target = torch.cat(matched_target).flatten(1).to(pred.device)
        losses = {
            "loss_ce": loss_ce,
            "loss_mask": mask_bce_loss(pred, target, num_masks),
            "loss_dice": dice_loss(pred, target, num_masks),
        }
        return losses, matching

    def forward(self, outputs: Dict, targets: Sequence[Target]) -> Dict[str, Tensor]:
        # Clamped at 1: a batch of empty images still gives finite (class-only) losses.
        num_masks = float(max(sum(int(t["labels"].numel()) for t in targets), 1))
        # Every output predicts masks at the same size: resize the targets once, not per output.
        size = outputs["pred_masks"].shape[-2:]
        targets = [{**t, "masks": resize_target_masks(t["masks"], size, torch.float32)} for t in targets]
        losses, matching = self.output_losses(outputs, targets, num_masks)
        total = sum(self.weights[name] * value for name, value in losses.items())
        for index, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses, _ = self.output_losses(aux, targets, num_masks)
            total = total + sum(self.weights[name] * value for name, value in aux_losses.items())
            losses.update({f"{name}_{index}": value for name, value in aux_losses.items()})
        if "query_scores" in outputs and self.query_score_weight:
            scores = outputs["query_scores"].float()
            matched = torch.zeros_like(scores)
            for image, (pred_index, _) in enumerate(matching):
                matched[image, pred_index] = 1.0
            losses["loss_query_score"] = F.binary_cross_entropy_with_logits(scores, matched)
            total = total + self.query_score_weight * losses["loss_query_score"]
        losses["loss"] = total
        return losses
