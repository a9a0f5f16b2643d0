"""C++ CPU kernel backend: csrc/bca_cpu.cpp, compiled on first use and cached per machine.

Why compile on first use instead of at `pip install`: building a torch extension at install
time needs torch inside the build environment (so `pip install` would need
`--no-build-isolation` and a preinstalled torch), ties the binary to the torch that happened
to be installed then (its C++ ABI breaks on the next torch upgrade), and makes the whole
install fail on a machine without a compiler. Instead the package is pure Python; the first
call that needs the CPU kernel (`backend="cpu"`, `backend="auto"` on CPU tensors, or
`available_backends()`) compiles it once with `torch.utils.cpp_extension.load` (about 30 s,
announced on stderr when it starts and when it ends) into a cache folder named by the
content of the sources, the torch and Python versions, the compiler and its flags and (for
`-march=native` builds) a CPU fingerprint. The sources are copied into that folder and
compiled from there, so the same sources installed editable and non-editable share one
build, a torch upgrade rebuilds, and a home directory shared by different CPUs never loads a
binary built for another one. Without a working compiler the build fails once, one warning
says so, and the "cpu" backend is simply unavailable (CPU tensors then use the reference).
Importing the package never builds.

Vector ISA: the build targets the widest ISA of the CPU it runs on (-march=native: AVX-512
or AVX2 through ATen's at::vec, the generic at::vec code elsewhere), with a portable build as
the fallback. `load_isa_build` builds the same sources for one named ISA in an ops namespace
of its own, so the tests check every ISA the CPU can run, not only the widest.

Environment:
- SPATIALFORMER_KERNELS_CACHE: cache root (default $XDG_CACHE_HOME or ~/.cache, then
  spatialformer_kernels/).
- SPATIALFORMER_KERNELS_NO_CPU=1: never build; the "cpu" backend is unavailable.
- CXX: the compiler, as for any torch extension.

The kernel's layout (tiles, work items, partials) is described at the top of csrc/bca_cpu.cpp.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_CSRC = Path(__file__).resolve().parent / "csrc"  # shipped as package data, editable or not
_SOURCES = ("bca_cpu.cpp", "bca_cpu_kernels.h")
_BASE_FLAGS = ["-O3", "-fopenmp"]
_NAMESPACE = "spatialformer_cpu"
# The package's build, tried in order: the native ISA first, then a portable build.
_DEFAULT_ISA_FLAGS = (["-march=native"], [])
# One build per vector ISA, for the tests: the names are what the build's vector_isa() reports.
ISA_FLAGS = {
    "avx512": ["-march=native"],
    "avx2": ["-march=native", "-mno-avx512f"],  # drops every AVX-512 extension with it
    "default": [],  # x86-64 baseline: ATen's generic at::vec code
}

_lock = threading.Lock()
_extension = None  # torch.ops.spatialformer_cpu once loaded
_failure: str | None = None
_isa_builds: dict = {}


def _cpu_info() -> str:
    """The first processor block of /proc/cpuinfo (empty where there is none)."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip() == "":
                    break
                lines.append(line)
    except OSError:
        pass
    return "".join(lines)


def _cpu_fingerprint() -> str:
    """Model name and ISA flags of this CPU, so -march=native binaries are never shared."""
    text = platform.machine() + platform.processor()
    info = [line for line in _cpu_info().splitlines()
            if line.split(":", 1)[0].strip() in ("model name", "flags", "Features", "CPU part", "CPU implementer")]
    text += "\n".join(info) if info else platform.platform()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cpu_isas() -> list[str]:
    """The vector ISAs of `ISA_FLAGS` this CPU runs, widest first (always ends with "default")."""
    flags = set()
    for line in _cpu_info().splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            flags = set(line.split(":", 1)[1].split())
    isas = []
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        isas.append("avx512")
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    return isas + ["default"]


def _cache_root() -> Path:
    root = os.environ.get("SPATIALFORMER_KERNELS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spatialformer_kernels"


def _source_paths() -> list[Path]:
    return [_CSRC / name for name in _SOURCES]


def _build_directory(sources: list[Path], flags: list[str]) -> Path:
    """The cache folder of one build: named by what goes into the binary, never by where the
    package is installed."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(os.environ.get("CXX", "").encode())
    cpu = _cpu_fingerprint() if "-march=native" in flags else "portable"
    name = (
        f"bca_cpu-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
        f"-{cpu}-{digest.hexdigest()[:12]}"
    )
    return _cache_root() / name


def _say(message: str) -> None:
    print(f"spatialformer_kernels: {message}", file=sys.stderr, flush=True)


def _load(flags: list[str], namespace: str, label: str):
    """Compile (or reuse the cached build of) csrc/ with `flags` and return torch.ops.<namespace>."""
    # A CPU build needs no CUDA: keep torch's "No CUDA runtime is found, using CUDA_HOME=..."
    # (logged when cpp_extension is first imported) off the user's console.
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_extension_log.setLevel(level)

    sources = _source_paths()
    directory = _build_directory(sources, flags)
    source_dir = directory / "src"
    source_dir.mkdir(parents=True, exist_ok=True)
    for path in sources:  # compiled from the cache folder: the install path never reaches ninja
        copy = source_dir / path.name
        if not copy.exists() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)
    library = directory / f"{namespace}.so"
    built_before = library.stat().st_mtime_ns if library.exists() else None
    if built_before is None:
        _say(f"building the C++ CPU kernel ({label}) in {directory} (first use only, about 30 s) ...")
    start = time.perf_counter()
    # torch's own compiler checks warn; the one warning the user sees is ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # is_python_module=False: the ops register with TORCH_LIBRARY (no pybind11).
        load(
            name=namespace,
            sources=[str(source_dir / name) for name in _SOURCES if name.endswith(".cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    ops = getattr(torch.ops, namespace)
    if not library.exists() or library.stat().st_mtime_ns != built_before:
        _say(f"built the C++ CPU kernel ({ops.vector_isa()}) in {time.perf_counter() - start:.1f} s, "
             f"cached in {directory}")
    return ops


def _build():
    """The package's build: the native ISA, else portable; return torch.ops.spatialformer_cpu."""
    errors = []
    for isa in _DEFAULT_ISA_FLAGS:
        flags = _BASE_FLAGS + isa
        try:
            return _load(flags, _NAMESPACE, "for this CPU: -march=native" if isa else "portable")
        except Exception as error:  # compiler missing, flag unsupported, ...
            errors.append(f"[{' '.join(flags)}] {type(error).__name__}: {str(error).strip()[-600:]}")
    raise RuntimeError("\n".join(errors))


def load_isa_build(isa: str):
    """Build the kernel for one vector ISA of `cpu_isas()` in an ops namespace of its own and
    return that namespace (the same ops as the package's build: bilateral_fwd, bilateral_bwd,
    cross_fwd, cross_bwd, vector_isa). For tests; raises RuntimeError if the build fails."""
    if isa not in cpu_isas():
        raise ValueError(f"this CPU cannot run the {isa!r} build; it runs {cpu_isas()}")
    if is_available() and vector_isa() == isa:  # the package's own build already is that ISA
        return _extension
    with _lock:
        if isa not in _isa_builds:
            namespace = f"{_NAMESPACE}_{isa}"
            flags = _BASE_FLAGS + ISA_FLAGS[isa] + [f"-DSFK_OPS_NAMESPACE={namespace}"]
            _isa_builds[isa] = _load(flags, namespace, isa)
        return _isa_builds[isa]


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


def cross_fwd(q, k, v, scale, key_mask, attn_mask=None):
    """attn_mask: bool [B, Lq, Lk] or None, any strides (a broadcast view is read in place)."""
    return tuple(_ext().cross_fwd(q, k, v, float(scale), key_mask, attn_mask))


def cross_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask=None):
    return tuple(_ext().cross_bwd(do, q, k, v, o, lse, float(scale), key_mask, attn_mask))
