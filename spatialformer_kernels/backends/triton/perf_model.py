"""Modelled time of every recorded launch, from the bytes it must move and the machine code it runs.

Every figure here is MODELLED (no GPU ran it). Per kernel launch:
- bytes: each tensor the launch reads or writes (inputs read once, outputs, LSEs, masks and
  split partials written once; re-reads of data one wave shares, such as the spatial side,
  the mask rows or the chunks several programs of one split read, are counted once as L2
  hits). Torch operations the launcher runs between kernels (split reductions, casts) move
  their inputs and outputs.
- memory time: the larger of bytes / HBM bandwidth and the busiest SM's bytes / PER_SM_BW
  (an SM keeps a bounded number of bytes in flight: with few CTAs, bandwidth is per SM).
- issue time: warp-instructions of the busiest SM (ceil(CTAs / SMs) CTAs, each num_warps x
  (prologue/epilogue + tiles x main-loop instructions), all from the SASS) over
  clock x IPC_eff, IPC_eff = min(IPC, WARP_IPC x resident warps per SM).
- tensor time (16-bit only): FLOPs of the padded tiles over the dense tensor-core peak,
  times the wave tail (ceil(CTAs / SMs) x SMs / CTAs).
- modelled = max(memory, issue, tensor) + LAUNCH_US, summed over the launches of a pass.

The roofline of a pass is the bytes of the operation itself (its inputs read once, its
outputs and LSEs written once) over the bandwidth; `modelled_pct_roofline` = roofline /
modelled. SDPA is modelled from FlashAttention-2's public launch heuristics (see `sdpa_pass`),
one call per direction.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from .configs import cdiv, next_power_of_2, split_lengths
from .launch_record import Case, KernelLaunch, TorchOp, bind, binder_for, case_tensors, facade, kernel_fn, \
    record


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    bandwidth: float  # bytes/s, HBM
    clock: float  # Hz, the SM clock the datasheet's dense tensor rate implies
    tensor_flops: float  # dense 16-bit FLOP/s (tensor cores)
    fp32_per_clk: int  # FP32 lanes per SM per clock
    hmma_fraction: float  # share of `tensor_flops` mma.sync (HMMA) reaches; sm_90's full rate needs wgmma


GPUS = {
    # H100 SXM: 3.35 TB/s; 990 TFLOP/s dense bf16 = 132 SMs x 4096 FLOP/clk x 1.83 GHz.
    "h100": Gpu("H100 SXM", 90, 132, 3.35e12, 1.83e9, 989e12, 128, 0.6),
    # H200: the H100's SMs and clocks with HBM3e at 4.8 TB/s (vendor datasheet).
    "h200": Gpu("H200 SXM", 90, 132, 4.8e12, 1.83e9, 989e12, 128, 0.6),
    # A100 SXM 80 GB: 2.0 TB/s; 312 TFLOP/s = 108 SMs x 2048 FLOP/clk x 1.41 GHz; HMMA is its native path.
    "a100": Gpu("A100 SXM", 80, 108, 2.0e12, 1.41e9, 312e12, 64, 1.0),
}

# Assumptions of the model (stated in every output that uses them). The four constants were the
# best of a grid against 18 launcher passes measured on an H200 (benchmarks/fit_perf_model.py;
# benchmarks/results/static-model/fit-h200.json): rms log error 0.14, against 0.46 for the
# first guesses (IPC 2, WARP_IPC 0.25, 60 GB/s per SM, 2 us per launch), which modelled every
# pass 1.1-2.1x too fast. The optimum is flat: against the configs launched since b178589 the
# grid's best (IPC 1.5, 4 us per launch) scores 0.133 and these 0.134, so they are kept.
IPC = 1.25  # sustained warp-instructions per cycle per SM (peak 4: MMA, MUFU.EX2 at 16/clk/SM and
#             shared-memory ops share issue with dependent FP32 chains)
WARP_IPC = 0.3  # one warp issues at most about one instruction per 3 cycles (dependent-issue latency)
PER_SM_BW = 20e9  # bytes/s one SM sustains from HBM (bounded bytes in flight / loaded latency)
LAUNCH_US = 1.5  # fixed cost per kernel launch on the GPU (back-to-back gap, ramp and drain)
# FlashAttention-2 (SDPA's flash backend, `sdpa_pass`): its own two constants, the best of a
# grid against its 8 passes measured on the H200 (fit-h200.json's "sdpa"): rms log error 0.15,
# 0.78x to 1.30x the measured time; the first guesses (our kernels' 20 GB/s per SM, dots at
# 80%) modelled every pass 1.5-2.4x too fast (rms log error 0.67).
FA2_PER_SM_BW = 10e9  # bytes/s one SM sustains in its kernels
FA2_MMA_EFFICIENCY = 0.3  # share of the mma.sync (HMMA) rate its dots reach
ASSUMPTIONS = (
    f"MODELLED, not measured. IPC {IPC} warp-instr/clk/SM sustained (peak 4), at most {WARP_IPC} per resident warp; "
    f"one SM sustains at most {PER_SM_BW / 1e9:.0f} GB/s; {LAUNCH_US} us fixed per launch; memory time counts "
    "each tensor once (shared re-reads are L2 hits); main-loop instructions are the static SASS body with nested "
    "loops scaled by their trips and every branch inside taken; 16-bit tensor time at the dense peak; "
    "each launch is modelled with the config it launches with (configs.launch_config). SDPA: FlashAttention-2 launch "
    f"heuristics (see perf_model.sdpa_pass), {FA2_PER_SM_BW / 1e9:g} GB/s per SM, dots at {FA2_MMA_EFFICIENCY:g} of "
    "the mma.sync rate (fitted)."
)

# Which pointer arguments a launch reads or writes, by kernel, as a predicate on its constexprs.
_ALWAYS = lambda c: True  # noqa: E731
USAGE = {
    "_bilateral_fwd_kernel": {
        "Q_S": lambda c: c["DIR_S"], "K_S": lambda c: c["DIR_X"], "V_S": lambda c: c["DIR_X"],
        "Q_X": lambda c: c["DIR_X"], "K_X": lambda c: c["DIR_S"], "V_X": lambda c: c["DIR_S"],
        "IMAGE_MASK": lambda c: c["HAS_IMAGE_MASK"], "SPATIAL_MASK": lambda c: c["HAS_SPATIAL_MASK"],
        "PAIR_MASK": lambda c: c.get("HAS_PAIR_MASK", False),
        "O_X": lambda c: c["DIR_X"], "LSE_X": lambda c: c["DIR_X"],
        "O_S": lambda c: c["DIR_S"] and c.get("ONE_SPLIT", False),
        "LSE_S": lambda c: c["DIR_S"] and c.get("ONE_SPLIT", False),
        "PART": lambda c: c["DIR_S"] and not c.get("ONE_SPLIT", False),
    },
    "_bilateral_combine_kernel": {n: _ALWAYS for n in ("PART", "O_S", "LSE_S")},
    "_spatial_delta_kernel": {n: _ALWAYS for n in ("O_S", "DO_S", "DELTA_S")},
    "_reduce_splits_kernel": {"PART_A": _ALWAYS, "OUT_A": _ALWAYS,
                              "PART_B": lambda c: c["N_PARTS"] >= 2, "OUT_B": lambda c: c["N_PARTS"] >= 2,
                              "PART_C": lambda c: c["N_PARTS"] == 3, "OUT_C": lambda c: c["N_PARTS"] == 3},
    "_bilateral_bwd_kernel": {
        "Q_S": lambda c: c["DIR_S"], "K_S": lambda c: c["DIR_X"], "V_S": lambda c: c["DIR_X"],
        "O_S": lambda c: c["DIR_S"] and c["M_ONE_BLOCK"], "DO_S": lambda c: c["DIR_S"],
        "DELTA_S": lambda c: c["DIR_S"] and not c["M_ONE_BLOCK"],
        "Q_X": lambda c: c["DIR_X"], "K_X": lambda c: c["DIR_S"], "V_X": lambda c: c["DIR_S"],
        "O_X": lambda c: c["DIR_X"] and not c["M_ONE_BLOCK"], "DO_X": lambda c: c["DIR_X"],
        "LSE_S": lambda c: c["DIR_S"], "LSE_X": lambda c: c["DIR_X"],
        "IMAGE_MASK": lambda c: c["HAS_IMAGE_MASK"], "SPATIAL_MASK": lambda c: c["HAS_SPATIAL_MASK"],
        "PAIR_MASK": lambda c: c.get("HAS_PAIR_MASK", False),
        "DQ_X": lambda c: c["DIR_X"], "DK_X": lambda c: c["DIR_S"], "DV_X": lambda c: c["DIR_S"],
        "PART_DQ_S": lambda c: c["DIR_S"], "PART_DK_S": lambda c: c["DIR_X"], "PART_DV_S": lambda c: c["DIR_X"],
    },
    "_bilateral_wide_lse_kernel": {"Q": _ALWAYS, "K": _ALWAYS, "KEY_MASK": lambda c: c["HAS_MASK"],
                                   "PAIR_MASK": lambda c: c.get("HAS_PAIR_MASK", False), "PART_MAX": _ALWAYS, "PART_SUM": _ALWAYS},
    "_bilateral_wide_delta_kernel": {n: _ALWAYS for n in ("O", "DO", "DELTA")},
    "_bilateral_wide_bwd_kernel": {
        "Q": _ALWAYS, "DO": _ALWAYS, "K": _ALWAYS, "V": _ALWAYS, "LSE": _ALWAYS, "DELTA": _ALWAYS,
        "KEY_MASK": lambda c: c["HAS_MASK"], "PAIR_MASK": lambda c: c.get("HAS_PAIR_MASK", False), "D_IMAGE_A": _ALWAYS, "D_IMAGE_B": lambda c: c["QUERIES_SPATIAL"],
        "PART_A": _ALWAYS, "PART_B": lambda c: not c["QUERIES_SPATIAL"],
    },
}


def launch_bytes(launch: KernelLaunch) -> int:
    args = launch.named()
    used, seen = 0, set()
    for name, pred in USAGE[launch.name].items():
        t = args[name]
        if pred(launch.kwargs) and isinstance(t, torch.Tensor) and (t.data_ptr(), t.numel()) not in seen:
            seen.add((t.data_ptr(), t.numel()))
            used += t.numel() * t.element_size()
    return used


def loop_shape(launch: KernelLaunch, config: dict) -> tuple[int, int, float]:
    """(main-loop trips of the longest CTA, main-loop trips summed over the grid, nested-loop trips)."""
    a, k = launch.named(), {**launch.kwargs, **config}
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    n = launch.name
    if n in ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel", "_bilateral_wide_lse_kernel",
             "_bilateral_wide_bwd_kernel"):
        chunk, splits = a["CHUNK"], a["SPLITS"]
        length, block = (a["LK"], k["BLOCK_C"]) if n == "_bilateral_wide_lse_kernel" else (a["N"], k["BLOCK_N"])
        per_split = [cdiv(tokens, block) for tokens in split_lengths(length, chunk, splits)]
        others = grid[0] * grid[1] * grid[2] // splits
        if n == "_bilateral_fwd_kernel":
            inner = cdiv(a["M"], k["BLOCK_M"]) / grid[2] if k["DIR_X"] else 1
        elif n == "_bilateral_bwd_kernel":
            inner = 1 if k["M_ONE_BLOCK"] else cdiv(a["M"], k["BLOCK_M"])
        elif n == "_bilateral_wide_lse_kernel":
            inner = cdiv(a["D"], k["BLOCK_DC"])
        else:
            inner = cdiv(a["M"], k["BLOCK_M"]) * cdiv(a["D"], k["BLOCK_DC"])
        return max(per_split), sum(per_split) * others, max(1.0, inner)
    ctas = grid[0] * grid[1] * grid[2]
    if n == "_bilateral_combine_kernel":
        trips = cdiv(a["SPLITS"], k["BLOCK_S"])
        return trips, trips * ctas, 1.0
    if n == "_reduce_splits_kernel":
        trips = cdiv(a["SPLITS"], k["SPLIT_ROWS"])
        return trips, trips * ctas, 1.0
    if n == "_bilateral_wide_delta_kernel":
        trips = cdiv(a["D"], k["BLOCK_DC"])
        return trips, trips * ctas, 1.0
    return 0, 0, 1.0  # no loop: the whole kernel is its prologue


def launch_flops(launch: KernelLaunch, config: dict) -> float:
    """Multiply-add FLOPs of the padded dot tiles (tensor-core work) of one launch."""
    a, k = launch.named(), {**launch.kwargs, **config}
    bh = launch.grid[0]
    pad = lambda x, b: cdiv(x, b) * b  # noqa: E731
    n = launch.name
    if n == "_bilateral_fwd_kernel":
        dirs = int(k["DIR_S"]) + int(k["DIR_X"])
        return 2 * 2 * dirs * bh * pad(a["M"], k["BLOCK_M"]) * pad(a["N"], k["BLOCK_N"]) * k["BLOCK_D"]
    if n == "_bilateral_bwd_kernel":
        extra = 0.0 if k["M_ONE_BLOCK"] or not k["DIR_X"] else 1.0  # delta as a dot
        return 2 * (5 + extra) * bh * pad(a["M"], k["BLOCK_M"]) * pad(a["N"], k["BLOCK_N"]) * k["BLOCK_D"]
    if n == "_bilateral_wide_bwd_kernel":
        chunks = cdiv(a["D"], k["BLOCK_DC"])
        return 2 * (2 * chunks + 3) * bh * pad(a["M"], k["BLOCK_M"]) * pad(a["N"], k["BLOCK_N"]) * k["BLOCK_DC"] * chunks
    if n == "_bilateral_wide_lse_kernel":
        return 2 * bh * pad(a["LQ"], k["BLOCK_R"]) * pad(a["LK"], k["BLOCK_C"]) * pad(a["D"], k["BLOCK_DC"])
    return 0.0


def longest_cta(launch: KernelLaunch, config: dict, loop: float, prologue: int, tail_code: int) -> float:
    """Instructions per warp of the longest CTA of a launch whose partial last tile is compiled
    apart (TAIL_BLOCK_N: the forward, the one-block backward): each split runs its full tiles in the main loop and, where it ends in a
    partial tile, the tail code once (`tail_code`: the instructions a TAIL_BLOCK_N=0 twin lacks)."""
    a, block = launch.named(), {**launch.kwargs, **config}["BLOCK_N"]
    chunk, splits, n = a["CHUNK"], a["SPLITS"], a["N"]
    lengths = split_lengths(n, chunk, splits)
    return prologue + max(length // block * loop + (tail_code if length % block else 0) for length in lengths)


def memory_us(nbytes: float, ctas: int, gpu: Gpu, per_sm_bw: float | None = None) -> float:
    """A launch's memory time: the larger of its bytes at HBM bandwidth and its busiest SM's
    bytes at `per_sm_bw` (default PER_SM_BW)."""
    per_sm_bw = PER_SM_BW if per_sm_bw is None else per_sm_bw
    return max(nbytes / gpu.bandwidth, nbytes * math.ceil(ctas / gpu.sms) / ctas / per_sm_bw) * 1e6


def sustained_ipc(ctas: int, ctas_per_sm: int, warps: int, gpu: Gpu, ipc: float | None = None,
                  warp_ipc: float | None = None) -> float:
    """Warp-instructions per clock the busiest SM sustains: `ipc` (default IPC), or less with few
    resident warps (`warp_ipc` each, default WARP_IPC)."""
    resident = max(1, min(ctas_per_sm, math.ceil(ctas / gpu.sms))) * warps
    return min(IPC if ipc is None else ipc, (WARP_IPC if warp_ipc is None else warp_ipc) * resident)


def model_kernel(launch: KernelLaunch, config: dict, facts: dict, gpu: Gpu, no_tail_facts: dict | None = None) -> dict:
    """Modelled time of one kernel launch at one config, from its compile facts. no_tail_facts:
    for a forward or backward with a partial-tile branch (TAIL_BLOCK_N), the facts of its twin
    compiled without it, so the tail code counts only in the splits that run it (`longest_cta`)."""
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    ctas = grid[0] * grid[1] * grid[2]
    warps = config["num_warps"]
    per_sm = math.ceil(ctas / gpu.sms)
    tail = per_sm * gpu.sms / ctas
    nbytes = launch_bytes(launch)
    mem_us = memory_us(nbytes, ctas, gpu)
    max_trips, total_trips, inner = loop_shape(launch, config)
    loop = facts["loop_dynamic"] + facts["loop_per_inner_trip"] * (inner - 1)
    prologue = facts["instructions"] - facts["loop_static"]
    if no_tail_facts is not None:
        base = no_tail_facts["instructions"] - no_tail_facts["loop_static"]
        per_cta = longest_cta(launch, config, loop, base, max(0, prologue - base)) * warps
    else:
        per_cta = (prologue + max_trips * loop) * warps
    ipc = sustained_ipc(ctas, facts["ctas_per_sm"], warps, gpu)
    issue_us = per_sm * per_cta / (gpu.clock * ipc) * 1e6
    tensor_us = 0.0
    if facts["tensor_core_ops"]:
        rate = gpu.tensor_flops * (1.0 if facts["hgmma"] or gpu.arch == 80 else gpu.hmma_fraction)
        tensor_us = launch_flops(launch, config) * tail / rate * 1e6
    modelled = max(mem_us, issue_us, tensor_us) + LAUNCH_US
    block_n = config.get("BLOCK_N", launch.kwargs.get("BLOCK_N"))
    return dict(
        bytes=nbytes, roofline_us=nbytes / gpu.bandwidth * 1e6, mem_us=mem_us, issue_us=issue_us,
        tensor_us=tensor_us, modelled_us=modelled, modelled_pct_roofline=100 * nbytes / gpu.bandwidth * 1e6 / modelled,
        ctas=ctas, waves=math.ceil(ctas / max(1, facts["ctas_per_sm"] * gpu.sms)),
        tail=tail, ipc=ipc, warp_instructions=(prologue * ctas + total_trips * loop) * warps,
        loop_instr_per_64_tokens=(loop * 64 / block_n) if block_n and facts["loop_static"] else None,
    )


def model_torch_op(op: TorchOp, gpu: Gpu) -> dict:
    nbytes = op.bytes_in + op.bytes_out
    t = nbytes / gpu.bandwidth * 1e6
    return dict(bytes=nbytes, roofline_us=t, mem_us=t, issue_us=0.0, tensor_us=0.0, modelled_us=t + LAUNCH_US,
                modelled_pct_roofline=100 * t / (t + LAUNCH_US))


# ----------------------------------------------------------------------------------------
# The operation's own bytes (the roofline) and SDPA (FlashAttention-2) for comparison
# ----------------------------------------------------------------------------------------
def directions(case: Case):
    """[(queries, keys, mask on the keys)] of the case, one per attention call."""
    if case.op == "bilateral":
        return [(case.M, case.N, case.mask), (case.N, case.M, False)]
    if case.op == "cross_s":
        return [(case.M, case.N, case.mask)]
    return [(case.N, case.M, case.mask)]


def op_bytes(case: Case, backward: bool, lse_bytes: int = 8) -> int:
    """Bytes the operation itself must move: inputs read once, outputs and LSEs written once
    (our LSE is float64); the backward reads inputs, outputs, their gradients and the LSEs and
    writes the input gradients."""
    e = torch.tensor([], dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
                     ).element_size()
    bh, d = case.B * case.H, case.D
    total = 0
    for lq, lk, mask in directions(case):
        tiles = (4 * lq + 4 * lk) if backward else (2 * lq + 2 * lk)  # q, o (+do, dq); k, v (+dk, dv)
        total += tiles * bh * d * e + bh * lq * lse_bytes + (case.B * lk if mask else 0)
    return total


def _fa2_splits(work: int, slots: int, n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's split-KV choice (num_splits_heuristic, described): no split once the
    (batch x heads x query blocks) fill 80% of the slots; else the fewest splits whose wave
    efficiency is within 85% of the best."""
    if work >= 0.8 * slots:
        return 1
    top = min(max_splits, slots, n_blocks)

    def eligible(s):
        return s == 1 or math.ceil(n_blocks / s) != math.ceil(n_blocks / (s - 1))

    def efficiency(s):
        waves = work * s / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, top + 1) if eligible(s))
    return next(s for s in range(1, top + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def _fa2_launch(gpu, ctas, nbytes, logits, flops, softmax_ops, fa2: tuple):
    per_sm_bw, mma_efficiency = fa2
    per_sm = math.ceil(ctas / gpu.sms)
    tc_per_clk = gpu.tensor_flops / gpu.clock / gpu.sms * gpu.hmma_fraction * mma_efficiency
    cycles_per_cta = logits / ctas * (1 / 16 + softmax_ops / gpu.fp32_per_clk) + flops / ctas / tc_per_clk
    compute_us = per_sm * cycles_per_cta / gpu.clock * 1e6
    return max(memory_us(nbytes, ctas, gpu, per_sm_bw), compute_us) + LAUNCH_US


def sdpa_pass(case: Case, gpu: Gpu, backward: bool, fa2: tuple | None = None) -> float | None:
    """Modelled time of torch SDPA on the FlashAttention-2 backend, one call per direction
    (None with a mask: that backend takes none). Assumptions (FA2's public launch code as
    PyTorch ships it, described here, not measured):
    - forward: kBlockM 128, grid (ceil(Lq/128), B*H); split-KV (kBlockM 64, kBlockN 256 at
      D <= 64, 128 at D <= 128, else 64; splits from `_fa2_splits` with 2 x SMs slots) adds
      fp32 partials written and read and a combine launch; LSE fp32.
    - backward: dot(dO, O) kernel (also zeroes the fp32 dq accumulator), the main kernel over
      key blocks (kBlockN 128, grid ceil(Lk/128) x B*H, each CTA walks every query block;
      dq accumulated in fp32 through L2 atomics, read and written once in HBM), then the dq
      conversion.
    - compute per logit: one MUFU.EX2 (16/clk/SM) plus 5 (forward) or 8 (backward) FP32 ops;
      dots on mma.sync at FA2_MMA_EFFICIENCY of the HMMA rate (`Gpu.hmma_fraction` of the
      dense peak); memory as ours (`memory_us`) at FA2_PER_SM_BW per SM.
    fa2: (per-SM bytes/s, MMA efficiency) in place of the fitted constants (fit_perf_model.py).
    """
    if case.mask:
        return None
    e = 4 if case.dtype == "fp32" else 2
    if e == 4:
        return None  # the flash backend takes 16-bit inputs only
    fa2 = (FA2_PER_SM_BW, FA2_MMA_EFFICIENCY) if fa2 is None else fa2
    bh, d = case.B * case.H, case.D
    d_pad = max(16, next_power_of_2(d)) if d <= 64 else cdiv(d, 32) * 32
    total = 0.0
    for lq, lk, _ in directions(case):
        logits = bh * lq * lk
        fwd_flops = 4 * bh * cdiv(lq, 64) * 64 * cdiv(lk, 128) * 128 * d_pad
        io = (2 * lq + 2 * lk) * bh * d * e + bh * lq * 4
        block_n = 256 if d <= 64 else (128 if d <= 128 else 64)
        splits = _fa2_splits(bh * cdiv(lq, 64), 2 * gpu.sms, cdiv(lk, block_n))
        if splits == 1:
            total += _fa2_launch(gpu, cdiv(lq, 128) * bh, io, logits, fwd_flops, 5, fa2)
        else:
            part = splits * bh * lq * (d + 1) * 4
            total += _fa2_launch(gpu, cdiv(lq, 64) * splits * bh, io - bh * lq * (d * e + 4) + part,
                                 logits, fwd_flops, 5, fa2)
            total += _fa2_launch(gpu, max(1, bh * cdiv(lq, 16)), part + bh * lq * (d * e + 4), 0, 0, 0, fa2)
        if backward:
            q_side = bh * lq * d
            total += _fa2_launch(gpu, cdiv(lq, 128) * bh, 2 * q_side * e + bh * lq * 4 + q_side * 4, 0, 0, 0, fa2)
            main_bytes = (2 * lq + 4 * lk) * bh * d * e + bh * lq * 8 + 2 * q_side * 4
            total += _fa2_launch(gpu, cdiv(lk, 128) * bh, main_bytes, logits, 2.5 * fwd_flops, 8, fa2)
            total += _fa2_launch(gpu, cdiv(lq, 128) * bh, q_side * (4 + e), 0, 0, 0, fa2)
    return total


# ----------------------------------------------------------------------------------------
# Host cost (the CPU side of a launch, kernels stubbed)
# ----------------------------------------------------------------------------------------
def host_cost(case: Case, backward: bool, n_sm: int = 132, repeats: int = 30) -> dict:
    """Median microseconds per call on this CPU, its tensors on the meta device (torch.empty
    costs its dispatch, not CPU work), the driver's launch call not included:
    - `planned_us`: a call with a launch plan (every call after a signature's first,
      launch.py): the signature, the allocations and each compiled kernel's launcher, whose
      `run` is a no-op;
    - `launcher_us`: the launchers' own Python with every kernel replaced by a no-op (a
      signature's first call, or every call with SPATIALFORMER_TRITON_DIRECT_LAUNCH=0);
    - `binder_us`: Triton's binding and cache key for the same launches, what
      `JITFunction.run` adds to `launcher_us` before launching a cached kernel."""
    from triton.runtime.jit import compute_cache_key

    from . import launch
    from .launch_record import _kernel_objects, stubbed_device

    def on_meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    fwd_args, bwd_args = case_tensors(case)
    args = [on_meta(x) for x in (bwd_args if backward else fwd_args)]
    fn = facade(case, backward)

    def median_us(call) -> float:
        call()  # warm-up (and, planned, the plan's first call)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    class CompiledStub:
        function = packed_metadata = None

        def run(self, *args):
            pass

    stub = CompiledStub()
    saved = [(launch, "ENABLED", launch.ENABLED), (launch, "DIRECT_DEVICE_TYPES", launch.DIRECT_DEVICE_TYPES),
             (launch, "_current_stream", launch._current_stream)]
    kernels = list(_kernel_objects())
    with stubbed_device(n_sm):
        try:
            # planned: Triton's own JITFunction objects, their `run` handing out the stub
            launch.ENABLED, launch.DIRECT_DEVICE_TYPES = True, ("meta",)
            launch._current_stream = lambda index: 0
            for _, _, jit in kernels:
                jit.run = lambda *a, grid, warmup, **k: stub
            planned = median_us(lambda: fn(*args))
            for _, _, jit in kernels:
                del jit.run
            # the launchers alone
            launch.ENABLED = False
            for module, name, _ in kernels:
                setattr(module, name, NoLaunch())
            launcher = median_us(lambda: fn(*args))
        finally:
            for module, name, obj in kernels:
                setattr(module, name, obj)
                obj.__dict__.pop("run", None)
            for module, name, obj in saved:
                setattr(module, name, obj)
    launches = [e for e in record(case, n_sm, backward, torch_ops=False) if isinstance(e, KernelLaunch)]
    key_caches: dict = {}

    def bind_all():
        for event in launches:
            jit = kernel_fn(event.module, event.name)
            _, binder = binder_for(jit, 90)
            _, spec, options = binder(*event.args, **event.kwargs, **event.configs[0])
            compute_cache_key(key_caches.setdefault(id(jit), {}), spec, options)  # steady state: cached

    return dict(planned_us=planned, launcher_us=launcher, binder_us=median_us(bind_all), launches=len(launches))


__all__ = ["GPUS", "Gpu", "ASSUMPTIONS", "memory_us", "sustained_ipc", "model_kernel", "model_torch_op", "op_bytes", "sdpa_pass", "host_cost",
           "launch_bytes", "bind"]
