"""What the fused kernels (fused.py) and the wide-head backward (wide.py) share: the jit
helpers every kernel calls (dots, rounding, strided loads, key masks, the online-softmax
rescale, the float64 LSE, the diagonal of a dot) and the launch utilities (SM count, split
plan, device guard, mask arguments, the fixed-order split reduction).

Shapes as everywhere in this package: spatial tokens [B, H, M, D], image tokens [B, H, N, D].
Offsets are int64. LSEs are natural-log float64, -inf for a row with no kept key.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .configs import (CHUNK_ALIGN, INTERPRET, INTERPRETER_SM_COUNT, MIN_SPLIT_TOKENS, cdiv, next_power_of_2,
                      split_lengths, tail_rows)
from .launch import device_guard, launch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)

# In the interpreter (only), dots run in float64 and round once to float32. numpy's matmul,
# the interpreter's dot, sums in an order that depends on the tile shape, so the same logit
# could differ by an ulp between the forward and backward tiles; a GPU dot computes every
# element alike (one FMA chain over K, or the same MMA steps), which the backward relies on
# to recompute P and delta exactly. Widening also sidesteps Triton 3.8's interpreter
# multiplying bfloat16 operands as their raw bits (float64 holds every 16-bit value exactly).
_INTERPRETER_DOTS = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr):
    if _INTERPRETER_DOTS:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def dot_into(acc, a, b, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, the product accumulated by the dot itself (an MMA's accumulator)."""
    if _INTERPRETER_DOTS:
        return acc + dot(a, b, DOT_PRECISION)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> `dtype`, rounding to nearest even as a GPU conversion does. Triton 3.8's
    interpreter truncates fp32 -> bfloat16, so there (only) bfloat16 is rounded by hand on the
    bits; NaN keeps the truncated bits (still NaN)."""
    if _INTERPRETER_DOTS:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, bits >> 16, rounded)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def program_head(H):
    """(pid_bh, b, h) of a program whose grid axis 0 runs over B * H."""
    pid_bh = tl.program_id(0)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def head_base(ptr, b, h, stride_b, stride_h, ALIGN: tl.constexpr = 1):
    return ptr + b.to(tl.int64) * multiple(stride_b, ALIGN) + h.to(tl.int64) * multiple(stride_h, ALIGN)


@triton.jit
def multiple(x, ALIGN: tl.constexpr):
    """x, which the launcher checked is a multiple of ALIGN, written so that Triton knows it:
    ints divisible by 16 are specialised at launch, but D = 40 or 72 and their row strides
    are not, and without this their rows load 2 bytes at a time (`row_alignment`)."""
    if ALIGN > 1:
        # unsigned (a size or stride is never negative): a mask, where the signed division
        # took three instructions per value
        x = tl.to_tensor(x)
        unsigned: tl.constexpr = tl.uint64 if x.dtype == tl.int64 else tl.uint32
        x = (x.to(unsigned, bitcast=True) // ALIGN * ALIGN).to(x.dtype, bitcast=True)
    return x


@triton.jit
def widen_unsigned(x):
    """A size, index or stride (never negative) as int64: zero-extended from int32, so that
    its product with another such value is one 32 x 32 -> 64-bit multiply, not a 64-bit one
    (a stride of 1 comes as a constexpr: made a tensor first). Used for the backward's row
    offsets per tile; in `load_rows` and the forward's tile offsets it saved at most a few
    instructions and made fp32 launches spill (their 64-bit values live longer)."""
    x = tl.to_tensor(x)
    if x.dtype == tl.int32:
        return x.to(tl.uint32, bitcast=True).to(tl.int64)
    return x.to(tl.int64)


@triton.jit
def load_rows(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok, ALIGN: tl.constexpr = 1):
    """Load a [len(rows), len(cols)] tile, zeros outside the masks; int64 offsets."""
    offsets = rows.to(tl.int64)[:, None] * multiple(stride_row, ALIGN) + cols.to(tl.int64)[None, :] * stride_col
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def key_keep(MASK, b, keys, keys_ok, stride_mask_b, stride_mask_l, HAS_MASK: tl.constexpr):
    """Which keys take part: in range and, with a mask, marked True."""
    keep = keys_ok
    if HAS_MASK:
        flags = tl.load(MASK + b.to(tl.int64) * stride_mask_b + keys.to(tl.int64) * stride_mask_l, mask=keys_ok, other=0)
        keep = keep & (flags != 0)
    return keep


@triton.jit
def query_key_keep(keys_keep, PAIR_MASK, b, queries, queries_ok, keys, stride_pm_b, stride_pm_q, stride_pm_k,
                   HAS_PAIR_MASK: tl.constexpr):
    """Which (query, key) pairs take part, for `tl.where` on [R, C] logits: the kept keys
    (`key_keep`, [C]) and, with a per-query mask (bool [B, Lq, Lk], any strides), its flags.
    Without one it stays [1, C], a broadcast, so unmasked launches compile as before."""
    keep = keys_keep[None, :]
    if HAS_PAIR_MASK:
        offsets = (b.to(tl.int64) * stride_pm_b + queries.to(tl.int64)[:, None] * stride_pm_q
                   + keys.to(tl.int64)[None, :] * stride_pm_k)
        flags = tl.load(PAIR_MASK + offsets, mask=queries_ok[:, None] & keep, other=0)
        keep = keep & (flags != 0)
    return keep


@triton.jit
def max_shift(m, EMPTY_ROWS: tl.constexpr = True):
    """What a row's logits are shifted by before the exp: its max m, with -inf (no kept key)
    replaced by 0 so that exp2((x - shift) * rate) stays 0 for x = -inf instead of NaN
    (rate > 0). Without EMPTY_ROWS every row keeps a key (no mask, no padding key), so m is
    never -inf from finite logits: no select (a row whose logits are all -inf, from infinite
    inputs, then gives NaN, as the reference's output does)."""
    if EMPTY_ROWS:
        return tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit
def online_max(m_run, m_new_part, rate, EMPTY_ROWS: tl.constexpr = True, FMA_EXP: tl.constexpr = False):
    """The rescale step of an online softmax: (m_new, shift, alpha) for a running max m_run
    meeting a new block's (or split's) max. alpha = exp2((m_run - m_new) * rate) rescales what
    was summed so far; `shift` is `max_shift(m_new, EMPTY_ROWS)`. FMA_EXP (`exp_shifted`): the
    sums so far are scaled by exp2(-round(m_run * rate)), so alpha moves them from that
    rounded shift to the new one, exactly 1 where the max stays: both products are rounded
    alone (`mul_rn`), as the shifts were; a plain product is fused into an FMA with the
    subtraction on a GPU, which leaves alpha at exp2(residual) where the max stays."""
    m_new = tl.maximum(m_run, m_new_part)
    shift = max_shift(m_new, EMPTY_ROWS)
    if FMA_EXP:
        alpha = tl.math.exp2(mul_rn(m_run, rate) + mul_rn(shift, -rate))
    else:
        alpha = tl.math.exp2((m_run - shift) * rate)
    return m_new, shift, alpha


@triton.jit
def logit_rates(sm_scale, RAW_LOGITS: tl.constexpr):
    """(rate, max_scale) of a launch's logits s: exp(logit - max) = exp2((s - max) * rate), and
    the max as a logit is max * max_scale (`lse_value`). Raw dots (RAW_LOGITS, scale > 0):
    scale * log2(e) and the scale; logits already scaled: log2(e) and 1."""
    if RAW_LOGITS:
        return sm_scale * LOG2E, sm_scale
    return tl.full([], LOG2E, tl.float32), tl.full([], 1.0, tl.float32)


@triton.jit
def exp_shifted(x, shift, rate, FMA_EXP: tl.constexpr = False):
    """exp2((x - shift) * rate), the rate (log2(e), or scale * log2(e) for raw dots) applied
    after the subtraction: the row max gives exactly 1.

    FMA_EXP: exp2(x * rate - round(shift * rate)), one fused multiply-add per element instead
    of a subtraction and a multiply (the forward's softmax is issue-bound, and this is one of
    its five and a half instructions per logit). The shift's product is rounded, so every
    term carries the same factor exp2(residual) (`row_top`: |residual| <= half an ulp of
    shift * rate), the row max's own term being exp2(residual), not 1. The factor cancels in
    the output's ratio; the LSE takes the residual off (`lse_value`) and a one-hot row is
    recognised by its sum being that term alone (`inverse_sum`, `lse_value`)."""
    if FMA_EXP:
        return tl.math.exp2(fma_rn(x, rate, mul_rn(shift, -rate)))
    return tl.math.exp2((x - shift) * rate)


@triton.jit
def fma_rn(a, b, c):
    """a * b + c rounded once to fp32 (fma.rn.f32). The interpreter rounds a product before
    adding, so there the float64 product (exact, 24 x 24 bits) plus c is rounded once: the
    fused result wherever that float64 sum is exact (always when |c| <= 32 |a * b|, as for a
    logit near its row's max; elsewhere it may differ in the last bit)."""
    if _INTERPRETER_DOTS:
        return (tl.cast(a, tl.float64) * tl.cast(b, tl.float64) + tl.cast(c, tl.float64)).to(tl.float32)
    return tl.fma(a, b, c)


@triton.jit
def row_top(m, rate, EMPTY_ROWS: tl.constexpr, FMA_EXP: tl.constexpr, P_DTYPE: tl.constexpr):
    """(top, top_inverse, residual) of softmax rows whose max is m, for `inverse_sum`,
    `to_max_frame` and `lse_value`: top is the row max's own term of the sum, residual the log2
    of that term, top_inverse 1 / that term as the P.V dot took it (rounded to P_DTYPE). 1, 1
    and 0 in the two-step exponent. With FMA_EXP (`exp_shifted`) residual = shift * rate -
    round(shift * rate), exact by the fused multiply-add, and top = exp2(residual), computed as
    the term itself was (so a sum of that term alone equals it bitwise); bfloat16 rounds top
    to 1 while |shift * rate| < 2^16 (top_inverse 1), float16 not at |logit| ~ 1e4 (top_inverse
    1 / round(top), so a one-hot row's output is still its value row)."""
    top = 1.0
    top_inverse = 1.0
    residual = 0.0
    if FMA_EXP:
        shift = max_shift(m, EMPTY_ROWS)
        residual = fma_rn(shift, rate, mul_rn(shift, -rate))
        top = tl.math.exp2(residual)
        if P_DTYPE == tl.float16:
            top_inverse = reciprocal(round_to(top, P_DTYPE).to(tl.float32))
    return top, top_inverse, residual


@triton.jit
def to_max_frame(l, acc, m, rate, EMPTY_ROWS: tl.constexpr, FMA_EXP: tl.constexpr, P_DTYPE: tl.constexpr):
    """A softmax state (sum l [R], accumulator acc [R, D]) as the two-step exponent leaves it,
    the row max's term exactly 1: what the split partials hold for the combine kernel. With
    FMA_EXP both are scaled by exp2(-residual) (`row_top`); a one-hot row (l is the top term
    alone) is set to l = 1 and its acc divided by the top term as the dot took it."""
    if FMA_EXP:
        top, top_inverse, residual = row_top(m, rate, EMPTY_ROWS, FMA_EXP, P_DTYPE)
        one_hot = l == top
        factor = tl.where(one_hot, top_inverse, tl.math.exp2(-residual))
        l = tl.where(one_hot, 1.0, l * factor)
        acc = acc * factor[:, None]
    return l, acc


@triton.jit
def lse_value(m, l, max_scale, EMPTY_ROWS: tl.constexpr = True, top=1.0, residual=0.0):
    """float64 LSE of a softmax state (fp32 max m, sum l); -inf for a row with no kept key
    (only where EMPTY_ROWS: some row may have none, `max_shift`).
    max_scale turns the max into a logit: the scale where m is a raw dot, else 1. The product
    is rounded to fp32 first, so a row's top logit is the same fp32 value scale * q.k that the
    backward recomputes (a one-hot row gets exactly P = 1 there). The LSE is kept in float64
    because an fp32 LSE is off by up to half an ulp, 5e-4 at |logits| ~ 1e4, and
    P = exp(s - lse) would carry that as a relative error; the log2 of the sum goes to ln by
    a float64 FMA onto it. top, residual: `row_top` (the sum's factor exp2(residual) is taken
    off)."""
    lse = tl.fma(sum_log2(l, top, residual).to(tl.float64), _LN2, (m * max_scale).to(tl.float64))
    if EMPTY_ROWS:
        lse = tl.where(l > 0.0, lse, float("-inf"))
    return lse


@triton.jit
def inverse_sum(l, EMPTY_ROWS: tl.constexpr = True, top=1.0, top_inverse=1.0):
    """1 / l of a softmax sum for normalising a row (1 where no key was kept, l = 0, only
    where EMPTY_ROWS: some row may have none): one rcp.approx (within 1 ulp) instead of a
    full-range division per row; top_inverse where l is the row max's own term alone
    (`row_top`: exactly 1 in the two-step exponent), so a one-hot row's output is its value
    row bitwise."""
    if EMPTY_ROWS:
        l = tl.where(l > 0.0, l, 1.0)
    return tl.where(l == top, top_inverse, reciprocal(l))


@triton.jit
def row_per_thread(a, b):
    """Two fp32 row vectors of a dot's accumulator layout, where each row sits in all four
    threads of its quad (four rows per thread in the forward's 128-row tiles), in a layout of
    one row per thread: what is computed from them after this runs once per row, not four
    times. An identity tl.gather of both packed into 64 bits moves them; Triton routes it
    through shared memory, as it did the float64 LSE itself on its way to the store (the
    packing costs no instruction, a second gather a second round trip)."""
    packed = (a.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | b.to(tl.uint32, bitcast=True).to(tl.uint64)
    packed = tl.gather(packed, tl.arange(0, a.shape[0]), 0)
    return (packed >> 32).to(tl.uint32).to(tl.float32, bitcast=True), packed.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def reciprocal(x):
    """1 / x by one rcp.approx (within 1 ulp; exactly 1 at 1) instead of a full-range division."""
    if _INTERPRETER_DOTS:
        return 1.0 / x
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def sum_log2(l, top=1.0, residual=0.0):
    """log2 of a softmax sum l (>= 1 where a key was kept, 0 where none was) on the special
    function unit (lg2.approx: absolute error below 2^-22, against about 25 instructions for
    libdevice's log2f), less the residual of its terms' shift (`row_top`); exactly 0 where l
    is the row max's own term alone (top), so a one-hot row's LSE is its top logit."""
    if _INTERPRETER_DOTS:
        log2_l = tl.math.log2(l)
    else:
        log2_l = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [l], dtype=tl.float32,
                                           is_pure=True, pack=1)
    return tl.where(l == top, 0.0, log2_l - residual)


@triton.jit
def mul_rn(x, y):
    """x * y in fp32, rounded by itself: PTX's mul.rn is never contracted into an FMA with an
    add that follows, as a plain product may be (Triton compiles with FP fusion on). The
    backward's logits scale * q.k must round as the forward's max did before the LSE is
    subtracted (`probs`), or a one-hot row's P is off by that product's rounding."""
    if _INTERPRETER_DOTS:
        return x * y
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def load_lse(LSE, rows, rows_ok, EMPTY_ROWS: tl.constexpr = True):
    """Saved float64 LSE as fp32 (hi, lo), hi the nearest fp32 and lo the rest; (+inf, 0) for
    empty rows and padding so that `probs` gives exactly 0 there. Without EMPTY_ROWS no row is
    empty or padding (every LSE finite), so there is no select. The load keeps its predicate
    either way: unpredicated, it changed the pipelining of the D = 128 direction-x backward
    and ptxas serialised that kernel's wgmma (C7515)."""
    lse = tl.load(LSE + rows.to(tl.int64), mask=rows_ok, other=float("-inf"))
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    if EMPTY_ROWS:
        empty = lse == float("-inf")
        return tl.where(empty, float("inf"), hi), tl.where(empty, 0.0, lo)
    return hi, lo


@triton.jit
def probs(s, lse_hi, lse_lo):
    """P = exp(s - lse) from the split LSE, as exp2((s - hi) * log2(e) - lo * log2(e)): s - hi
    is exact near the row max (a one-hot row, lo = 0, gives exactly 1); the rest is one fused
    multiply-add per score, lo * log2(e) being formed once per row."""
    lo_log2 = lse_lo * LOG2E
    return tl.math.exp2((s - lse_hi[:, None]) * LOG2E - lo_log2[:, None])


@triton.jit
def diagonal(full, BLOCK_R: tl.constexpr):
    """The diagonal of a square [BLOCK_R, BLOCK_R] tile, exactly (one term per row)."""
    rows = tl.arange(0, BLOCK_R)
    return tl.sum(tl.where(rows[:, None] == rows[None, :], full, 0.0), 1)


# ----------------------------------------------------------------------------------------
# Launch utilities
# ----------------------------------------------------------------------------------------
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached, no synchronisation)."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


@functools.cache
def _capability(device_index: int) -> int:
    major, _ = torch.cuda.get_device_capability(device_index)
    return 90 if major >= 9 else 80


def capability(device: torch.device) -> int:
    """The architecture the static check compiles for that a CUDA device is closest to (cached):
    90 for sm_90 and newer, 80 for older GPUs (sm_80, sm_86, sm_89: mma.sync, no wgmma), whose
    launch configs and spill exclusions (configs.py) it then uses. The interpreter counts as 90."""
    if device.type != "cuda":
        return 90
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


def split_plan(n_sm: int, programs_per_split: int, n_tokens: int) -> tuple[int, int]:
    """(splits, chunk): split the image tokens so that about two programs per SM run.

    programs_per_split is B * H (times the spatial blocks in the forward). A split holds at
    least MIN_SPLIT_TOKENS tokens and a multiple of CHUNK_ALIGN, the last split the rest
    (`configs.split_lengths`), so large batches get one or a few splits and B = 2,
    N = 67,200 gets tens. For each split count, CHUNK is N / splits rounded up or down to
    CHUNK_ALIGN (down: the last split is the longest). Among the plans that reach two
    programs per SM (less a 1/16 slack: 256 programs on 132 SMs count), or the most there can
    be, the one whose busiest SM walks the fewest tokens wins, a partial last 128-token tile
    counted at the rows sm_90 runs it on (`configs.tail_rows`; a launch's own tile may be
    smaller, and sm_80's tails are at least 32 rows), the fewer splits on a
    tie (each split adds partials, and more than one adds a combine or reduction launch):
    cls224-stage1 (128 programs, 3,136 tokens) splits as 1,536 and 1,600 tokens, 12 and 12.5
    tiles, where 1,664 and 1,472 had 13 tiles in the longer split.
    """
    programs = max(1, programs_per_split)
    most = max(1, min(cdiv(2 * n_sm, programs), cdiv(n_tokens, MIN_SPLIT_TOKENS)))

    def walked(length):  # tokens a split walks: whole tiles, then its tail's rows
        rest = length % CHUNK_ALIGN
        return length - rest + tail_rows(rest, CHUNK_ALIGN, 90)

    best = None
    for wanted in range(1, most + 1):
        up = cdiv(cdiv(n_tokens, wanted), CHUNK_ALIGN) * CHUNK_ALIGN
        down = n_tokens // wanted // CHUNK_ALIGN * CHUNK_ALIGN
        for chunk, splits in ((up, cdiv(n_tokens, up)), (down, wanted)):
            if chunk < CHUNK_ALIGN or (splits > 1 and chunk < MIN_SPLIT_TOKENS):
                continue
            if programs * splits < 2 * n_sm - n_sm // 16 and wanted < most:
                continue  # too few programs to keep the SMs busy
            busiest = cdiv(programs * splits, n_sm) * max(map(walked, split_lengths(n_tokens, chunk, splits)))
            if best is None or busiest < best[0]:
                best = (busiest, splits, chunk)
    return best[1], best[2]


@triton.jit
def split_range(split, SPLITS, CHUNK, N):
    """[start, end) of a split's image tokens (`configs.split_lengths`): CHUNK from
    split * CHUNK, the last split to N. Written as the min(start + CHUNK, N) of one chunk per
    split, raised to N in the last: a select (tl.where) of N or start + CHUNK, the same values,
    made ptxas schedule the masked direction-x backward's loop at cls224-stage1 40 instructions
    longer (510 against 470 per 64 tokens, sm_90)."""
    start = split * CHUNK
    return start, tl.maximum(tl.minimum(start + CHUNK, N), N * (split == SPLITS - 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots stay IEEE (PyTorch's default matmul is not TF32); 16-bit dots use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_alignment(head_dim: int, *tensors) -> int:
    """The largest of 8, 4, 2 elements dividing D and every stride but the last (which must be 1)
    of the given 16-bit tensors, else 1: the kernels' ALIGN (`multiple`), so 16-bit rows of any
    D that is a multiple of 8 load 16 bytes at a time. fp32 gets 1: its fused tiles at BLOCK_D =
    64 run at the register limit, and wider loads made them spill on sm_90."""
    bits = head_dim  # a power of two divides every value exactly when it divides their OR
    for t in tensors:
        if t is None:
            continue
        if t.element_size() != 2:
            return 1
        strides = t.stride()
        if strides[-1] != 1:
            return 1
        bits |= strides[0] | strides[1] | strides[2]
    for align in (8, 4, 2):
        if bits % align == 0:
            return align
    return 1


def mask_args(mask, like):
    """(pointer, stride_b, stride_l) of an optional bool [B, L] mask; `like` stands in for a
    missing one (never read: the kernel's HAS_*MASK flag is False)."""
    if mask is None:
        return like, 0, 0
    return mask, mask.stride(0), mask.stride(1)


def pair_mask_args(pair_mask, like):
    """(pointer, stride_b, stride_query, stride_key) of an optional bool [B, Lq, Lk] per-query
    mask (any strides, stride 0 included); `like` stands in for a missing one."""
    if pair_mask is None:
        return like, 0, 0, 0
    return pair_mask, *pair_mask.stride()


# `s0` as it is, with PTX's nounroll pragma in the loop's first block: ptxas keeps the loop
# one source iteration per pass. Left alone it unrolls the split reduction's short loop 4x
# (the leftover trips peeled ahead of it), and the static model, which reads one loop body as
# one trip, would count every trip four times over. Not pure, so it stays in the loop; written
# in the loop itself, as a helper's inlined code starts a new block (a debug label) and the
# pragma would miss the loop's header.
NOUNROLL = tl.constexpr('.pragma "nounroll";\n\tmov.b32 $0, $1;')


@triton.jit
def _reduce_splits_kernel(
    PART_A, OUT_A,  # [B * H, SPLITS, SIZE] fp32 partials -> [B * H, SIZE] contiguous, output dtype
    PART_B, OUT_B,  # a second pair of the same shape (read with N_PARTS >= 2)
    PART_C, OUT_C,  # a third (read with N_PARTS = 3)
    SPLITS, SIZE,
    BLOCK: tl.constexpr, SPLIT_ROWS: tl.constexpr, N_PARTS: tl.constexpr,
):
    """Sum per-split partials over the splits and round once to the output dtype. Each step
    loads SPLIT_ROWS splits side by side ([SPLIT_ROWS, BLOCK], spread over the warps) and adds
    them to as many running rows, so 66 splits are a few steps of independent loads on every
    warp of the program; the rows are summed once at the end. The order (split r, r + SPLIT_ROWS,
    ... into row r, then a fixed-shape sum over the rows) depends only on the launch's shape:
    bitwise reproducible."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    rows = tl.arange(0, SPLIT_ROWS)
    base = pid_bh * SPLITS * SIZE + offs[None, :]
    acc_a = tl.zeros([SPLIT_ROWS, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([SPLIT_ROWS, BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([SPLIT_ROWS, BLOCK], dtype=tl.float32)
    for s0 in range(0, SPLITS, SPLIT_ROWS):
        if not _INTERPRETER_DOTS:  # one trip per loop pass in the machine code (NOUNROLL)
            s0 = tl.inline_asm_elementwise(NOUNROLL, "=r,r", [s0], dtype=tl.int32, is_pure=False, pack=1)
        split = s0 + rows
        at = base + split[:, None].to(tl.int64) * SIZE
        split_ok = (split < SPLITS)[:, None] & ok[None, :]
        acc_a += tl.load(PART_A + at, mask=split_ok, other=0.0)
        if N_PARTS >= 2:
            acc_b += tl.load(PART_B + at, mask=split_ok, other=0.0)
        if N_PARTS == 3:
            acc_c += tl.load(PART_C + at, mask=split_ok, other=0.0)
    out = pid_bh * SIZE + offs
    tl.store(OUT_A + out, round_to(tl.sum(acc_a, 0), OUT_A.dtype.element_ty), mask=ok)
    if N_PARTS >= 2:
        tl.store(OUT_B + out, round_to(tl.sum(acc_b, 0), OUT_B.dtype.element_ty), mask=ok)
    if N_PARTS == 3:
        tl.store(OUT_C + out, round_to(tl.sum(acc_c, 0), OUT_C.dtype.element_ty), mask=ok)


REDUCE_BLOCK = 1024  # most output elements per program
REDUCE_MIN_BLOCK = 32
REDUCE_TILE = 2048  # most partial elements (splits x outputs) a reduction step loads per part


def reduce_splits(parts: list, shape, dtype: torch.dtype) -> list:
    """Sum one to three fp32 per-split partials [B * H, SPLITS, M, D] of the same shape over
    the splits in a fixed order (bitwise reproducible, no atomics) into new tensors of `shape`
    [B, H, M, D] and `dtype`, in one launch (`reduce_shape`): a bilateral backward's three
    spatial-side gradients are one launch."""
    assert 1 <= len(parts) <= 3 and all(p.shape == parts[0].shape for p in parts)
    outs = [torch.empty(shape, device=p.device, dtype=dtype) for p in parts]
    bh, splits, m, d = parts[0].shape
    size = m * d
    block, split_rows, warps = reduce_shape(bh, splits, size, sm_count(parts[0].device))
    padded = [*zip(parts, outs)] + [(parts[-1], outs[-1])] * (3 - len(parts))  # unread pairs
    with device_guard(parts[0].device):
        launch(_reduce_splits_kernel, (bh, cdiv(size, block)),
            *(t for pair in padded for t in pair), splits, size, BLOCK=block, SPLIT_ROWS=split_rows,
            N_PARTS=len(parts), num_warps=warps,
        )
    return outs


@functools.lru_cache(maxsize=1024)
def reduce_shape(bh: int, splits: int, size: int, n_sm: int) -> tuple[int, int, int]:
    """(BLOCK, SPLIT_ROWS, num_warps) of `reduce_splits`: blocks of outputs shrink (down to 32)
    until the grid has two programs per SM, so a few samples with many splits still spread over
    the GPU; each step loads up to 32 splits side by side (at most REDUCE_TILE elements per
    part), on up to 4 warps with at least 4 elements per thread and part, so that even the
    smallest blocks keep several warps per SM loading (det800x1344: 4 samples x 66 splits on
    132 SMs: 32 outputs x 32 splits per step, 4 warps, 8 elements per thread and part)."""
    block = REDUCE_BLOCK
    while block > REDUCE_MIN_BLOCK and bh * cdiv(size, block) < 2 * n_sm:
        block //= 2
    split_rows = min(32, next_power_of_2(splits), max(1, REDUCE_TILE // block))
    return block, split_rows, max(1, min(4, split_rows * block // 128))
