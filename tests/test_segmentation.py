"""The Mask2Former-style segmentation decoder, its set loss, the synthetic shapes and the trainer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import spatialformer
from spatialformer import segmentation
from spatialformer.seg_data import NUM_CLASSES, make_shapes_dataset, semantic_targets
from spatialformer.seg_loss import HungarianMatcher, SetCriterion, pairwise_bce_cost, pairwise_dice_cost
from spatialformer.segmentation import (
    MaskedAttentionDecoder,
    attention_mask_from_mask_logits,
    build_segmenter,
    semantic_inference,
)
from spatialformer import train_seg
from spatialformer_kernels import available_backends
from spatialformer_kernels.reference import cross_attention_reference

TINY_BACKBONE = dict(embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1))
TINY_DECODER = dict(num_queries=8, hidden_dim=32, decoder_heads=2, decoder_layers=3, ffn_dim=64)
# Triton's interpreter needs minutes for a model; on CPU the C++ kernel stands in (as in test_training).
KERNEL_BACKENDS = [b for b in available_backends() if b == "cpu" or (b == "triton" and torch.cuda.is_available())]


def _tiny_segmenter(backend="reference", num_classes=3, **overrides):
    torch.manual_seed(0)
    return build_segmenter(
        "spatialformer_tiny", num_classes, backend=backend, **{**TINY_DECODER, **TINY_BACKBONE, **overrides}
    )


class _Spy:
    """Stands in for cross_attention inside segmentation.py: records each call's key count and attn_mask."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, scale=None, key_mask=None, attn_mask=None, backend="auto"):
        self.calls.append({"keys": k.shape[2], "attn_mask": attn_mask, "backend": backend})
        return cross_attention_reference(q, k, v, q.shape[-1] ** -0.5, key_mask, attn_mask=attn_mask)


# ---------------------------------------------------------------------------------------------- model


def test_outputs_have_mask2former_format_and_shapes():
    model = _tiny_segmenter(num_classes=3)
    outputs = model(torch.randn(2, 3, 64, 96))
    assert outputs["pred_logits"].shape == (2, 8, 4)  # K + 1 (no object last)
    assert outputs["pred_masks"].shape == (2, 8, 16, 24)  # stride 4
    assert outputs["query_scores"].shape == (2, 8)
    # one auxiliary output per layer: the initial queries' and every layer's but the last
    assert len(outputs["aux_outputs"]) == 3
    for aux in outputs["aux_outputs"]:
        assert aux.keys() == {"pred_logits", "pred_masks"}
        assert aux["pred_logits"].shape == (2, 8, 4) and aux["pred_masks"].shape == (2, 8, 16, 24)
    assert not torch.equal(outputs["aux_outputs"][-1]["pred_masks"], outputs["pred_masks"])
    labels = model.semantic_inference(outputs, (64, 96))
    assert labels.shape == (2, 64, 96) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 3


def test_decoder_defaults_follow_mask2former():
    decoder = MaskedAttentionDecoder(num_classes=5)
    assert len(decoder.layers) == 9 and decoder.hidden_dim == 256 and decoder.class_head.out_features == 6


def test_layers_visit_the_three_levels_round_robin_with_bool_masks(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(segmentation, "cross_attention", spy)
    model = _tiny_segmenter(decoder_layers=5)
    model(torch.randn(2, 3, 64, 64))
    # 64x64 images: reductions 32, 16, 8 -> 2x2, 4x4, 8x8 memories, coarse first, then again
    assert [call["keys"] for call in spy.calls] == [4, 16, 64, 4, 16]
    for call in spy.calls:
        mask = call["attn_mask"]
        assert mask.dtype == torch.bool and mask.shape == (2, 8, call["keys"])
        assert mask.any(-1).all()  # no query is left without a key
    assert all(call["backend"] == "reference" for call in spy.calls)


class _FixedMaskEmbeddings(torch.nn.Module):
    """A mask head that ignores the queries: each query gets a fixed embedding."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, queries):
        return self.embeddings.expand(queries.shape[0], -1, -1)


def test_a_query_with_an_empty_mask_attends_everywhere(monkeypatch):
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(
        num_classes=2, hidden_dim=16, num_heads=2, num_layers=3, ffn_dim=32, mask_dim=2, backend="reference"
    )
    # Per-pixel embeddings: channel 0 = +1 everywhere; channel 1 = +1 left half, -1 right half.
    mask_features = torch.ones(1, 2, 16, 16)
    mask_features[:, 1, :, 8:] = -1
    # query 0: empty mask; query 1: left half; query 2: everything
    decoder.mask_head = _FixedMaskEmbeddings(torch.tensor([[[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]))
    spy = _Spy()
    monkeypatch.setattr(segmentation, "cross_attention", spy)
    memories = [torch.randn(1, 16, s, s) for s in (2, 4, 8)]
    queries, query_pos = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    outputs = decoder(queries, query_pos, memories, mask_features)

    assert (outputs["aux_outputs"][0]["pred_masks"][0, 0] < 0).all()  # query 0's mask really is empty
    assert len(spy.calls) == 3
    for call, side in zip(spy.calls, (2, 4, 8)):
        mask = call["attn_mask"][0].reshape(3, side, side)
        assert mask[0].all()  # empty -> attend everywhere (Mask2Former's rule, applied by the decoder)
        assert mask[1, :, : side // 2].all() and not mask[1, :, side // 2 :].any()  # the left half only
        assert mask[2].all()


def test_attention_mask_threshold_resize_and_rule():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 1, :2, :2] = 5.0  # top-left quarter on
    logits[0, 2] = 5.0
    mask = attention_mask_from_mask_logits(logits, (2, 2))
    assert mask.tolist() == [[[True, True, True, True], [True, False, False, False], [True, True, True, True]]]
    # the threshold is sigmoid 0.5, i.e. logit 0: a barely-on pixel counts, a barely-off one does not
    barely = torch.tensor([0.2, -0.2, -0.2, -0.2]).reshape(1, 1, 2, 2)
    assert attention_mask_from_mask_logits(barely, (2, 2)).tolist() == [[[True, False, False, False]]]
    tiny = torch.full((1, 1, 4, 4), -5.0)
    tiny[0, 0, 0, 0] = 5.0  # on, but too small to survive the resize: then empty -> everywhere
    assert attention_mask_from_mask_logits(tiny, (1, 1)).tolist() == [[[True]]]


def test_positional_encodings_enter_queries_and_keys():
    torch.manual_seed(0)
    attn = segmentation.MaskedCrossAttention(16, num_heads=2, backend="reference")
    queries, query_pos, memory = torch.randn(1, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    memory_pos = segmentation._grid_position_encoding(2, 2, 16, memory.device)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    out = attn(queries, query_pos, memory, memory_pos, mask)
    assert not torch.allclose(out, attn(queries, query_pos, memory, memory_pos.flip(0), mask))
    assert not torch.allclose(out, attn(queries, query_pos.flip(1), memory, memory_pos, mask))


def test_sine_encoding_is_most_similar_at_the_same_place():
    codes = segmentation._grid_position_encoding(8, 8, 32, torch.device("cpu"))  # [64, 32]
    assert codes.shape == (64, 32) and codes.abs().max() <= 1
    assert torch.equal((codes @ codes.T).argmax(1), torch.arange(64))
    # a query at the centre of 16x16 candidate cell (5, 9) is encoded like the pixel there
    query = segmentation.sine_position_encoding(torch.tensor(5.5 / 16), torch.tensor(9.5 / 16), 32)
    assert torch.allclose(query, segmentation._grid_position_encoding(16, 16, 32, torch.device("cpu"))[5 * 16 + 9])


def test_query_positions_are_their_cell_centres():
    model = _tiny_segmenter()
    grid = segmentation._grid_position_encoding(16, 16, 32, torch.device("cpu"))
    positions = torch.tensor([[[0, 0], [5, 9], [15, 3]]])
    expected = grid[positions[..., 0] * 16 + positions[..., 1]]
    torch.testing.assert_close(model.query_position_encoding(positions), expected)


def test_gradients_reach_backbone_query_init_and_decoder():
    model = _tiny_segmenter()
    data = make_shapes_dataset(2, image_size=64)
    losses = SetCriterion(3)(model(data.images), [semantic_targets(label.clamp(max=2)) for label in data.labels])
    losses["loss"].backward()
    must_learn = [
        "backbone.patch_embed.proj.weight",
        "backbone.stages.0.blocks.0.attn.qkv_s.weight",  # BCA block: spatial stream
        "backbone.stages.3.blocks.0.attn.qkv.weight",
        "pixel_decoder.lateral.0.0.weight",
        "pixel_decoder.mask_projection.weight",
        "query_init.candidate_embedding",
        "query_init.score.weight",  # only through loss_query_score
        "query_proj.weight",
        "decoder.level_embedding.weight",
        "decoder.layers.0.cross_attn.q_proj.weight",
        "decoder.layers.0.cross_attn.k_proj.weight",
        "decoder.layers.2.self_attn.qk_proj.weight",
        "decoder.layers.2.ffn.0.weight",
        "decoder.class_head.weight",
        "decoder.mask_head.layers.4.weight",
    ]
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in must_learn:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        assert torch.isfinite(grads[name]).all(), name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["auto"])
def test_kernel_backend_matches_the_reference(backend):
    images = torch.randn(2, 3, 64, 64)
    reference = _tiny_segmenter("reference")(images)
    outputs = _tiny_segmenter(backend)(images)
    torch.testing.assert_close(outputs["pred_masks"], reference["pred_masks"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["pred_logits"], reference["pred_logits"], rtol=1e-4, atol=1e-4)


def test_build_segmenter_refuses_a_non_spatialformer_backbone():
    with pytest.raises(ValueError, match="not a SpatialFormer backbone"):
        build_segmenter("resnet10t", num_classes=3)


# ---------------------------------------------------------------------------------------------- inference


def test_semantic_inference_on_a_hand_built_output():
    logits = torch.full((1, 3, 4), -10.0)  # 3 queries, K = 3 classes + no object
    logits[0, 0, 1] = 10.0  # query 0: class 1, left half
    logits[0, 1, 2] = 10.0  # query 1: class 2, right half
    logits[0, 2, 3] = 10.0  # query 2: no object, whole image: must not count
    masks = torch.full((1, 3, 4, 4), -10.0)
    masks[0, 0, :, :2] = 10.0
    masks[0, 1, :, 2:] = 10.0
    masks[0, 2] = 10.0
    labels = semantic_inference({"pred_logits": logits, "pred_masks": masks}, (8, 8))
    expected = torch.tensor([1] * 4 + [2] * 4).expand(8, 8)
    assert torch.equal(labels[0], expected)
    # A confident no-object query whose remaining mass leans to class 0 must still not paint
    # class 0 over the image: the softmax includes the no-object column before dropping it.
    logits[0, 2, 0] = 2.0
    masks[0, :2] = torch.where(masks[0, :2] > 0, 1.0, -10.0)  # the real objects only fairly sure
    labels = semantic_inference({"pred_logits": logits, "pred_masks": masks}, (8, 8))
    assert torch.equal(labels[0], expected)


# ---------------------------------------------------------------------------------------------- loss


def _hand_built_case(permutation=(2, 0, 1), num_queries=5, num_classes=3):
    """Three target masks on an 8x8 image and a prediction that puts target j at query permutation[j]."""
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4], masks[1, 4:, :], masks[2, :4, 4:] = True, True, True
    target = {"labels": torch.tensor([2, 0, 1]), "masks": masks}
    logits = torch.full((1, num_queries, num_classes + 1), -20.0)
    logits[0, :, -1] = 20.0  # unmatched queries: confidently "no object"
    mask_logits = torch.full((1, num_queries, 8, 8), -20.0)
    for j, query in enumerate(permutation):
        logits[0, query] = -20.0
        logits[0, query, target["labels"][j]] = 20.0
        mask_logits[0, query] = torch.where(masks[j], 20.0, -20.0)
    return {"pred_logits": logits, "pred_masks": mask_logits}, [target]


def test_matcher_recovers_a_permutation():
    outputs, targets = _hand_built_case(permutation=(3, 0, 4))
    ((pred_index, target_index),) = HungarianMatcher()(outputs, targets)
    assert dict(zip(target_index.tolist(), pred_index.tolist())) == {0: 3, 1: 0, 2: 4}


def test_the_class_cost_decides_between_equal_masks():
    outputs, targets = _hand_built_case(permutation=(0, 1, 2))
    # query 3 predicts target 0's mask too, but with the right class at a higher probability
    outputs["pred_masks"][0, 3] = outputs["pred_masks"][0, 0]
    outputs["pred_logits"][0, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    outputs["pred_logits"][0, 3] = torch.tensor([0.0, 0.0, 5.0, 0.0])
    ((pred_index, target_index),) = HungarianMatcher()(outputs, targets)
    assert dict(zip(target_index.tolist(), pred_index.tolist())) == {0: 3, 1: 1, 2: 2}


def test_the_matching_cost_is_the_weighted_sum_of_its_three_terms():
    torch.manual_seed(2)
    logits, mask_logits = torch.randn(6, 4), torch.randn(6, 8, 8)
    target = {"labels": torch.tensor([1, 0]), "masks": torch.rand(2, 8, 8) > 0.5}
    flat_pred, flat_target = mask_logits.flatten(1), target["masks"].float().flatten(1)
    expected = (
        2.0 * -logits.softmax(-1)[:, target["labels"]]
        + 3.0 * pairwise_bce_cost(flat_pred, flat_target)
        + 7.0 * pairwise_dice_cost(flat_pred, flat_target)
    )
    torch.testing.assert_close(HungarianMatcher(2.0, 3.0, 7.0).cost_matrix(logits, mask_logits, target), expected)


def test_a_perfect_prediction_has_near_zero_loss_and_a_wrong_one_does_not():
    outputs, targets = _hand_built_case()
    losses = SetCriterion(3)(outputs, targets)
    assert losses["loss"] < 1e-3
    wrong = {k: v.clone() for k, v in outputs.items()}
    wrong["pred_logits"][0, 0] = wrong["pred_logits"][0, 0].roll(1)  # query 0 names the wrong class
    assert SetCriterion(3)(wrong, targets)["loss_ce"] > 1.0
    flipped = {k: v.clone() for k, v in outputs.items()}
    flipped["pred_masks"] = -flipped["pred_masks"]
    flipped_losses = SetCriterion(3)(flipped, targets)
    assert (
        flipped_losses["loss_mask"] > 1.0 and flipped_losses["loss_dice"] > 0.2
    )  # (re-matched: the best of bad options)


def test_targets_at_another_resolution_are_area_resized():
    outputs, targets = _hand_built_case()
    big = [
        {"labels": targets[0]["labels"], "masks": targets[0]["masks"].repeat_interleave(4, 1).repeat_interleave(4, 2)}
    ]
    assert SetCriterion(3)(outputs, big)["loss"] < 1e-3


def test_empty_targets_give_no_object_everywhere():
    outputs, _ = _hand_built_case()
    outputs["pred_logits"].requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}]
    ((pred_index, target_index),) = HungarianMatcher()(outputs, empty)
    assert pred_index.numel() == 0 and target_index.numel() == 0
    losses = SetCriterion(3)(outputs, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    assert losses["loss_ce"] > 1.0  # queries 0-2 claim objects that are not there
    losses["loss"].backward()
    assert outputs["pred_logits"].grad[0, :3, -1].lt(0).all()  # pushed towards "no object"


def test_no_object_weight_scales_the_unmatched_queries():
    outputs, targets = _hand_built_case()
    outputs["pred_logits"][0, 4] = 0.0  # an unmatched query, undecided
    low = SetCriterion(3, no_object_weight=0.1)(outputs, targets)["loss_ce"]
    high = SetCriterion(3, no_object_weight=1.0)(outputs, targets)["loss_ce"]
    assert high > 5 * low > 0


def test_every_auxiliary_output_is_matched_and_counted():
    outputs, targets = _hand_built_case(permutation=(2, 0, 1))
    aux, _ = _hand_built_case(permutation=(0, 1, 2))  # a different but also perfect assignment
    bad = {"pred_logits": torch.zeros_like(aux["pred_logits"]), "pred_masks": torch.zeros_like(aux["pred_masks"])}
    criterion = SetCriterion(3)
    losses = criterion({**outputs, "aux_outputs": [aux, bad]}, targets)
    assert losses["loss_ce_0"] < 1e-3 and losses["loss_ce_1"] > 0.5
    weighted = sum(
        criterion.weights[name] * losses[name + suffix] for name in criterion.weights for suffix in ("", "_0", "_1")
    )
    assert losses["loss"].item() == pytest.approx(weighted.item(), rel=1e-6)


def test_pairwise_costs_equal_the_losses_of_each_pair():
    torch.manual_seed(1)
    logits, targets = torch.randn(4, 30), (torch.rand(3, 30) > 0.5).float()
    bce, dice = pairwise_bce_cost(logits, targets), pairwise_dice_cost(logits, targets)
    for i in range(4):
        for j in range(3):
            expected_bce = F.binary_cross_entropy_with_logits(logits[i], targets[j])
            p = logits[i].sigmoid()
            expected_dice = 1 - (2 * (p * targets[j]).sum() + 1) / (p.sum() + targets[j].sum() + 1)
            assert bce[i, j].item() == pytest.approx(expected_bce.item(), rel=1e-5)
            assert dice[i, j].item() == pytest.approx(expected_dice.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- data


def test_shapes_are_deterministic_split_and_prefix_stable():
    first, again = make_shapes_dataset(6, seed=3), make_shapes_dataset(6, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    prefix = make_shapes_dataset(2, seed=3)
    assert torch.equal(prefix.images, first.images[:2])
    heldout, other_seed = make_shapes_dataset(6, seed=3, split="heldout"), make_shapes_dataset(6, seed=4)
    assert not any(torch.equal(a, b) for a in first.labels for b in heldout.labels)
    assert not torch.equal(first.images, other_seed.images)
    assert first.images.shape == (6, 3, 64, 64) and first.labels.shape == (6, 64, 64)
    assert first.images.min() >= -1 and first.images.max() <= 1
    assert (first.labels > 0).flatten(1).any(1).all()  # every image has a shape
    assert set(torch.unique(make_shapes_dataset(40).labels).tolist()) == set(range(NUM_CLASSES))
    shape_only = make_shapes_dataset(6, seed=3, colour_hint=False)
    assert torch.equal(shape_only.images, make_shapes_dataset(6, seed=3, colour_hint=False).images)
    assert not torch.equal(shape_only.images, first.images)


def test_semantic_targets_partition_the_image():
    labels = make_shapes_dataset(3, image_size=32).labels
    for label_map in labels:
        target = semantic_targets(label_map)
        assert target["labels"].tolist() == sorted(torch.unique(label_map).tolist())
        assert torch.equal(target["masks"].sum(0), torch.ones_like(label_map))
        assert torch.equal(target["labels"][target["masks"].int().argmax(0)], label_map)
    ignored = torch.tensor([[0, 255], [2, 2]])
    assert semantic_targets(ignored)["labels"].tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------- trainer


def test_miou_on_a_hand_built_confusion():
    labels = torch.tensor([[0, 0, 1, 1]])
    predicted = torch.tensor([[0, 1, 1, 1]])
    iou = train_seg.iou_from_confusion(train_seg.confusion_matrix(predicted, labels, 3))
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and math.isnan(iou[2])
    assert train_seg.mean_iou(iou) == pytest.approx((0.5 + 2 / 3) / 2)


def _smoke_config(steps):
    return train_seg.SegTrainConfig(
        steps=steps,
        batch_size=4,
        train_size=12,
        heldout_size=4,
        eval_every=2,
        checkpoint_every=2,
        warmup_steps=2,
        embed_dims=(32, 32, 64, 64),
        backbone_heads=(1, 1, 2, 2),
        num_queries=6,
        hidden_dim=32,
        decoder_layers=2,
        ffn_dim=64,
    )


def test_train_smoke_checkpoint_and_exact_resume(tmp_path):
    quiet = lambda *_: None
    straight = train_seg.train(_smoke_config(4), tmp_path / "a", progress=False, log=quiet)
    # a run stopped after 2 steps (its warm-up covers both, so its learning rates are the
    # 4-step run's), then resumed to 4
    first = train_seg.train(_smoke_config(2), tmp_path / "b", progress=False, log=quiet)
    resumed = train_seg.train(_smoke_config(4), tmp_path / "b", resume=True, progress=False, log=quiet)
    assert [step for step, _ in resumed["history"]] == [2, 3]
    assert first["history"] + resumed["history"] == straight["history"]
    assert all(math.isfinite(loss) for _, loss in straight["history"])

    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert [record["step"] for record in curve] == [2, 4]
    assert all(0 <= record["miou"] <= 1 and len(record["iou"]) == NUM_CLASSES for record in curve)
    assert (tmp_path / "a" / "curve.csv").read_text().startswith("step,wall_s,train_loss,miou,iou_background")
    resumed_curve = json.loads((tmp_path / "b" / "curve.json").read_text())
    assert [record["step"] for record in resumed_curve] == [2, 4]
    assert resumed_curve[-1]["miou"] == curve[-1]["miou"]
    assert resumed_curve[-1]["wall_s"] >= resumed_curve[0]["wall_s"]

    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_package_exports():
    assert spatialformer.build_segmenter is build_segmenter
    assert spatialformer.semantic_inference is semantic_inference
    assert spatialformer.SetCriterion is SetCriterion


def test_swap_attention_reaches_the_decoder_layers():
    """swap_attention switches the decoder's masked cross-attention and query self-attention
    with the backbone's layers, and the swapped model gives the reference model's outputs."""
    model = _tiny_segmenter("reference")
    images = torch.randn(2, 3, 64, 64)
    reference = model(images)
    summary = spatialformer.swap_attention(model, "auto")
    assert len(summary.decoder) == 2 * TINY_DECODER["decoder_layers"], summary.decoder
    assert all(name.startswith("decoder.") for name in summary.decoder) and summary.bilateral and summary.joint
    assert "segmentation decoder attention" in str(summary)
    layers = [m for m in model.modules() if isinstance(m, spatialformer.swap.ATTENTION_LAYERS)]
    assert layers and all(m.backend == "auto" for m in layers)
    swapped = model(images)
    torch.testing.assert_close(swapped["pred_masks"], reference["pred_masks"], rtol=1e-4, atol=1e-4)
