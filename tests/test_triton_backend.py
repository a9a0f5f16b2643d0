"""The Triton backend itself (its parity with the reference is tests/test_kernel_parity.py):
the split plan, the head-dim-split backward for wide heads called directly, and the int64
address arithmetic of every kernel, read from the Triton IR compiled for sm_90."""
import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels.reference import bilateral_attention_reference
from spatialformer_kernels.testing import (
    BILATERAL_RESULT_NAMES,
    CROSS_RESULT_NAMES,
    assert_close,
    assert_results_close,
    bilateral_results,
    case_id,
    make_bilateral_inputs,
    mask_for_case,
    reference_bilateral_results,
    reference_cross_results,
    reference_pair,
    transposed_grad,
)

RUNS_HERE = "triton" in sk.runnable_backends("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not RUNS_HERE, reason="the Triton backend needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def test_host_cdiv_and_next_power_of_2_agree_with_triton():
    """The launchers' host arithmetic (triton.cdiv and triton.next_power_of_2 are constexpr
    functions, slow to call from Python) gives Triton's values."""
    import triton

    from spatialformer_kernels.backends.triton import configs

    assert all(configs.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(configs.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in (1, 2, 3, 16, 32, 128, 257))


def test_row_alignment_is_the_largest_of_8_4_2_dividing_d_and_every_row_stride():
    import random

    from spatialformer_kernels.backends.triton.common import row_alignment

    def by_definition(head_dim, tensors):
        present = [t for t in tensors if t is not None]
        if any(t.element_size() != 2 for t in present):
            return 1
        for align in (8, 4, 2):
            if head_dim % align == 0 and all(
                t.stride(3) == 1 and all(t.stride(i) % align == 0 for i in range(3)) for t in present
            ):
                return align
        return 1

    rng = random.Random(0)
    storage = {dt: torch.empty(4096, dtype=dt) for dt in (BF16, FP16, FP32)}
    for _ in range(500):
        head_dim = rng.randint(1, 80)
        tensors = []
        for _ in range(rng.randint(0, 4)):
            dtype = rng.choice((BF16, BF16, FP16, FP32))
            last = 1 if rng.random() < 0.9 else rng.choice((0, 2))
            strides = (rng.randint(0, 40) * rng.choice((1, 2, 8)), rng.randint(0, 40), rng.randint(0, 40), last)
            tensors.append(storage[dtype].as_strided((1, 1, 1, 1), strides))
        if rng.random() < 0.3:
            tensors.insert(rng.randint(0, len(tensors)), None)
        assert row_alignment(head_dim, *tensors) == by_definition(head_dim, tensors), (head_dim, tensors)


def test_split_plan_fills_the_gpu_without_over_splitting():
    from spatialformer_kernels.backends.triton.common import split_plan
    from spatialformer_kernels.backends.triton.configs import split_lengths

    h100_sms = 132
    splits, chunk = split_plan(h100_sms, 2 * 2, 67_200)  # det800x1344-stage1: B=2, H=2
    assert splits * 4 >= h100_sms and splits * chunk >= 67_200 > (splits - 1) * chunk
    # cls224-stage1 training batch: 12 tiles, then the last split's 12 and a half (13 and 11.5
    # with the chunk rounded up)
    assert split_plan(h100_sms, 64 * 2, 3_136) == (2, 1536)
    assert split_plan(h100_sms, 64 * 4, 784) == (1, 896)  # cls224-stage2: 256 programs fill the GPU
    assert split_plan(h100_sms, 1, 100) == (1, 128)  # never more splits than tokens allow
    for programs in (1, 4, 16, 64, 256):
        for n in range(1, 20_000, 97):
            splits, chunk = split_plan(h100_sms, programs, n)
            lengths = split_lengths(n, chunk, splits)
            assert sum(lengths) == n and min(lengths) >= 1 and chunk % 128 == 0
            assert splits == 1 or chunk >= 256  # MIN_SPLIT_TOKENS


def test_launch_config_is_looked_up_never_tuned_and_can_be_forced():
    import triton

    from spatialformer_kernels.backends.triton import configs

    bucket = dict(block_m=64, block_d=32, elem_bytes=2, backward=False, both=True)
    candidates = [configs._meta(c) for c in configs.configs_for(**bucket)]
    chosen = configs.launch_config(**bucket)
    # the interpreter runs the smallest candidate tile (multi-tile loops on small shapes), a GPU
    # the measured table's entry for its arch (launch_config's default: 90) or else the first
    measured = configs.MEASURED_CONFIGS.get((90, False, True, True, 64, 32, 2))
    assert measured is not None  # the table's D = 32 forward entry, keyed (arch, backward, DIR_S, DIR_X, ...)
    if configs.INTERPRET:
        assert configs._meta(chosen) == candidates[-1]
    elif measured:
        assert configs._meta(chosen) == dict(zip(("BLOCK_N", "num_warps", "num_stages"), measured))
    else:
        assert configs._meta(chosen) == candidates[0]
    assert configs.launch_meta(**bucket) == {**chosen.kwargs, "num_warps": chosen.num_warps, "num_stages": chosen.num_stages}
    forced = triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3)
    with configs.forced_config("fwd", forced):
        assert configs.launch_meta(**bucket) == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
        assert configs.launch_meta(**{**bucket, "backward": True}) != {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    assert configs.launch_meta(**bucket)["BLOCK_N"] == chosen.kwargs["BLOCK_N"]
    for key, (bn, warps, stages) in [*configs.MEASURED_CONFIGS.items(), *configs.UNMASKED_MEASURED_CONFIGS.items()]:
        assert bn in (16, 32, 64, 128) and warps in (4, 8) and stages in (1, 2, 3), key  # a real config
    # without a key mask the unmasked entry, with one the entry that does not spill with it
    d96_x = dict(block_m=64, block_d=128, elem_bytes=2, backward=True, both=False, dir_s=False, arch=90)
    stages = lambda config: config.num_stages  # noqa: E731
    assert stages(configs.gpu_config(**d96_x)) == configs.UNMASKED_MEASURED_CONFIGS[(90, True, False, True, 64, 128, 2)][2]
    assert stages(configs.gpu_config(**d96_x, key_mask=True)) == configs.MEASURED_CONFIGS[(90, True, False, True, 64, 128, 2)][2]
    assert configs.gpu_config(**d96_x, pair_mask=True).kwargs == configs.configs_for(**d96_x, pair_mask=True)[0].kwargs


@pytest.mark.parametrize("major,minor,arch", [(8, 0, 80), (8, 6, 80), (8, 9, 80), (9, 0, 90), (10, 0, 90)])
def test_a_gpu_uses_the_configs_of_the_architecture_the_static_check_covers(monkeypatch, major, minor, arch):
    from spatialformer_kernels.backends.triton import common

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (major, minor))
    common._capability.cache_clear()
    try:
        assert common._capability(0) == arch
    finally:
        common._capability.cache_clear()


@needs_triton
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n_parts", [1, 2, 3], ids=["one", "two", "three"])
def test_split_reduction_sums_in_a_fixed_order_and_rounds_once(dtype, n_parts):
    from spatialformer_kernels.backends.triton.common import REDUCE_BLOCK, REDUCE_MIN_BLOCK, reduce_shape, reduce_splits

    B, H, M, D = 2, 3, 7, 40  # M * D = 280 (and 2 blocks below): a masked tail
    # 5 splits in one step of 8 (a masked split tail), 70 splits in several
    for splits, m, d in ((5, M, D), (5, REDUCE_BLOCK // 16 + 3, 16), (70, M, D)):
        gen = torch.Generator().manual_seed(m * splits)
        # integers plus a power-of-two fraction only the last split carries: every partial sum is
        # exact in fp32 whatever the order, and a bf16 output shows the single rounding of the
        # whole sum (bf16 partial sums would round at every step)
        parts = [torch.randint(-50, 50, (B * H, splits, m, d), generator=gen).float() for _ in range(n_parts)]
        for i, p in enumerate(parts):
            p[:, -1] += 2.0 ** -(2 + i)  # a different fraction per part: no part's sum lands in another's output
        outs = reduce_splits([p.to(DEVICE) for p in parts], (B, H, m, d), dtype)
        assert len(outs) == len(parts)
        for p, out in zip(parts, outs):
            assert out.shape == (B, H, m, d) and out.dtype == dtype
            expected = p.double().sum(1).float().view(B, H, m, d).to(dtype)
            assert torch.equal(out.cpu(), expected)
    # few samples with many splits (det800x1344: B * H = 4, 66 splits on 132 SMs): the smallest
    # blocks, to spread over the GPU, 32 splits per step on 4 warps
    assert reduce_shape(4, 66, 64 * 32, 132) == (REDUCE_MIN_BLOCK, 32, 4)


@needs_triton
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype,D,masked", [(BF16, 32, False), (BF16, 40, False), (BF16, 96, False), (BF16, 96, True),
                                            (FP32, 32, False)],
                         ids=["bf16-D32", "bf16-D40", "bf16-D96", "bf16-D96-mask", "fp32-D32"])
def test_the_configs_a_gpu_launches_compute_the_op(arch, dtype, D, masked):
    """The interpreter runs each bucket's last candidate; a GPU runs its first (or a measured
    entry, which may differ with a key mask or a partial last tile). Force the GPU's configs for
    the forward and backward buckets of the benchmark layout (M = 64 spatial tokens) and check
    every result against the reference."""
    from spatialformer_kernels.backends.triton import configs, fused
    from spatialformer_kernels.testing import (
        BILATERAL_RESULT_NAMES,
        assert_results_close,
        bilateral_results,
        reference_bilateral_results,
    )

    elem = torch.tensor([], dtype=dtype).element_size()
    block_d = configs.block_d_for(D)
    fwd_m = configs.block_m_for(block_d, elem, backward=False, arch=arch)
    bwd_m = configs.block_m_for(block_d, elem, backward=True, n_spatial=64, arch=arch)
    both = configs.fuse_directions(block_d, elem)
    fwd = configs.gpu_config(fwd_m, block_d, elem, False, both, True, arch, key_mask=masked)
    # N = 300 leaves a partial tile: the backward launches its bucket's tail config (configs.TAIL_CONFIGS)
    _, _, splits, chunk = fused._bwd_plan(1, 2, 64, 300, D, elem, fused.sm_count(torch.device(DEVICE)), arch, True)
    # (direction s, key mask): direction x has no spatial mask here
    bwd_s, bwd_x = [configs.gpu_config(bwd_m, block_d, elem, True, False, dir_s, arch, key_mask=key_mask, tail=True)
                    for dir_s, key_mask in [(True, masked), (False, False)]]
    tails = [configs.tail_block(300, chunk, splits, c.kwargs["BLOCK_N"], arch) for c in (bwd_s, bwd_x)]
    assert all(tails), tails
    inputs = make_bilateral_inputs(1, 2, 64, 300, D, dtype, device=DEVICE, seed=D)
    grads = [torch.randn(1, 2, L, D, dtype=dtype, device=DEVICE) for L in (64, 300)]
    mask = mask_for_case(1, 300, "mask" if masked else None, device=DEVICE)
    with configs.forced_config("fwd", fwd), configs.forced_config("bwd_s", bwd_s), configs.forced_config("bwd_x", bwd_x):
        got = bilateral_results(inputs, grads, "triton", image_mask=mask)
    same, exact = reference_bilateral_results(inputs, grads, image_mask=mask)
    label = f"sm_{arch} {configs._meta(fwd)} / {configs._meta(bwd_s)} / {configs._meta(bwd_x)}"
    assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES, label)


@needs_triton
def test_a_forced_backward_config_sets_the_spatial_block(monkeypatch):
    """benchmarks/gpu_config_sweep.py --bwd-block-m forces BLOCK_M with the tile: the backward
    launches with it (M = 40 over 16-row blocks: the looped path) and still computes the op."""
    import triton

    from spatialformer_kernels.backends.triton import configs, fused
    from spatialformer_kernels.testing import (
        BILATERAL_RESULT_NAMES,
        assert_results_close,
        bilateral_results,
        reference_bilateral_results,
    )

    launched = []
    real_launch = fused.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        if kernel is fused._bilateral_bwd_kernel:
            launched.append((kwargs["BLOCK_M"], kwargs["M_ONE_BLOCK"], kwargs["BLOCK_N"]))
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fused, "launch", recording_launch)
    inputs = make_bilateral_inputs(1, 2, 40, 70, 32, BF16, device=DEVICE, seed=40)
    grads = [torch.randn(1, 2, L, 32, dtype=BF16, device=DEVICE) for L in (40, 70)]
    forced = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    with configs.forced_config("bwd", forced):
        got = bilateral_results(inputs, grads, "triton")
    assert launched == [(16, False, 16), (16, False, 16)]  # direction s, then direction x
    same, exact = reference_bilateral_results(inputs, grads)
    assert_results_close(got, same, exact, BF16, BILATERAL_RESULT_NAMES, "forced BLOCK_M 16")


def test_the_tail_tile_is_the_smallest_power_of_two_holding_every_split_remainder():
    from spatialformer_kernels.backends.triton.common import split_plan
    from spatialformer_kernels.backends.triton.configs import TAIL_MIN_ROWS, tail_block, tail_sizes

    assert tail_block(784, 896, 1, 128, 90) == 16  # cls224-stage2: 6 tiles and 16 tokens
    assert tail_block(784, 896, 1, 128, 80) == 32  # sm_80's 16-row tail spilled (TAIL_MIN_ROWS)
    assert tail_block(3136, 1536, 2, 128, 90) == 64  # cls224-stage1's last split: 12 tiles and 64 tokens
    assert tail_block(67_200, 1024, 66, 128, 90) == 0  # det800x1344: whole tiles only
    assert tail_block(49, 128, 1, 128, 90) == 64 and tail_block(49, 128, 1, 32, 90) == 32  # shorter than a tile
    assert [tail_block(n, 128, 1, 64, 90) for n in (1, 16, 17, 32, 33, 63, 64, 65)] == [16, 16, 32, 32, 64, 64, 0, 16]
    assert tail_sizes(128, 90) == [16, 32, 64, 128] and tail_sizes(64, 80) == [32, 64] and tail_sizes(16, 80) == [16]
    for arch, smallest in TAIL_MIN_ROWS.items():
        for n in range(1, 3000, 7):  # by definition, over the split plans the launchers use
            for block_n in (16, 32, 64, 128):
                splits, chunk = split_plan(132, 4, n)
                longest = chunk % block_n if splits > 1 else 0
                longest = max(longest, (n - (splits - 1) * chunk) % block_n)  # the last split runs to N
                tail = tail_block(n, chunk, splits, block_n, arch)
                assert (tail == 0) == (longest == 0)
                assert tail == 0 or tail == min(block_n, max(smallest, 1 << (longest - 1).bit_length()))


# Remainders of the image tokens over the interpreter's tiles (its configs' last candidate:
# 64 tokens at D = 32 in 16-bit): tails of 16, 32 and 64 rows, one split and several.
TAIL_CASES = [
    (1, 1, 64, 64 + 1, 32, BF16, None),
    (1, 2, 64, 128 + 16, 32, BF16, "mask"),
    (1, 1, 64, 128 + 17, 32, FP16, None),
    (1, 1, 49, 33, 40, FP32, None),
    (2, 2, 64, 1060, 32, BF16, None),  # 4 splits: 256 tokens each, the last 292 (4 tiles and 36 tokens)
    (2, 2, 20, 600, 32, FP32, "mask"),  # fp32, several splits: the tail reloads q_s, k_s and v_s (one key block)
]


@needs_triton
def test_tail_tiles_of_every_size_compute_the_op(monkeypatch):
    """A split's partial last tile runs on the smallest power-of-two rows that hold it
    (configs.tail_block): 16-, 32- and 64-row tails in the forward and in the one-block
    backward of both directions, with and without a key mask, one split and several, the
    last split longer than the others (`split_range`), against the reference; the forward's
    tail on the main loop's spatial operands and on its own copies (TAIL_RELOADS: fp32 here),
    with one key block and several."""
    from spatialformer_kernels.backends.triton import common as bt
    from spatialformer_kernels.backends.triton import configs, fused

    # the interpreter's SM count on any device, so that the plans below are the same on a GPU
    monkeypatch.setattr(fused, "sm_count", lambda device: configs.INTERPRETER_SM_COUNT)
    arch = bt.capability(torch.device(DEVICE))
    tails = set()
    reloads = set()  # (TAIL_RELOADS, ONE_KEY_BLOCK) of the forwards with a partial tile

    def record(fused, kernel, kwargs):
        if kernel is fused._bilateral_fwd_kernel or (kernel is fused._bilateral_bwd_kernel and kwargs["M_ONE_BLOCK"]):
            pass_ = "fwd" if kernel is fused._bilateral_fwd_kernel else "bwd " + ("s" if kwargs["DIR_S"] else "x")
            tails.add((pass_, kwargs["TAIL_BLOCK_N"], kwargs["BLOCK_N"]))
            if pass_ == "fwd" and kwargs["TAIL_BLOCK_N"]:
                reloads.add((kwargs["TAIL_RELOADS"], kwargs["ONE_KEY_BLOCK"]))

    record_fused_launches(monkeypatch, record)
    plans = set()
    for B, H, M, N, D, dtype, mask_kind in TAIL_CASES:
        splits, chunk = bt.split_plan(configs.INTERPRETER_SM_COUNT, B * H, N)
        plans.add((splits, N - (splits - 1) * chunk > chunk))
        inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout="strided", seed=N)
        grads = (transposed_grad((B, H, M, D), dtype, 4, DEVICE), transposed_grad((B, H, N, D), dtype, 5, DEVICE))
        mask = mask_for_case(B, N, mask_kind, device=DEVICE)
        got = bilateral_results(inputs, grads, "triton", D**-0.5, mask)
        same, exact = reference_bilateral_results(inputs, grads, D**-0.5, mask)
        assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES, case_id(B, H, M, N, D, dtype))
    assert (1, False) in plans and any(splits > 1 for splits, _ in plans) and any(longer for _, longer in plans)
    # (reloads, one key block): fp32 reloads; 16-bit keeps the loop's operands where they are wgmma's (sm_90)
    assert {(True, True), (True, False)} <= reloads and ((False, True) in reloads) == (arch >= 90), reloads
    for pass_ in ("fwd", "bwd s", "bwd x"):
        block_n = max(b for p, _, b in tails if p == pass_)
        sizes = {tail for p, tail, b in tails if p == pass_ and 0 < tail < b}
        smaller = [t for t in configs.tail_sizes(block_n, arch) if t < block_n]  # 16, 32, 64 at 128 on sm_90
        assert smaller[0] in sizes and len(sizes) >= min(2, len(smaller)), f"{pass_}: {sorted(tails)}"


@needs_triton
def test_small_batch_large_n_uses_several_splits_and_matches():
    from spatialformer_kernels.backends.triton import common as bt

    B, H, M, N, D = 1, 1, 49, 600, 40
    splits, _ = bt.split_plan(bt.sm_count(torch.device(DEVICE)), B * H, N)
    assert splits > 1
    inputs = make_bilateral_inputs(B, H, M, N, D, FP32, device=DEVICE, seed=14)
    out = sk.bilateral_attention(*inputs, backend="triton")
    same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
    assert_close(out, same, exact, FP32, case_id(B, H, M, N, D, FP32))


@needs_triton
@pytest.mark.parametrize("n_sm,rows", [(4, 32), (40, 8), (100, 4), (200, 2)])
def test_the_combine_merges_the_splits_at_every_tile_shape(monkeypatch, n_sm, rows):
    """The combine's rows per program follow the SM count (combine_shape): 32 x D tiles when the
    samples fill the GPU, else the fewest rows (down to 2) that keep the grid within one wave.
    Each shape, with the splits that SM count gives, merges to the reference's results."""
    from spatialformer_kernels.backends.triton import fused

    B, H, M, N, D = 1, 2, 64, 600, 32
    monkeypatch.setattr(fused, "sm_count", lambda device: n_sm)
    combines = []
    real_launch = fused.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        if kernel is fused._bilateral_combine_kernel:
            combines.append((grid, kwargs["BLOCK_M"], kwargs["BLOCK_D"], args[5]))
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fused, "launch", recording_launch)
    inputs = make_bilateral_inputs(B, H, M, N, D, BF16, device=DEVICE, seed=n_sm)
    out = sk.bilateral_attention(*inputs, backend="triton")
    (grid, block_m, block_d, splits), = combines
    assert block_m == rows and splits > 1
    if rows < 32:  # within one wave, and twice the rows would leave SMs idle
        assert grid[0] * grid[1] * grid[2] <= n_sm < 2 * grid[0] * grid[1] * grid[2]
    same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
    assert_close(out, same, exact, BF16, case_id(B, H, M, N, D, BF16) + f"-{n_sm}sm")


# (B, H, M, N, D, dtype, mask): the one-block backward's compile-time branches. In the
# interpreter (32-token tiles where N allows, 8 SMs pretended): N = 256 is whole tiles, N = 600
# and 97 end in a partial tile (600: in the last of several splits only); M = 64 fills the
# spatial block, M = 49 pads it; bf16 and fp32 at D < 64 scale the [rows, D] sums, fp16 and
# D = 128 every score; D = 40 masks head columns; masked image keys and an empty sample.
BACKWARD_BRANCH_CASES = [
    (1, 2, 64, 256, 32, BF16, None),
    (1, 1, 64, 600, 32, FP16, None),
    (2, 1, 49, 256, 40, BF16, "mask"),
    (1, 1, 64, 97, 128, BF16, None),
    (2, 2, 64, 130, 16, FP32, "empty"),
]


def record_fused_launches(monkeypatch, record):
    """Let record(fused, kernel, keywords) see every launch of backends/triton/fused.py."""
    from spatialformer_kernels.backends.triton import fused

    real_launch = fused.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        record(fused, kernel, kwargs)
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fused, "launch", recording_launch)


@needs_triton
def test_the_one_block_backward_branches_compute_the_op(monkeypatch):
    """Every compile-time branch of the one-block backward (whole tiles or a partial last tile,
    a full or padded spatial block, the scale per score or per sum, masked head columns, key
    masks), for both directions, against the reference."""
    branches = set()

    def record(fused, kernel, kwargs):
        if kernel is fused._bilateral_bwd_kernel and kwargs["M_ONE_BLOCK"]:
            branches.add(("s" if kwargs["DIR_S"] else "x", kwargs["TAIL_BLOCK_N"] > 0, kwargs["FULL_KEY_BLOCK"],
                          kwargs["DS_SCALED"], kwargs["D_MASKED"]))

    record_fused_launches(monkeypatch, record)
    for B, H, M, N, D, dtype, mask_kind in BACKWARD_BRANCH_CASES:
        inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout="strided", seed=N + D)
        grads = (transposed_grad((B, H, M, D), dtype, 4, DEVICE), transposed_grad((B, H, N, D), dtype, 5, DEVICE))
        mask = mask_for_case(B, N, mask_kind, device=DEVICE)
        got = bilateral_results(inputs, grads, "triton", 0.8 * D**-0.5, mask)
        same, exact = reference_bilateral_results(inputs, grads, 0.8 * D**-0.5, mask)
        assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES, case_id(B, H, M, N, D, dtype))
    for direction in "sx":
        for index, name in enumerate(("TAIL_BLOCK_N", "FULL_KEY_BLOCK", "DS_SCALED", "D_MASKED"), start=1):
            seen = {b[index] for b in branches if b[0] == direction}
            assert seen == {False, True}, f"direction {direction}: {name} only {seen}"


@needs_triton
def test_both_dot_orders_compute_the_op(monkeypatch):
    """The kernels order their dots by whether the launch's loop runs them asynchronously
    (ASYNC_DOTS: sm_90 with num_stages >= 2): the forward's online step adds the rescaled sum
    to a fresh P.V dot or accumulates into it, the backward issues the dots into carried sums
    first or last. Both orders, in the forward and in the one-block and looped backward of
    both directions, against the reference."""
    import triton

    from spatialformer_kernels.backends.triton import configs

    seen = set()

    def record(fused, kernel, kwargs):
        if kernel is fused._bilateral_fwd_kernel:
            seen.add(("fwd", kwargs["ASYNC_DOTS"]))
        elif kernel is fused._bilateral_bwd_kernel:
            where = ("s" if kwargs["DIR_S"] else "x") + (" one block" if kwargs["M_ONE_BLOCK"] else " looped")
            seen.add((where, kwargs["ASYNC_DOTS"]))

    record_fused_launches(monkeypatch, record)
    # M = 80: the forward loops over spatial key blocks in direction x; the backward holds the
    # 80 rows in one block of 128 or loops over blocks of 32
    B, H, M, N, D, dtype = 1, 2, 80, 100, 16, BF16
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout="strided", seed=7)
    grads = (transposed_grad((B, H, M, D), dtype, 8, DEVICE), transposed_grad((B, H, N, D), dtype, 9, DEVICE))
    same, exact = reference_bilateral_results(inputs, grads, D**-0.5, None)
    for stages in (1, 2):
        for block_m in (128, 32):
            forward = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=stages)
            backward = triton.Config({"BLOCK_N": 32, "BLOCK_M": block_m}, num_warps=4, num_stages=stages)
            with configs.forced_config("fwd", forward), configs.forced_config("bwd", backward):
                got = bilateral_results(inputs, grads, "triton", D**-0.5, None)
            assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES, f"{stages} stages, BLOCK_M {block_m}")
    wanted = {(where, on) for where in ("fwd", "s one block", "x one block", "s looped", "x looped")
              for on in (False, True)}
    assert seen == wanted


# ----------------------------------------------------------------------------------------
# Wide-head backward (backends/triton/wide.py), called directly
# ----------------------------------------------------------------------------------------
# (B, H, M, N, D, dtype, layout, mask: None | "mask" | "empty", direction): the buckets it
# serves (fp32 BLOCK_D 128 and 256; 16-bit D = 256 with M = 20 and 33, over one spatial
# block), odd N, every layout; direction s masks the image tokens, direction x the spatial
# ones ("empty": the last sample has no kept key: zero gradients). N = 300 with B = H = 1
# gives two splits in the interpreter (it pretends 8 SMs).
WIDE_CASES = [
    (2, 1, 20, 150, 96, FP32, "bnhd", "empty", "s"),
    (2, 1, 20, 150, 96, FP32, "bnhd", "empty", "x"),
    (1, 2, 7, 97, 72, FP32, "strided", "mask", "s"),
    (1, 1, 5, 131, 200, FP32, "contiguous", None, "s"),
    (1, 1, 5, 131, 200, FP32, "strided", None, "x"),
    (2, 1, 20, 101, 256, BF16, "bnhd", "mask", "s"),
    (2, 1, 33, 90, 256, FP16, "strided", "empty", "s"),
    (1, 2, 33, 90, 256, BF16, "contiguous", "mask", "x"),
    (2, 1, 20, 800, 96, FP32, "bnhd", "mask", "s"),  # 3 splits on 8 SMs, the last longer: 256, 256, 288
    (1, 1, 9, 300, 72, FP32, "contiguous", "mask", "s"),
    (1, 1, 9, 300, 72, FP32, "bnhd", "mask", "x"),
]


def _wide_case_id(case):
    *shape, layout, mask_kind, direction = case
    return f"{case_id(*shape)}-{layout}-{mask_kind or 'nomask'}-dir{direction}"


def _wide_direction_inputs(case, seed):
    """(q, k, v, key mask, grad output) of one direction of a WIDE_CASES case."""
    B, H, M, N, D, dtype, layout, mask_kind, direction = case
    q_s, k_s, v_s, q_x, k_x, v_x = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout=layout, seed=seed)
    if direction == "s":
        q, k, v, keys = q_s, k_x, v_x, N
    else:
        q, k, v, keys = q_x, k_s, v_s, M
    mask = mask_for_case(B, keys, mask_kind, device=DEVICE, seed=seed + 1)
    return q, k, v, mask, transposed_grad(tuple(q.shape), dtype, seed + 2, device=DEVICE)


def _wide_grads(q, k, v, mask, grad, scale, direction):
    from spatialformer_kernels.backends.triton.wide import wide_head_bwd

    o = sk.cross_attention(q, k, v, scale=scale, key_mask=mask, backend="triton")  # the Triton forward's output
    return wide_head_bwd(grad, q, k, v, o, scale, mask, direction == "s")


@needs_triton
@pytest.mark.parametrize("case", WIDE_CASES, ids=_wide_case_id)
def test_wide_head_backward_matches_reference(monkeypatch, case):
    from spatialformer_kernels.backends.triton import configs, wide

    if case == WIDE_CASES[-3]:  # its longer last split needs the interpreter's SM count, also on a GPU
        monkeypatch.setattr(wide, "sm_count", lambda device: configs.INTERPRETER_SM_COUNT)
    B, H, M, N, D, dtype, layout, mask_kind, direction = case
    q, k, v, mask, grad = _wide_direction_inputs(case, seed=31)
    scale = 0.9 * D**-0.5
    grads = _wide_grads(q, k, v, mask, grad, scale, direction)
    same, exact = reference_cross_results(q, k, v, grad, scale, mask)
    name = _wide_case_id(case)
    for label, actual, s, e in zip(CROSS_RESULT_NAMES[1:], grads, same[1:], exact[1:]):
        assert actual.shape == e.shape and actual.dtype == dtype and actual.is_contiguous()
        assert_close(actual, s, e, dtype, f"{name} {label}")
    if mask_kind == "empty":  # no kept key in the last sample: zero gradients, never NaN
        for g in grads:
            assert torch.equal(g[B - 1], torch.zeros_like(g[B - 1]))


@needs_triton
def test_wide_head_backward_splits_and_reruns_bitwise():
    """Both directions of the multi-split cases: several splits, bitwise-equal reruns; the
    case whose last split is longer than the others (`split_range`) at the interpreter's SM
    count, which test_wide_head_backward_matches_reference runs on any device."""
    from spatialformer_kernels.backends.triton import common, configs, wide

    B, H, M, N, D, dtype, *_, direction = WIDE_CASES[-3]
    cfg = wide.wide_config(configs.block_d_for(D), 4, direction == "s")
    splits, chunk = common.split_plan(configs.INTERPRETER_SM_COUNT, B * H * -(-D // cfg.BLOCK_DC), N)
    assert configs.split_lengths(N, chunk, splits)[-1] > chunk

    for case in WIDE_CASES[-2:]:
        B, H, M, N, D, dtype, *_, direction = case
        cfg = wide.wide_config(configs.block_d_for(D), 4, direction == "s")
        splits, _ = common.split_plan(common.sm_count(torch.device(DEVICE)), B * H * -(-D // cfg.BLOCK_DC), N)
        assert splits > 1, case
        q, k, v, mask, grad = _wide_direction_inputs(case, seed=41)
        first = _wide_grads(q, k, v, mask, grad, D**-0.5, direction)
        second = _wide_grads(q, k, v, mask, grad, D**-0.5, direction)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_address_arithmetic_is_int64(run_script):
    """tests/scripts/triton_offsets.py lowers every kernel of fused.py and wide.py to Triton IR
    for sm_90 with all int arguments as i32: no pointer offset may be an unbounded i32."""
    pytest.importorskip("triton")
    report = run_script("triton_offsets.py", env={"TRITON_INTERPRET": "0"})
    assert len(report["control"]) == 1, report["control"]  # the i32 pid * stride is caught
    expected = {"_bilateral_fwd_kernel", "_bilateral_bwd_kernel", "_bilateral_combine_kernel", "_spatial_delta_kernel",
                "_bilateral_wide_lse_kernel", "_bilateral_wide_delta_kernel", "_bilateral_wide_bwd_kernel"}
    assert expected <= set(report["kernels"]), report["kernels"]
    assert report["addptr"] > 100
    assert report["unsafe"] == [], "\n".join(report["unsafe"])


# ----------------------------------------------------------------------------------------
# Launch plans (backends/triton/launch.py): later calls of a signature run its plan
# ----------------------------------------------------------------------------------------
# (op, B, H, Lq or M, Lk or N, D, dtype, layout, key mask, attn_mask kind). Bilateral: the fused
# forward with split partials and their combine (bf16; the interpreter pretends 8 SMs), the
# unfused fp32 forward (one launch per direction), both backward directions; cross attention in
# both directions with a per-query mask; self-attention (q is k is v on the first call); the
# wide-head backward, which has no plan (torch operations between its launches).
PLAN_CASES = [
    ("bilateral", 1, 2, 64, 300, 32, BF16, "bnhd", "mask", None),
    ("bilateral", 2, 1, 49, 97, 40, FP32, "strided", "empty", None),
    ("cross", 1, 2, 7, 130, 40, FP16, "strided", "mask", "random"),
    ("cross", 1, 1, 130, 20, 16, BF16, "bnhd", None, "empty_rows"),
    ("self", 2, 1, 33, 33, 32, BF16, "contiguous", None, None),
    ("cross", 1, 1, 20, 70, 256, BF16, "bnhd", "mask", None),
]


@needs_triton
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "-".join(str(x) for x in c[:6]) + f"-{c[6]}".replace("torch.", ""))
def test_later_calls_of_a_signature_run_its_plan_on_their_own_tensors(monkeypatch, case):
    from spatialformer_kernels.backends.triton import fused, launch
    from spatialformer_kernels.testing import (
        BILATERAL_RESULT_NAMES,
        assert_results_close,
        bilateral_results,
        cross_results,
        make_attn_mask,
        reference_bilateral_results,
    )

    op, B, H, Lq, Lk, D, dtype, layout, mask_kind, attn_kind = case
    launcher_runs = []
    for name in ("attention_fwd", "attention_bwd"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _name=name, **k: launcher_runs.append(_name) or _real(*a, **k))
    wide_backward = D > 128

    for call, seed in enumerate((21, 31)):  # the same signature, other values (masks included)
        launcher_runs.clear()
        mask = mask_for_case(B, Lk, mask_kind, device=DEVICE, seed=seed)
        if op == "bilateral":
            inputs = make_bilateral_inputs(B, H, Lq, Lk, D, dtype, device=DEVICE, layout=layout, seed=seed)
            grads = [transposed_grad((B, H, L, D), dtype, seed + i, DEVICE) for i, L in enumerate((Lq, Lk))]
            got = bilateral_results(inputs, grads, "triton", 0.3, mask)
            same, exact = reference_bilateral_results(inputs, grads, 0.3, mask)
            names = BILATERAL_RESULT_NAMES
        else:
            q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, device=DEVICE, layout=layout, seed=seed)[3]
            k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, device=DEVICE, layout=layout, seed=seed + 1)[4:]
            if op == "self" and call == 0:
                k = v = q  # one tensor in three arguments
            attn_mask = make_attn_mask(B, Lq, Lk, attn_kind, device=DEVICE, seed=seed) if attn_kind else None
            grad = transposed_grad((B, H, Lq, D), dtype, seed, DEVICE)
            got = cross_results(q, k, v, grad, "triton", 0.3, mask, attn_mask)
            same, exact = reference_cross_results(q, k, v, grad, 0.3, mask, attn_mask)
            names = CROSS_RESULT_NAMES
        assert_results_close(got, same, exact, dtype, names, f"call {call}")
        if call == 0:
            assert "attention_fwd" in launcher_runs and "attention_bwd" in launcher_runs
        else:  # from the plans; the wide-head backward runs its launcher every time
            assert launcher_runs == (["attention_bwd"] if wide_backward else []), launcher_runs
    assert any(plan is not None for plan in launch._plans.values())
