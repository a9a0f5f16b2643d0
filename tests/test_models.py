"""SpatialFormer-T/S/B in timm: creation, outputs, features, intermediates, training step."""
import pytest
import timm
import torch

import spatialformer  # noqa: F401  (registers the models)
from spatialformer import SpatialFormer
from spatialformer_kernels import available_backends

TABLE = {  # docs/design.md section 3: channels, heads, blocks per stage
    "spatialformer_tiny": ((64, 128, 256, 320), (2, 4, 8, 10), (2, 2, 6, 2)),
    "spatialformer_small": ((64, 128, 320, 448), (2, 4, 10, 14), (3, 4, 6, 3)),
    "spatialformer_base": ((64, 128, 320, 512), (2, 4, 10, 16), (3, 6, 18, 3)),
}


def _tiny_config(**kwargs):
    return SpatialFormer(
        embed_dims=(16, 32, 32, 48), num_heads=(1, 1, 1, 2), depths=(1, 1, 1, 1), num_classes=7, **kwargs
    )


def test_registered_in_timm():
    assert set(TABLE) <= set(timm.list_models("spatialformer_*"))


@pytest.mark.parametrize("name", list(TABLE))
def test_architecture_matches_design_table(name):
    model = timm.create_model(name)
    dims, heads, depths = TABLE[name]
    for stage, dim, head, depth, kind in zip(model.stages, dims, heads, depths, ("bca", "bca", "sa", "sa")):
        assert len(stage.blocks) == depth
        block = stage.blocks[0]
        assert isinstance(block, spatialformer.BCABlock if kind == "bca" else spatialformer.SABlock)
        assert block.attn.num_heads == head
        norm = block.norm_s if kind == "bca" else block.norm1
        assert norm.normalized_shape[0] == dim
        assert dim // head == 32  # head dim is 32 everywhere
    assert model.feature_info[-1]["num_chs"] == dims[-1]


def test_tiny_classifies_224():
    model = timm.create_model("spatialformer_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_features_only_returns_four_stage_maps():
    model = timm.create_model("spatialformer_tiny", features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 160))
    assert [m.shape[1] for m in maps] == [64, 128, 256, 320]
    assert [(m.shape[2], m.shape[3]) for m in maps] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    subset = timm.create_model("spatialformer_tiny", features_only=True, out_indices=(1, 3))
    assert subset.feature_info.channels() == [128, 320]


def test_forward_intermediates_and_head():
    model = _tiny_config().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        assert [m.shape for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 48, 2, 3)]
        assert final.shape == (2, 64 + 6, 48)
        torch.testing.assert_close(final, model.forward_features(images))
        torch.testing.assert_close(model.forward_head(final), model(images))
        assert model.forward_head(final, pre_logits=True).shape == (2, 48)
        only = model.forward_intermediates(images, indices=[0, 2], intermediates_only=True, stop_early=True)
        assert [m.shape[1] for m in only] == [16, 32]
        spatial = model.forward_spatial_tokens(images)
        assert spatial.shape == (2, 64, 48)
        torch.testing.assert_close(spatial, final[:, :64])


@pytest.mark.parametrize("size", [(224, 224), (512, 512), (800, 1344)])
def test_any_multiple_of_32_input_runs(size):
    model = _tiny_config().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 7)


def test_rejects_sizes_not_multiple_of_32():
    with pytest.raises(ValueError, match=r"multiples of 32, got \(1, 3, 100, 96\)"):
        _tiny_config()(torch.randn(1, 3, 100, 96))


@pytest.mark.parametrize("bca_mode", ["parallel", "sequential"])
def test_training_step_updates_every_parameter(bca_mode):
    torch.manual_seed(0)
    model = _tiny_config(bca_mode=bca_mode, drop_path_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    optimizer.step()


def test_reset_classifier_and_prune():
    model = _tiny_config()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    taken = model.prune_intermediate_layers(indices=2)
    assert taken == [2, 3] and len(model.stages) == 4
    assert isinstance(model.head, torch.nn.Identity)


COMPILE_CASES = [(b, "parallel") for b in available_backends()] + [(available_backends()[-1], "sequential")]


@pytest.mark.parametrize("backend,bca_mode", COMPILE_CASES)
def test_torch_compile_fullgraph_has_no_graph_break(backend, bca_mode):
    torch._dynamo.reset()
    model = _tiny_config(backend=backend, bca_mode=bca_mode)
    images = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)
    compiled(images).sum().backward()  # the backward graph traces through the registered autograd
    assert all(p.grad is not None for p in model.parameters())
