"""swap_attention and SpatialQueryInit."""
import pytest
import timm
import torch

import spatialformer
from spatialformer import SpatialQueryInit, swap_attention
from spatialformer_kernels import available_backends


def _small_model(backend):
    torch.manual_seed(0)
    return spatialformer.SpatialFormer(
        embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1), num_classes=5, backend=backend
    ).eval()


KERNEL_BACKENDS = [b for b in available_backends() if b != "reference"]


@pytest.mark.parametrize("target", KERNEL_BACKENDS + ["auto"])
def test_swap_from_a_reference_checkpoint_keeps_weights_and_outputs(target):
    saved = _small_model("reference").state_dict()
    model = _small_model("reference")
    model.load_state_dict(saved)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    summary = swap_attention(model, target)
    assert summary.num_swapped == 4 and len(summary.bilateral) == 2 and len(summary.joint) == 2
    assert set(summary.previous.values()) == {"reference"}
    assert "swapped 4 attention layers" in str(summary)
    assert list(model.state_dict()) == list(saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    assert all(m.backend == target for m in model.modules() if hasattr(m, "backend"))


def test_swap_to_none_follows_process_default():
    model = _small_model("auto")
    swap_attention(model, None)
    with spatialformer.use_backend("reference"):
        assert all(m._backend() == "reference" for m in model.modules() if isinstance(m, spatialformer.BilateralCrossAttention))


def test_swap_refuses_bad_requests_before_changing_anything():
    model = _small_model("reference")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        swap_attention(model, "gpu")
    with pytest.raises(ValueError, match="Linear has no SpatialFormer attention layer"):
        swap_attention(torch.nn.Linear(2, 2))
    for missing in {"triton", "cpu"} - set(available_backends()):
        with pytest.raises(RuntimeError, match="not available"):
            swap_attention(model, missing)
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))


def test_swap_works_on_timm_created_models():
    model = timm.create_model("spatialformer_tiny", backend="reference")
    assert swap_attention(model, "auto").num_swapped == 2 + 2 + 6 + 2


def test_query_init_shapes_topk_and_positions():
    torch.manual_seed(0)
    init = SpatialQueryInit(dim=16)
    tokens = torch.randn(3, 64, 16)
    out = init(tokens)
    assert out.queries.shape == (3, 100, 16) and out.scores.shape == (3, 100) and out.positions.shape == (3, 100, 2)
    # top-k: the kept scores are the 100 largest of all 256 candidates, in descending order
    candidates = init.norm(tokens.repeat_interleave(2, 1).view(3, 8, 16, 16).repeat_interleave(2, 1).reshape(3, 256, 16) + init.candidate_embedding)
    all_scores = init.score(candidates).squeeze(-1)
    torch.testing.assert_close(out.scores, all_scores.sort(dim=1, descending=True).values[:, :100])
    # each kept query is its candidate, and the candidate at (row, col) replicates token (row//2, col//2)
    flat = out.positions[..., 0] * 16 + out.positions[..., 1]
    torch.testing.assert_close(out.queries, torch.gather(candidates, 1, flat[..., None].expand(-1, -1, 16)))
    assert out.positions.min() >= 0 and out.positions.max() <= 15


def test_query_init_replicas_of_one_token_differ_only_by_embedding():
    init = SpatialQueryInit(dim=8, num_queries=256)
    with torch.no_grad():
        init.candidate_embedding.zero_()
    out = init(torch.randn(1, 64, 8))
    rows, cols = out.positions[0, :, 0], out.positions[0, :, 1]
    cell = (rows // 2) * 8 + cols // 2
    for token in range(64):
        copies = out.queries[0, cell == token]
        assert copies.shape[0] == 4 and torch.allclose(copies, copies[:1].expand_as(copies))


def test_query_init_gradients_flow_to_tokens_embedding_and_scorer():
    init = SpatialQueryInit(dim=16)
    tokens = torch.randn(2, 64, 16, requires_grad=True)
    out = init(tokens)
    (out.queries.square().sum() + out.scores.sum()).backward()
    assert tokens.grad.abs().sum() > 0
    assert init.candidate_embedding.grad.abs().sum() > 0
    assert init.score.weight.grad.abs().sum() > 0


def test_query_init_validates():
    with pytest.raises(ValueError, match=r"num_queries must be in 1..256"):
        SpatialQueryInit(8, num_queries=300)
    with pytest.raises(ValueError, match=r"spatial_tokens must be \[B, 64, C\]"):
        SpatialQueryInit(8)(torch.randn(2, 49, 8))
