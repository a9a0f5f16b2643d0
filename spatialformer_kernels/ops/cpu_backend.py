"""C++ CPU kernel backend: csrc/bca_cpu.cpp, compiled on first use and cached per machine.

Why compile on first use instead of at `pip install`: building a torch extension at install
time needs torch inside the build environment (so `pip install` would need
`--no-build-isolation` and a preinstalled torch), ties the binary to the torch that happened
to be installed then (its C++ ABI breaks on the next torch upgrade), and makes the whole
install fail on a machine without a compiler. Instead the package is pure Python; the first
call that needs the CPU kernel (`backend="cpu"`, `backend="auto"` on CPU tensors, or
`available_backends()`) compiles it once with `torch.utils.cpp_extension.load` into a cache
directory keyed by the torch version, Python version, compiler flags, source hash and (for
`-march=native` builds) a CPU fingerprint, so a torch upgrade rebuilds automatically and a
home directory shared by different CPUs never loads a binary built for another one. Without
a working compiler the build fails once, one warning says so, and the "cpu" backend is
simply unavailable (CPU tensors then use the reference). Importing the package never builds.

Environment:
- SPATIALFORMER_KERNELS_CACHE: cache root (default $XDG_CACHE_HOME or ~/.cache, then
  spatialformer_kernels/).
- SPATIALFORMER_KERNELS_NO_CPU=1: never build; the "cpu" backend is unavailable.
- CXX: the compiler, as for any torch extension.

Kernel layout (see the comment at the top of csrc/bca_cpu.cpp): tiles of 64 tokens (16 image
queries in the bilateral forward's direction x) read through their strides into fp32 buffers
(fp64 for float64 inputs; fp32 rows with unit stride along D are used in place, nothing is made
contiguous), register-blocked micro-GEMMs with ATen's at::vec (AVX2/AVX-512 as the build
machine allows; the AVX2 float block is written with AVX2 intrinsics, which GCC keeps in
registers), softmax over transposed logits, work items whose size depends on the shapes only,
under at::parallel_for, partials reduced in a fixed order (bitwise identical results for any
thread count).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_SOURCES = ("bca_cpu.cpp", "bca_cpu_kernels.h")
_BASE_FLAGS = ["-O3", "-fopenmp"]
# Tried in order: the native ISA first (AVX2/AVX-512 via at::vec), then a portable build.
_ISA_FLAGS = (["-march=native"], [])

_lock = threading.Lock()
_extension = None  # torch.ops.spatialformer_cpu once loaded
_failure: str | None = None


def _cpu_fingerprint() -> str:
    """Model name and ISA flags of this CPU, so -march=native binaries are never shared."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                    text += line
                if line.strip() == "":  # the first processor block is enough
                    break
    except OSError:
        text += platform.platform()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_root() -> Path:
    root = os.environ.get("SPATIALFORMER_KERNELS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spatialformer_kernels"


def _source_paths() -> list[Path]:
    package = importlib.resources.files("spatialformer_kernels.csrc")
    return [Path(str(package.joinpath(name))) for name in _SOURCES]


def _build_directory(sources: list[Path], flags: list[str]) -> Path:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(os.environ.get("CXX", "").encode())
    cpu = _cpu_fingerprint() if "-march=native" in flags else "portable"
    name = (
        f"bca_cpu-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
        f"-{cpu}-{digest.hexdigest()[:12]}"
    )
    return _cache_root() / name


def _build():
    """Compile (or reuse the cached build of) csrc/ and load it; return torch.ops.spatialformer_cpu."""
    from torch.utils.cpp_extension import load

    sources = _source_paths()
    errors = []
    for isa in _ISA_FLAGS:
        flags = _BASE_FLAGS + isa
        directory = _build_directory(sources, flags)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            # torch's own compiler checks warn; the one warning the user sees is ours.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # is_python_module=False: the ops register with TORCH_LIBRARY (no pybind11).
                load(
                    name="spatialformer_bca_cpu",
                    sources=[str(p) for p in sources if p.suffix == ".cpp"],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(directory),
                    is_python_module=False,
                    verbose=False,
                )
            return torch.ops.spatialformer_cpu
        except Exception as error:  # compiler missing, flag unsupported, ...
            errors.append(f"[{' '.join(flags)}] {type(error).__name__}: {str(error).strip()[-600:]}")
    raise RuntimeError("\n".join(errors))


def _ext():
    if not is_available():
        raise RuntimeError(f"the C++ CPU kernel is not available: {_failure}")
    return _extension


def is_available() -> bool:
    """Build (first call only) and load the extension; False, with one warning, if that fails."""
    global _extension, _failure
    with _lock:
        if _extension is not None:
            return True
        if _failure is not None:
            return False
        if os.environ.get("SPATIALFORMER_KERNELS_NO_CPU", "0") == "1":
            _failure = "disabled by SPATIALFORMER_KERNELS_NO_CPU=1"
            return False
        try:
            _extension = _build()
            return True
        except Exception as error:
            _failure = str(error)
            warnings.warn(
                "spatialformer_kernels: the C++ CPU kernel could not be built, so the 'cpu' backend is "
                "unavailable and CPU tensors use the reference implementation. Install a C++ compiler "
                f"(e.g. g++) with OpenMP support to enable it. Build error:\n{_failure}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False


def vector_isa() -> str:
    """The vector ISA the loaded build uses: "avx512", "avx2" or "default"."""
    return _ext().vector_isa()


def bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask):
    return tuple(_ext().bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, float(scale), image_mask))


def bilateral_bwd(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask):
    return tuple(
        _ext().bilateral_bwd(
            do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, float(scale), image_mask
        )
    )


def cross_fwd(q, k, v, scale, key_mask):
    return tuple(_ext().cross_fwd(q, k, v, float(scale), key_mask))


def cross_bwd(do, q, k, v, o, lse, scale, key_mask):
    return tuple(_ext().cross_bwd(do, q, k, v, o, lse, float(scale), key_mask))
