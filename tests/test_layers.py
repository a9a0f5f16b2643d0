"""SpatialFormer layers: shapes, gradients, modes and backend selection; the BCA block on each
kernel backend; the layers under torch.autocast (equal to explicit casts; fp32 master weights
train)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import spatialformer
import spatialformer_kernels as sk
from spatialformer import BCABlock, BilateralCrossAttention, SABlock, SpatialTokens
from spatialformer.layers import _merge_heads, _split_heads
from spatialformer_kernels.reference import cross_attention_reference
from spatialformer_kernels.testing import assert_close, make_image_mask

FP32, BF16 = torch.float32, torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_spatial_tokens_are_sincos_plus_learnable():
    tokens = SpatialTokens(dim=32, grid_size=8)
    out = tokens(3)
    assert out.shape == (3, 64, 32)
    assert torch.equal(out[0], out[2])
    with torch.no_grad():
        tokens.embedding.zero_()
    fixed = tokens(1)[0]
    # The fixed part is a 2D sin-cos code: distinct per grid cell, values in [-1, 1].
    assert torch.unique(fixed, dim=0).shape[0] == 64
    assert fixed.abs().max() <= 1.0
    assert "sincos" not in tokens.state_dict()


def test_bilateral_attention_layer_matches_explicit_reference():
    torch.manual_seed(0)
    layer = BilateralCrossAttention(32, num_heads=2, backend="reference")
    s, x = torch.randn(2, 6, 32), torch.randn(2, 11, 32)
    ds, dx = layer(s, x)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], 2, 16).transpose(1, 2)

    q_s, k_s, v_s = (heads(t) for t in layer.qkv_s(s).chunk(3, dim=-1))
    q_x, k_x, v_x = (heads(t) for t in layer.qkv_x(x).chunk(3, dim=-1))
    o_s = cross_attention_reference(q_s, k_x, v_x, 0.25).transpose(1, 2).reshape(2, 6, 32)
    o_x = cross_attention_reference(q_x, k_s, v_s, 0.25).transpose(1, 2).reshape(2, 11, 32)
    torch.testing.assert_close(ds, layer.proj_s(o_s))
    torch.testing.assert_close(dx, layer.proj_x(o_x))


def test_sequential_mode_attends_to_updated_spatial_tokens():
    torch.manual_seed(0)
    block = BCABlock(32, num_heads=2, mode="sequential", backend="reference")
    s, x = torch.randn(2, 6, 32), torch.randn(2, 11, 32)
    s_out, x_out = block(s, x)
    # Rebuild the sequential semantics by hand from the block's own sub-layers.
    attn = block.attn
    q_x, k_x, v_x = attn.image_qkv(block.norm_x(x))
    s_mid = s + attn.attend_spatial(block.norm_s(s), k_x, v_x)
    x_mid = x + attn.attend_image(q_x, block.norm_s(s_mid))
    torch.testing.assert_close(x_out, x_mid + block.mlp_x(block.norm_mlp_x(x_mid)))
    torch.testing.assert_close(s_out, s_mid + block.mlp_s(block.norm_mlp_s(s_mid)))
    parallel = BCABlock(32, num_heads=2, mode="parallel", backend="reference")
    parallel.load_state_dict(block.state_dict())
    assert not torch.allclose(parallel(s, x)[1], x_out)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bca_block_backward_reaches_every_parameter(mode):
    block = BCABlock(32, num_heads=2, mode=mode, drop_path=0.1)
    s = torch.randn(2, 6, 32, requires_grad=True)
    x = torch.randn(2, 11, 32, requires_grad=True)
    s_out, x_out = block(s, x, image_mask=make_image_mask(2, 11))
    (s_out.sum() + x_out.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    assert torch.isfinite(s.grad).all() and torch.isfinite(x.grad).all()


def test_sa_block_reference_and_sdpa_agree_with_mask():
    torch.manual_seed(0)
    block = SABlock(32, num_heads=2)
    s, x = torch.randn(2, 6, 32), torch.randn(2, 11, 32)
    mask = make_image_mask(2, 11, seed=3)
    sdpa = block(s, x, mask)
    block.attn.backend = "reference"
    reference = block(s, x, mask)
    for a, b in zip(sdpa, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # masked image tokens must not influence the spatial tokens
    x_changed = x.clone()
    x_changed[~mask] = 100.0
    torch.testing.assert_close(block(s, x_changed, mask)[0], reference[0], rtol=1e-5, atol=1e-5)


def test_invalid_layer_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        BCABlock(32, 2, mode="diagonal")
    with pytest.raises(ValueError, match="dim 30 must be divisible by num_heads 4"):
        BilateralCrossAttention(30, 4)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        BilateralCrossAttention(32, 2, backend="fast")


def test_process_default_backend_context_and_env(monkeypatch):
    layer = BilateralCrossAttention(32, 2)
    assert layer._backend() == "auto"
    monkeypatch.setenv(spatialformer.BACKEND_ENV_VAR, "reference")
    assert layer._backend() == "reference"
    with spatialformer.use_backend("auto"):
        assert layer._backend() == "auto"
        with spatialformer.use_backend("reference"):
            assert spatialformer.default_backend() == "reference"
        assert layer._backend() == "auto"
    explicit = BilateralCrossAttention(32, 2, backend="auto")
    assert explicit._backend() == "auto"
    monkeypatch.setenv(spatialformer.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        spatialformer.default_backend()


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bca_block_on_a_kernel_backend_matches_the_reference_block(kernel_backend, mode):
    """The layer path: a BCA block on each kernel backend (one fused op, or two cross_attention
    calls) against the same block on the reference, outputs and every gradient."""
    torch.manual_seed(21)
    block = BCABlock(32, num_heads=2, mode=mode, backend=kernel_backend).to(DEVICE)
    exact_block = copy.deepcopy(block).double()
    same_block = copy.deepcopy(block)
    exact_block.attn.backend = same_block.attn.backend = "reference"
    assert block.attn._backend() == kernel_backend
    s, x = torch.randn(2, 6, 32, device=DEVICE), torch.randn(2, 37, 32, device=DEVICE)
    mask = make_image_mask(2, 37, empty_samples=(1,), device=DEVICE, seed=22)

    def run(module, s, x):
        s, x = s.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        out_s, out_x = module(s, x, mask)
        loss = out_s.square().sum() + out_x.sin().sum()
        grads = torch.autograd.grad(loss, [s, x, *module.parameters()])
        return [out_s, out_x, *grads]

    actual = run(block, s, x)
    same = run(same_block, s, x)
    exact = run(exact_block, s.double(), x.double())
    names = ["s", "x", "ds", "dx", *(f"d{n}" for n, _ in block.named_parameters())]
    for name, a, r, e in zip(names, actual, same, exact):
        assert_close(a, r, e, torch.float32, f"{mode} {name}")


# ----------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------
AUTOCAST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HEADS, N_SPATIAL, N_IMAGE = 32, 2, 9, 20


def _linear_bf16(linear, t):
    """What autocast does to an nn.Linear: input, weight and bias cast to bfloat16."""
    bias = linear.bias.to(BF16) if linear.bias is not None else None
    return F.linear(t.to(BF16), linear.weight.to(BF16), bias)


def _explicit_bf16_attention(attn, s, x, backend):
    q_s, k_s, v_s = _split_heads(_linear_bf16(attn.qkv_s, s), attn.num_heads)
    q_x, k_x, v_x = _split_heads(_linear_bf16(attn.qkv_x, x), attn.num_heads)
    o_s, o_x = sk.bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, backend=backend)
    return _linear_bf16(attn.proj_s, _merge_heads(o_s)), _linear_bf16(attn.proj_x, _merge_heads(o_x))


def _tokens(seed=0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(2, N_SPATIAL, DIM, generator=generator).to(DEVICE)
    x = torch.randn(2, N_IMAGE, DIM, generator=generator).to(DEVICE)
    return s, x


def test_attention_layer_under_autocast_equals_explicit_casts(any_backend):
    """Forward and parameter gradients, bitwise: autocast hands the op bf16 q/k/v and the op
    runs in bf16 (no hidden upcast, no autocast registration needed)."""
    torch.manual_seed(0)
    attn = BilateralCrossAttention(DIM, HEADS, backend=any_backend).to(DEVICE)
    twin = copy.deepcopy(attn)
    s, x = _tokens()
    with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
        ds, dx = attn(s, x)
    assert ds.dtype == dx.dtype == BF16
    ds_explicit, dx_explicit = _explicit_bf16_attention(twin, s, x, any_backend)
    assert torch.equal(ds, ds_explicit) and torch.equal(dx, dx_explicit)
    (ds.float().square().sum() + dx.float().sum()).backward()
    (ds_explicit.float().square().sum() + dx_explicit.float().sum()).backward()
    for (name, p), q in zip(attn.named_parameters(), twin.parameters()):
        assert p.grad.dtype == FP32 and torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bca_block_under_autocast_matches_reference(kernel_backend, mode):
    """The block under autocast on a kernel backend vs the same under autocast on the
    reference backend, judged by the one tolerance rule against the block in float64."""
    torch.manual_seed(0)
    block = BCABlock(DIM, HEADS, mode=mode, backend=kernel_backend).to(DEVICE)
    reference = copy.deepcopy(block)
    reference.attn.backend = "reference"
    exact = copy.deepcopy(reference).double()
    s, x = _tokens(1)
    with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
        got = block(s, x)
        same = reference(s, x)
    want = exact(s.double(), x.double())
    assert [t.dtype for t in got] == [FP32, FP32]  # residual streams stay fp32
    assert_close(list(got), list(same), list(want), BF16, f"BCABlock {mode} (s, x)")


def test_fp32_master_weights_train_under_autocast(any_backend):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "block": BCABlock(DIM, HEADS, backend=any_backend),
        "head": torch.nn.Linear(DIM, 1),
    }).to(DEVICE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    s, x = _tokens(2)
    target = torch.linspace(-1, 1, N_IMAGE, device=DEVICE).expand(2, N_IMAGE)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
            s_out, x_out = model["block"](s, x)
            prediction = model["head"](x_out).squeeze(-1) + s_out.mean()
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        assert all(p.grad.dtype == FP32 and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], losses
    for name, p in model.named_parameters():
        assert p.dtype == FP32 and torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} was not updated"
