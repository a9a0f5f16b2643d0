"""The C++ CPU backend itself (its parity with the reference is tests/test_kernel_parity.py,
its vector ISAs tests/test_cpu_isa.py): the first-use build (announced, cached by content, a
clean fallback without a compiler), bitwise determinism across thread counts, and the
kernel-level input checks that guard it when called past the public validation."""
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
from spatialformer_kernels.testing import (
    bilateral_results,
    cross_results,
    make_bilateral_inputs,
    make_image_mask,
    transposed_grad,
)

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
FP32 = torch.float32


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
        cpu_backend.cross_fwd(q, k[:, :1], v[:, :1], 0.5, None)
    with pytest.raises(RuntimeError, match=r"v must have shape"):
        cpu_backend.cross_fwd(q, k, v[:, :, :-1], 0.5, None)
    with pytest.raises(RuntimeError, match=r"key_mask must have shape \[2, 9\]"):
        cpu_backend.cross_fwd(q, k, v, 0.5, torch.ones(2, 8, dtype=torch.bool))
    o, lse = cpu_backend.cross_fwd(q, k, v, 0.5, None)
    with pytest.raises(RuntimeError, match=r"lse must have shape"):
        cpu_backend.cross_bwd(torch.randn_like(o), q, k, v, o, lse[:, :1], 0.5, None)


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

