"""timm conformance: SpatialFormer-T/S/B behave like timm's own models.

Complete pretrained configs, torch.jit.script, torch.fx (plain symbolic tracing and timm's FX
feature extraction, the BCA attention a leaf), features_only / forward_intermediates,
gradient checkpointing, layer groups for layer-wise LR decay, and pretrained weights from a
local file. Scripting and FX run on the three registered models at full depth (built once);
checks that do not depend on depth use the registered models with one block per stage.
"""
import io

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import create_feature_extractor, get_graph_node_names, group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay

import spatialformer
from spatialformer import BCABlock
from spatialformer.layers import BilateralCrossAttention, _bilateral_heads
from spatialformer.train import make_model, save_checkpoint

MODELS = ["spatialformer_tiny", "spatialformer_small", "spatialformer_base"]
SHALLOW = dict(depths=(1, 1, 1, 1))
TRAINER = dict(embed_dims=(32, 64, 64, 96), num_heads=(1, 2, 2, 3), depths=(1, 1, 1, 1))  # train.make_model

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def registered():
    """spatialformer_tiny/small/base at full depth, as timm builds them, in eval mode."""
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in MODELS}


def _images(*size, batch=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_equal_dicts(actual, expected):
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different


# --- pretrained configs, features_only, forward_intermediates ---------------------------------

CFG_KEYS = ("num_classes", "input_size", "pool_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
            "first_conv", "classifier", "license")


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_is_complete_and_matches_the_output_stride(name):
    model = timm.create_model(name, **SHALLOW).eval()
    cfg = model.pretrained_cfg
    assert [k for k in CFG_KEYS if cfg.get(k) is None] == []
    channels, height, width = cfg["input_size"]
    stride = model.feature_info[-1]["reduction"]
    assert stride == 32 and cfg["pool_size"] == (height // stride, width // stride)
    state = model.state_dict()
    assert state[cfg["first_conv"] + ".weight"].shape[1] == channels
    assert state[cfg["classifier"] + ".weight"].shape[0] == cfg["num_classes"] == model.num_classes
    data = timm.data.resolve_model_data_config(model)
    assert (data["input_size"], data["mean"], data["crop_pct"]) == (cfg["input_size"], cfg["mean"], cfg["crop_pct"])
    timm.data.create_transform(**data)

    images = torch.randn(1, *cfg["input_size"])
    num_tokens = model.spatial_tokens.num_tokens + cfg["pool_size"][0] * cfg["pool_size"][1]
    with torch.no_grad():
        tokens, maps = model.forward_intermediates(images)
        assert tuple(maps[-1].shape[-2:]) == cfg["pool_size"]  # the unpooled final map
        assert tokens.shape == (1, num_tokens, model.num_features)  # spatial tokens + pool_size image tokens
        assert model.forward_head(tokens, pre_logits=True).shape == (1, model.num_features)
        assert model.forward_head(tokens).shape == (1, cfg["num_classes"])
        model.reset_classifier(0)
        assert model.forward_head(tokens).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model.forward_head(tokens).shape == (1, num_tokens, model.num_features)  # unpooled


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_forward_intermediates(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SHALLOW).eval()
    features = timm.create_model(name, features_only=True, **SHALLOW).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head, no final norm
    images = _images(64, 96, batch=2)
    with torch.no_grad():
        maps = features(images)
        final, intermediates = model.forward_intermediates(images)
        torch.testing.assert_close(final, model.forward_features(images))
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [i["num_chs"] for i in model.feature_info]
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for got, expected in zip(maps, intermediates):
        torch.testing.assert_close(got, expected)


# --- TorchScript -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager(registered, name):
    model = registered[name]
    scripted = torch.jit.script(model)
    images = _images(64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images))
    with pytest.raises(torch.jit.Error, match=r"multiples of 32, got \(1, 3, 64, 80\)"):
        scripted(_images(64, 80))


def _small(**kwargs):
    torch.manual_seed(0)
    return spatialformer.SpatialFormer(
        embed_dims=(16, 32, 32, 48), num_heads=(1, 1, 1, 2), depths=(1, 1, 1, 1), num_classes=7, **kwargs
    ).eval()


def _scripted_round_trip(model):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _profiled_ops(model, images):
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = model(images)
    return out, {event.name for event in profile.events()}


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("bca_mode", ["parallel", "sequential"])
def test_scripted_model_runs_the_registered_op_on_any_backend(backend, bca_mode):
    """No Python dispatch in TorchScript: the layers call the registered op with their backend
    ("auto" for the default), which resolves it when it runs."""
    model = _small(backend=backend, bca_mode=bca_mode)
    images = _images(64, 64, batch=2)
    out, ops = _profiled_ops(_scripted_round_trip(model), images)
    expected = "bilateral_attention" if bca_mode == "parallel" else "cross_attention"
    assert {op for op in ops if op.startswith("spatialformer::")} == {f"spatialformer::{expected}"}
    with torch.no_grad():
        torch.testing.assert_close(out, model(images))


@pytest.mark.parametrize("bca_mode", ["parallel", "sequential"])
def test_scripted_layers_with_a_kernel_backend_call_the_registered_op(kernel_backend, device, bca_mode):
    model = _small(backend=kernel_backend, bca_mode=bca_mode).to(device)
    images = _images(64, 64, batch=2).to(device)
    out, ops = _profiled_ops(_scripted_round_trip(model), images)
    expected = "bilateral_attention" if bca_mode == "parallel" else "cross_attention"
    assert {op for op in ops if op.startswith("spatialformer::")} == {f"spatialformer::{expected}"}
    with torch.no_grad():
        torch.testing.assert_close(out, model(images))


# --- torch.fx ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_fx_symbolic_trace_matches_eager(registered, name):
    model = registered[name]
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    num_bca = sum(isinstance(m, BCABlock) for m in model.modules())
    assert calls.count(_bilateral_heads) == num_bca  # the attention call is one node per BCA block
    images = _images(64, 96)
    with torch.no_grad():
        assert torch.equal(traced(images), model(images))


# Scripting any torch.fx GraphModule warns about an annotation in torch's own GraphModule.__init__.
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level:UserWarning")
@pytest.mark.parametrize("bca_mode", ["parallel", "sequential"])
def test_fx_traced_block_keeps_the_kernel_call_one_node_and_scripts(bca_mode):
    block = BCABlock(32, num_heads=1, mode=bca_mode).eval()
    traced = torch.fx.symbolic_trace(block)
    calls = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function" and callable(n.target)]
    expected = ["_bilateral_heads"] if bca_mode == "parallel" else ["_cross_heads", "_cross_heads"]
    assert [c for c in calls if c.endswith("_heads")] == expected
    s, x = torch.randn(2, 64, 32), torch.randn(2, 40, 32)
    with torch.no_grad():
        for got, want in zip(torch.jit.script(traced)(s, x), block(s, x)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_timm_fx_feature_extraction_with_bca_leaves_and_scripting(registered, name):
    model = registered[name]
    train_nodes, eval_nodes = get_graph_node_names(model)
    bca = [n for n, m in model.named_modules() if isinstance(m, BilateralCrossAttention)]
    assert set(bca) <= set(eval_nodes)  # each BCA attention is a single (leaf) node
    assert not any("qkv_s" in n or "_bilateral_heads" in n for n in eval_nodes)
    extractor = create_feature_extractor(model, [eval_nodes[-1]])
    leaves = [n.target for n in extractor.graph.nodes if n.op == "call_module" and n.target in bca]
    assert leaves == bca
    images = _images(64, 96)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(extractor(images)[eval_nodes[-1]], expected)
        scripted = torch.jit.script(extractor)  # scripting after FX tracing
        torch.testing.assert_close(scripted(images)[eval_nodes[-1]], expected)


@pytest.mark.parametrize("name", MODELS)
def test_fx_backward_matches_eager(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SHALLOW).train()
    images = _images(64, 64)
    expected = _grads(model, model(images).logsumexp(-1).sum())
    train_nodes, _ = get_graph_node_names(model)
    for traced in (torch.fx.symbolic_trace(model), create_feature_extractor(model, {train_nodes[-1]: "logits"})):
        traced.train()
        out = traced(images)
        out = out["logits"] if isinstance(out, dict) else out
        _assert_equal_dicts(_grads(model, out.logsumexp(-1).sum()), expected)


# --- gradient checkpointing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,bca_mode", [(n, "parallel") for n in MODELS] + [("spatialformer_tiny", "sequential")]
)
def test_grad_checkpointing_gives_exact_gradients(name, bca_mode):
    """With drop path on: checkpointing replays the RNG, so the recomputed blocks drop the same paths."""

    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        model = timm.create_model(
            name, num_classes=10, depths=(2, 1, 1, 1), drop_path_rate=0.2, bca_mode=bca_mode
        ).train()
        model.set_grad_checkpointing(enable=checkpointing)
        assert all(stage.grad_checkpointing == checkpointing for stage in model.stages)
        torch.manual_seed(1)
        loss = model(_images(64, 64, batch=2)).logsumexp(-1).sum()
        return loss.detach(), _grads(model, loss)

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.equal(loss_ckpt, loss)
    _assert_equal_dicts(grads_ckpt, grads)


def _bytes_saved_for_backward(model, images):
    """Distinct storages autograd keeps for backward (outside checkpointed regions), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(images).sum()
    loss.backward()
    return sum(saved.values())


def test_grad_checkpointing_keeps_far_fewer_activations():
    model = timm.create_model("spatialformer_tiny", num_classes=10, depths=(2, 2, 2, 2)).train()
    images = _images(64, 64)
    plain = _bytes_saved_for_backward(model, images)
    model.set_grad_checkpointing()
    checkpointed = _bytes_saved_for_backward(model, images)
    assert checkpointed < 0.25 * plain
    model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.stages)


def test_scripting_ignores_grad_checkpointing():
    model = _small()
    model.set_grad_checkpointing()
    images = _images(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(images), model(images))


# --- layer groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_group_matcher_orders_parameters_by_depth(registered, name):
    model = registered[name]
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert set(layer_of) == {n for n, _ in model.named_parameters()}
    depths = [len(stage.blocks) for stage in model.stages]
    last = max(layer_of.values())
    assert last + 1 == 1 + sum(depths) + 3 + 1  # stem, blocks, 3 downsamplings, head
    assert layer_of["patch_embed.proj.weight"] == layer_of["spatial_tokens.embedding"] == 0
    block_layers = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            layers = {layer_of[f"stages.{i}.blocks.{j}.{n}"] for n, _ in block.named_parameters()}
            assert len(layers) == 1  # a block is one layer
            block_layers.append(layers.pop())
        if i > 0:  # the stage's downsampling is the layer before its first block
            prefixes = (f"stages.{i}.downsample.", f"stages.{i}.spatial_proj.")
            downsample = {layer_of[n] for n in layer_of if n.startswith(prefixes)}
            assert downsample == {block_layers[-len(stage.blocks)] - 1}
    assert block_layers == sorted(set(block_layers)) and block_layers[0] == 1
    assert layer_of["norm.weight"] == block_layers[-1] and layer_of["head.weight"] == last

    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 6  # stem, four stages, final norm + head
    assert all(n.startswith(f"stages.{i}.") for i in range(4) for n in coarse[i + 1])


def test_layer_wise_lr_decay_param_groups_and_optimizer():
    model = timm.create_model("spatialformer_tiny", num_classes=10, **SHALLOW)
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5
    )
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    num_layers = 1 + 4 + 3 + 1
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.patch_embed.proj.weight)] == 0.5 ** (num_layers - 1)
    stage_scales = [scale[id(next(stage.blocks[0].parameters()))] for stage in model.stages]
    assert stage_scales == sorted(stage_scales) and len(set(stage_scales)) == 4
    embedding_group = next(g for g in groups if any(p is model.spatial_tokens.embedding for p in g["params"]))
    assert embedding_group["weight_decay"] == 0.0  # no_weight_decay() is honoured
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)  # timm's train script path
    assert len({g["lr_scale"] for g in optimizer.param_groups}) == num_layers
    model(_images(64, 64)).sum().backward()
    optimizer.step()


# --- pretrained weights from a local file ------------------------------------------------------


def _from_file(path, **kwargs):
    return timm.create_model(
        "spatialformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    ).eval()


def test_trainer_checkpoint_loads_into_the_registered_model(tmp_path):
    model = make_model("auto")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, step=1)  # keys "model.*", "optim.*", "rng.cpu"
    loaded = _from_file(path, num_classes=10, **TRAINER)
    _assert_equal_dicts(loaded.state_dict(), model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images))


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "ddp", "safetensors"])
def test_saved_state_dict_loads_from_file(tmp_path, layout):
    torch.manual_seed(0)
    source = timm.create_model("spatialformer_tiny", num_classes=5, **TRAINER)
    state = source.state_dict()
    if layout == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "weights.pth"
        wrapped = {
            "plain": state,
            "model": {"model": state, "epoch": 3},
            "state_dict": {"state_dict": state, "epoch": 3},
            "ddp": {f"module.{k}": v for k, v in state.items()},
        }[layout]
        torch.save(wrapped, path)
    loaded = _from_file(path, num_classes=5, **TRAINER)  # the config says 1000 classes: the head still loads
    _assert_equal_dicts(loaded.state_dict(), state)


def test_registered_tiny_round_trip_through_safetensors(registered, tmp_path):
    state = registered["spatialformer_tiny"].state_dict()
    path = tmp_path / "spatialformer_tiny.safetensors"
    save_file(state, str(path))
    _assert_equal_dicts(_from_file(path).state_dict(), state)


def test_other_num_classes_keep_the_backbone_and_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("spatialformer_tiny", num_classes=5, **TRAINER)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    for num_classes in (3, 1000):
        torch.manual_seed(1)
        loaded = _from_file(path, num_classes=num_classes, **TRAINER)
        state = loaded.state_dict()
        assert state["head.weight"].shape == (num_classes, 96)
        torch.manual_seed(1)
        fresh = timm.create_model("spatialformer_tiny", num_classes=num_classes, **TRAINER)
        assert torch.equal(state["head.weight"], fresh.head.weight)  # the model's own initialisation
        _assert_equal_dicts({k: v for k, v in state.items() if not k.startswith("head.")}, backbone)
    headless = _from_file(path, num_classes=0, **TRAINER)
    _assert_equal_dicts(headless.state_dict(), backbone)
    features = _from_file(path, features_only=True, **TRAINER)
    with torch.no_grad():
        maps = features(_images(64, 64))
        torch.testing.assert_close(maps, source.eval().forward_intermediates(_images(64, 64), intermediates_only=True))


def test_weights_load_for_any_image_size_and_adapt_input_channels(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("spatialformer_tiny", num_classes=5, **TRAINER).eval()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = _from_file(path, num_classes=5, img_size=384, **TRAINER)  # nothing depends on the image size
    _assert_equal_dicts(loaded.state_dict(), source.state_dict())
    with torch.no_grad():
        for size in ((96, 96), (160, 128)):
            torch.testing.assert_close(loaded(_images(*size)), source(_images(*size)))
    gray = _from_file(path, num_classes=5, in_chans=1, **TRAINER)  # timm adapts the first conv
    torch.testing.assert_close(gray.patch_embed.proj.weight[:, 0], source.patch_embed.proj.weight.sum(dim=1))
