"""The C++ CPU backend itself (its parity with the reference is tests/test_kernel_parity.py,
its vector ISAs tests/test_cpu_isa.py): the first-use build (announced, cached by content, a
clean fallback without a compiler), bitwise determinism across thread counts, the
kernel-level input checks that guard it when called past the public validation, and cross
attention's per-query attn_mask through the backend's own functions (every dtype, mask
strides, both work splits, rows without a kept key, the skipped and the unmasked tile paths)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels.backends import cpu as cpu_backend
from spatialformer_kernels.reference import cross_attention_reference
from spatialformer_kernels.testing import (
    CROSS_RESULT_NAMES,
    assert_results_close,
    bilateral_results,
    case_id,
    cross_results,
    make_attn_mask,
    make_bilateral_inputs,
    make_image_mask,
    outputs_and_grads,
    reference_pair,
    transposed_grad,
)

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def test_kernel_builds_where_a_compiler_exists():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine; test_no_compiler covers this case")
    assert cpu_backend.is_available(), cpu_backend._failure
    assert "cpu" in sk.available_backends()


needs_kernel = pytest.mark.skipif(
    not HAS_COMPILER or "cpu" not in sk.available_backends(), reason="the C++ CPU kernel is not built here"
)


def _run_everything(inputs, mask, grads, threads):
    torch.set_num_threads(threads)
    return [
        *bilateral_results(inputs, grads, "cpu", image_mask=mask),
        *cross_results(inputs[0], inputs[4], inputs[5], grads[0], "cpu"),  # few queries over many keys
        *cross_results(inputs[3], inputs[1], inputs[2], grads[1], "cpu"),  # many queries over few keys
    ]


@needs_kernel
@pytest.mark.parametrize(
    "B, H, M, N, D",
    [
        (1, 2, 64, 1500, 32),  # 6 splits of N; cross attention splits both ways
        (8, 4, 5, 1100, 8),  # forward items of 576 and 524 tokens (B*H = 32), backward items of 256
    ],
)
def test_bitwise_deterministic_across_thread_counts_and_runs(B, H, M, N, D):
    inputs = make_bilateral_inputs(B, H, M, N, D, seed=9)
    mask = make_image_mask(B, N, seed=9)
    grads = (transposed_grad((B, H, M, D), FP32, 10), transposed_grad((B, H, N, D), FP32, 11))
    threads = torch.get_num_threads()
    try:
        first = _run_everything(inputs, mask, grads, 1)
        for count in (2, 1, 3):
            again = _run_everything(inputs, mask, grads, count)
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"results differ with {count} threads"
    finally:
        torch.set_num_threads(threads)


# -- kernel-level checks: what reaches the backend directly (public validation bypassed) --
def _bilateral_args(**overrides):
    q_s, k_s, v_s, q_x, k_x, v_x = make_bilateral_inputs(2, 2, 5, 7, 8)
    args = dict(q_s=q_s, k_s=k_s, v_s=v_s, q_x=q_x, k_x=k_x, v_x=v_x, scale=0.5, image_mask=None)
    args.update(overrides)
    return args


BAD_FWD = [
    (dict(q_s=torch.randn(2, 5, 8)), ["q_s", "rank 4"]),
    (dict(k_x=torch.randn(2, 2, 8, 8)), ["k_x", "[2, 2, 8, 8]", "[2, 2, 7, 8]"]),
    (dict(v_s=torch.randn(2, 2, 5, 8, dtype=torch.float64)), ["v_s", "Double", "Float"]),
    (dict(q_s=torch.randn(2, 2, 5, 8).int(), k_s=torch.randn(2, 2, 5, 8).int(), v_s=torch.randn(2, 2, 5, 8).int()),
     ["q_s", "unsupported dtype"]),
    (dict(q_x=torch.empty(2, 2, 7, 8, device="meta")), ["q_x", "CPU tensor", "meta"]),
    (dict(image_mask=torch.ones(2, 7)), ["image_mask", "bool"]),
    (dict(image_mask=torch.ones(2, 8, dtype=torch.bool)), ["image_mask", "[2, 7]"]),
    (dict(scale=float("inf")), ["scale", "finite"]),
    (dict(q_s=torch.randn(2, 2, 5, 0), k_s=torch.randn(2, 2, 5, 0), v_s=torch.randn(2, 2, 5, 0),
          q_x=torch.randn(2, 2, 7, 0), k_x=torch.randn(2, 2, 7, 0), v_x=torch.randn(2, 2, 7, 0)), ["head dim D"]),
]


@needs_kernel
@pytest.mark.parametrize("overrides,fragments", BAD_FWD, ids=lambda x: None)
def test_kernel_rejects_bad_forward_inputs(overrides, fragments):
    with pytest.raises(RuntimeError) as raised:
        cpu_backend.bilateral_fwd(**_bilateral_args(**overrides))
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@needs_kernel
@pytest.mark.parametrize(
    "which,bad,fragments",
    [
        ("lse_s", lambda t: t.float(), ["lse_s", "float64"]),
        ("lse_x", lambda t: t[..., :-1], ["lse_x", "[2, 2, 7]"]),
        ("do_x", lambda t: t[:, :, :-1], ["do_x", "[2, 2, 7, 8]"]),
        ("o_s", lambda t: t.bfloat16(), ["o_s", "BFloat16"]),
    ],
    ids=["lse-dtype", "lse-shape", "grad-shape", "saved-dtype"],
)
def test_kernel_rejects_bad_backward_inputs(which, bad, fragments):
    args = _bilateral_args()
    o_s, o_x, lse_s, lse_x = cpu_backend.bilateral_fwd(**args)
    saved = dict(do_s=torch.randn_like(o_s), do_x=torch.randn_like(o_x), o_s=o_s, o_x=o_x, lse_s=lse_s, lse_x=lse_x)
    saved[which] = bad(saved[which])
    with pytest.raises(RuntimeError) as raised:
        cpu_backend.bilateral_bwd(
            saved["do_s"], saved["do_x"], *[args[n] for n in ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x")],
            saved["o_s"], saved["o_x"], saved["lse_s"], saved["lse_x"], 0.5, None,
        )
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@needs_kernel
def test_kernel_rejects_bad_cross_inputs():
    q, k, v = make_bilateral_inputs(2, 2, 3, 9, 8)[3:]
    with pytest.raises(RuntimeError, match=r"k must have shape \[B, H, Lk, D\]"):
        cpu_backend.cross_fwd(q, k[:, :1], v[:, :1], 0.5, None, None)
    with pytest.raises(RuntimeError, match=r"v must have shape"):
        cpu_backend.cross_fwd(q, k, v[:, :, :-1], 0.5, None, None)
    with pytest.raises(RuntimeError, match=r"key_mask must have shape \[2, 9\]"):
        cpu_backend.cross_fwd(q, k, v, 0.5, torch.ones(2, 8, dtype=torch.bool), None)
    o, lse = cpu_backend.cross_fwd(q, k, v, 0.5, None, None)
    with pytest.raises(RuntimeError, match=r"lse must have shape"):
        cpu_backend.cross_bwd(torch.randn_like(o), q, k, v, o, lse[:, :1], 0.5, None, None)


# -- cross attention with attn_mask, through the backend's functions (cross_fwd, cross_bwd) --
SCALE = 0.7


def _cross_inputs(B, H, Lq, Lk, D, dtype, seed=20):
    """q in the [B, L, H, D] layout, k and v strided slices, a non-contiguous grad output."""
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, layout="bnhd", seed=seed)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, layout="strided", seed=seed + 1)[4:]
    return q, k, v, transposed_grad((B, H, Lq, D), dtype, seed + 2)


def _backend_cross(q, k, v, grad, key_mask, attn_mask):
    """([o, dq, dk, dv], lse) from the backend's kernels."""
    o, lse = cpu_backend.cross_fwd(q, k, v, SCALE, key_mask, attn_mask)
    return [o, *cpu_backend.cross_bwd(grad, q, k, v, o, lse, SCALE, key_mask, attn_mask)], lse


def _reference_cross(q, k, v, grad, key_mask, attn_mask):
    """(same_dtype, exact) [o, dq, dk, dv] of the reference, by autograd."""

    def run(*t):
        outputs, grads = outputs_and_grads(
            lambda *u: cross_attention_reference(*u, SCALE, key_mask, attn_mask=attn_mask), t[:3], t[3:]
        )
        return [*outputs, *grads]

    return reference_pair(run, [q, k, v, grad])


# (B, H, Lq, Lk, D, dtype, attn_mask kind, with key_mask). The plan (bca_cpu.cpp plan_cross)
# splits queries for Lq > 64 and few (batch, head)s, keys for Lk >= 512 once queries are
# split: Lq 100/101 over Lk 257 and 65 query splits only, Lq 1-5 over Lk 1100 key splits only,
# Lq 100 over Lk 1100 both. D = 40, 24, 8 are not whole 16-float vectors; Lk = 257, 65 and 63
# end in a ragged tile. "random" drops every key of query 0, "empty_rows" of every other query.
ATTN_MASK_CASES = [
    (2, 2, 100, 257, 40, FP32, "random", False),
    (1, 2, 3, 1100, 24, FP32, "transposed", True),
    (1, 1, 100, 1100, 32, FP16, "sliced", True),
    (2, 1, 101, 65, 8, FP64, "query_broadcast", False),
    (2, 1, 1, 5, 40, BF16, "key_broadcast", True),
    (2, 2, 5, 63, 24, FP64, "empty_rows", True),
    (1, 1, 1, 1, 8, FP32, "random", False),  # the only key dropped: o = 0, lse = -inf, no gradient
]


def _attn_case_id(case):
    """e.g. B2-H2-Lq100-Lk257-D40-fp32-random(-keymask)."""
    B, H, Lq, Lk, D, dtype, kind, with_key_mask = case
    short = case_id(B, H, Lq, Lk, D, dtype).split("-")[-1]
    return f"B{B}-H{H}-Lq{Lq}-Lk{Lk}-D{D}-{short}-{kind}" + ("-keymask" if with_key_mask else "")


@needs_kernel
@pytest.mark.parametrize("case", ATTN_MASK_CASES, ids=_attn_case_id)
def test_attn_mask_matches_reference(case):
    B, H, Lq, Lk, D, dtype, kind, with_key_mask = case
    q, k, v, grad = _cross_inputs(B, H, Lq, Lk, D, dtype)
    attn_mask = make_attn_mask(B, Lq, Lk, kind)
    key_mask = make_image_mask(B, Lk, seed=21) if with_key_mask else None
    got, lse = _backend_cross(q, k, v, grad, key_mask, attn_mask)
    same_dtype, exact = _reference_cross(q, k, v, grad, key_mask, attn_mask)
    assert_results_close(got, same_dtype, exact, dtype, CROSS_RESULT_NAMES, _attn_case_id(case))
    # a query row without a kept key: o = 0, lse = -inf and no gradient, exactly
    kept = attn_mask if key_mask is None else attn_mask & key_mask[:, None, :]
    empty = ~kept.any(-1)[:, None, :].expand(B, H, Lq)
    if kind in ("random", "empty_rows"):
        assert empty.any()
    assert torch.equal(lse.isneginf(), empty)
    o, dq = got[0], got[1]
    assert (o[empty] == 0).all() and (dq[empty] == 0).all()
    # a key no query keeps gets no gradient, exactly
    unused = ~kept.any(1)[:, None, :].expand(B, H, Lk)
    assert (got[2][unused] == 0).all() and (got[3][unused] == 0).all()


@needs_kernel
def test_attn_mask_of_all_true_is_bitwise_the_unmasked_kernel():
    """Every query keeps every key of every tile: the unmasked column path, bit for bit."""
    q, k, v, grad = _cross_inputs(1, 2, 100, 300, 40, FP32)
    everything = torch.ones(1, 1, 1, dtype=torch.bool).expand(1, 100, 300)  # stride 0 on every axis
    masked, _ = _backend_cross(q, k, v, grad, None, everything)
    unmasked, _ = _backend_cross(q, k, v, grad, None, None)
    for name, a, b in zip(CROSS_RESULT_NAMES, masked, unmasked):
        assert torch.equal(a, b), name


@needs_kernel
def test_attn_mask_skips_tiles_exactly():
    """Keys only one tile keeps for any query: the skipped tiles change no bit of the online
    softmax, so o and dq equal attention over that tile alone, and the other keys' dk, dv are 0."""
    q, k, v, grad = _cross_inputs(2, 1, 40, 200, 24, FP32)
    attn_mask = torch.zeros(2, 40, 200, dtype=torch.bool)
    attn_mask[:, :, :64] = True  # the first tile of 64 keys, for every query
    masked, _ = _backend_cross(q, k, v, grad, None, attn_mask)
    first_tile, _ = _backend_cross(q, k[:, :, :64], v[:, :, :64], grad, None, None)
    assert torch.equal(masked[0], first_tile[0]) and torch.equal(masked[1], first_tile[1])
    for got, alone in zip(masked[2:], first_tile[2:]):
        assert torch.equal(got[:, :, :64], alone)
        assert (got[:, :, 64:] == 0).all()


@needs_kernel
@pytest.mark.parametrize("Lq, Lk", [(100, 257), (5, 1100), (130, 700)], ids=["query-splits", "key-splits", "both"])
def test_attn_mask_bitwise_deterministic_across_thread_counts(Lq, Lk):
    q, k, v, grad = _cross_inputs(2, 2, Lq, Lk, 32, FP32, seed=30)
    attn_mask = make_attn_mask(2, Lq, Lk, "random", seed=31)
    key_mask = make_image_mask(2, Lk, seed=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first, _ = _backend_cross(q, k, v, grad, key_mask, attn_mask)
        for count in (2, 1, 3):
            torch.set_num_threads(count)
            again, _ = _backend_cross(q, k, v, grad, key_mask, attn_mask)
            for name, a, b in zip(CROSS_RESULT_NAMES, first, again):
                assert torch.equal(a, b), f"{name} differs with {count} threads"
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize(
    "attn_mask,fragments",
    [
        (torch.ones(2, 9, 9), ["attn_mask", "dtype bool", "Float"]),
        (torch.ones(2, 9, 8, dtype=torch.bool), ["attn_mask", "[B, Lq, Lk] = [2, 9, 9]", "[2, 9, 8]"]),
        (torch.ones(2, 1, 9, 9, dtype=torch.bool), ["attn_mask", "[B, Lq, Lk]", "[2, 1, 9, 9]"]),
        (torch.ones(9, 9, dtype=torch.bool), ["attn_mask", "[B, Lq, Lk]", "[9, 9]"]),
        (torch.empty(2, 9, 9, dtype=torch.bool, device="meta"), ["attn_mask", "CPU tensor", "meta"]),
    ],
    ids=["dtype", "shape", "rank-4", "rank-2", "device"],
)
def test_kernel_rejects_bad_attn_mask(attn_mask, fragments):
    q, k, v = make_bilateral_inputs(2, 2, 3, 9, 8)[3:]
    o, lse = cpu_backend.cross_fwd(q, k, v, 0.5, None, None)
    calls = [
        lambda: cpu_backend.cross_fwd(q, k, v, 0.5, None, attn_mask),
        lambda: cpu_backend.cross_bwd(torch.randn_like(o), q, k, v, o, lse, 0.5, None, attn_mask),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as raised:
            call()
        for fragment in fragments:
            assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


def test_no_compiler_still_imports_warns_once_and_drops_cpu(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import spatialformer_kernels as sk
            built_at_import = os.listdir(os.environ["SPATIALFORMER_KERNELS_CACHE"])
            first = sk.available_backends()
            second = sk.available_backends()
            inputs = [torch.randn(1, 1, 3, 8) for _ in range(3)] + [torch.randn(1, 1, 5, 8) for _ in range(3)]
            o_s, o_x = sk.bilateral_attention(*inputs)  # auto: the reference on CPU
            try:
                sk.bilateral_attention(*inputs, backend="cpu")
                explicit = "no error"
            except RuntimeError as error:
                explicit = str(error)
        ours = [str(w.message) for w in caught if "C++" in str(w.message)]
        print(json.dumps(dict(first=first, second=second, warnings=ours, built_at_import=built_at_import,
                              finite=bool(torch.isfinite(o_s).all() and torch.isfinite(o_x).all()),
                              explicit=explicit)))
        """
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), SPATIALFORMER_KERNELS_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["built_at_import"] == []
    assert "cpu" not in result["first"] and result["first"] == result["second"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "could not be built" in result["warnings"][0]
    assert result["finite"]
    assert "'cpu' is not available" in result["explicit"]


def test_cache_folder_depends_on_source_content_not_install_path(tmp_path):
    editable, site_packages = tmp_path / "checkout" / "csrc", tmp_path / "site-packages" / "csrc"
    for folder in (editable, site_packages):
        folder.mkdir(parents=True)
        for source in cpu_backend._source_paths():
            shutil.copyfile(source, folder / source.name)
    flags = ["-O3", "-march=native"]

    def directory(folder, flags=flags):
        return cpu_backend._build_directory([folder / name for name in cpu_backend._SOURCES], flags)

    assert directory(editable) == directory(site_packages)
    assert directory(editable) != directory(editable, ["-O3"])  # flags are part of the key
    (site_packages / "bca_cpu.cpp").write_text((site_packages / "bca_cpu.cpp").read_text() + "\n// changed\n")
    assert directory(editable) != directory(site_packages)  # so is every byte of the sources
    assert f"torch{torch.__version__.replace('+', '_')}" in directory(editable).name


def test_build_announces_start_and_end_once(tmp_path, monkeypatch, capsys):
    """With torch's compiler stubbed (it writes the library, as a build would): one line when the
    build starts and one when it ends, with the folder and the seconds; nothing when cached."""
    import torch.utils.cpp_extension

    calls = []

    def fake_load(name, sources, build_directory, **kwargs):  # like ninja: builds only what is missing
        calls.append(sources)
        library = cpu_backend.Path(build_directory) / f"{name}.so"
        if not library.exists():
            library.write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setenv("SPATIALFORMER_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.ops, "sfk_test_namespace", type("Ops", (), {"vector_isa": staticmethod(lambda: "avx2")}),
                        raising=False)

    cpu_backend._load(["-O3"], "sfk_test_namespace", "portable")
    first = capsys.readouterr().err.strip().splitlines()
    directory = cpu_backend._build_directory(cpu_backend._source_paths(), ["-O3"])
    assert len(first) == 2, first
    assert first[0].startswith("spatialformer_kernels: building the C++ CPU kernel (portable) in ")
    assert str(directory) in first[0]
    assert first[1].startswith("spatialformer_kernels: built the C++ CPU kernel (avx2) in ")
    assert " s, cached in " in first[1] and str(directory) in first[1]
    # compiled from the cache folder's own copy of the sources, not the install path
    assert calls[0] == [str(directory / "src" / "bca_cpu.cpp")]
    assert (directory / "src" / "bca_cpu_kernels.h").read_bytes() == cpu_backend._source_paths()[1].read_bytes()

    cpu_backend._load(["-O3"], "sfk_test_namespace", "portable")  # cached: the library is unchanged
    assert capsys.readouterr().err == ""

