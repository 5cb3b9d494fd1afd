"""Chunked lightning attention (constant per-head decay linear attention): forward and backward.

    S_t = lam * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,    lam = exp(-decay[h])

Scheme (Lightning-Attention-2 style, three launches, no host synchronisation):

  1. `_local_state_kernel`: the sequence is cut into chunks of L tokens (L ~ 512..4096, chosen from
     the shapes so there are enough programs). Every (chunk, head, V-block) computes in parallel the
     state its chunk would leave behind starting from zero: dS_c = sum_s lam^(b-1-s) k_s^T v_s
     (one [K, L] x [L, BV] reduction on tensor cores).
  2. `_scan_kernel`: per (sequence, head, state tile) a cheap sequential scan over the chunks,
     S_start[c+1] = lam^len(c) S_start[c] + dS_c, written in place over dS (plus the final state).
  3. `_chunk_out_kernel`: every (chunk, head, V-block) starts from its S_start and walks its chunk in
     blocks of BT=64 tokens: intra-block causal q k^T with the decay mask lam^(i-j), plus the
     inter-block term lam^(i+1) q S, then S <- lam^BT S + (lam^(BT-1-j) k)^T v.

Only per-chunk states of the long chunks (L tokens) ever reach memory (fp32, [chunks, H, K, V]), so
the extra traffic beyond reading q, k, v and writing o is reading k, v once more in pass 1.

The same three kernels, run forward or in reverse time (REVERSE) with other tensors in the q/k/v
roles, give the whole backward pass:

    dq = scale * lightning(q=dO, k=v, v=k, state=S^T)              (forward in time)
    dS_t = lam dS_{t+1} + scale q_t^T dO_t   (+ d final_state)     (reverse scan)
    dk_t = dS_t v_t  = reverse-lightning(q=v, k=dO, v=scale*q, state=dS^T)
    dv_t = dS_t^T k_t = reverse-lightning(q=k, k=q, v=scale*dO, state=dS)
    d initial_state = lam * dS_0

In reverse mode the carried state is G_b = lam * dS_b (the gradient flowing into the token before
the chunk), so the final-state gradient enters as G_T = d final_state without a division by lam.

`decay` gets no gradient: it is a fixed schedule (MiniCPM-SALA's ALiBi slopes), not a parameter.

Accumulation and states are fp32. With bf16/fp16 inputs the tensor-core products take 16-bit
operands (the decay-weighted scores and the state are rounded to the input dtype for the product,
accumulation stays fp32); with fp32 inputs the products use TF32x3 (near-fp32 accuracy) when
torch.get_float32_matmul_precision() is "highest" (torch's default) and plain TF32 otherwise
(SALA_LIGHTNING_F32_DOT=f16s: fp16 tiles with power-of-two scales, f16_scaled). SALA_LIGHTNING_16BIT_DOT=split
keeps the rounded intermediates of the 16-bit path as hi + lo pairs (split_hi_lo, host side below).

Index arithmetic on token offsets is int64 (1M tokens x 32 heads x 128 dims passes 2^31).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._segments import segment_of

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

# (chunk length L, block BT) forced by tests/benchmarks; None = choose from the shapes.
CHUNK_OVERRIDE: tuple[int, int] | None = None
DEFAULT_BT = 64


_PINNED = INTERPRET or os.environ.get("SALA_LIGHTNING_PIN_CONFIG") == "1"


def _configs(bvs, warps, stages):
    if _PINNED:
        return [triton.Config({"BV": bvs[0]}, num_warps=4, num_stages=1)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in bvs for w in warps for s in stages]


# fp32 operands get their own short lists. H200 run 4 (bench/diag_lightning_configs.py, T = 128K, every config
# timed): chunk outputs BV=128 / 8 warps / 1 stage 6.60 ms, 2 stages 7.74, BV=64 / 8 warps / 1 stage 8.44, the rest
# 8.6-15.5; local states BV=128 / 8 warps 3.16 ms (1 or 3 stages), BV=64 / 4 warps / 1 stage 3.62, the rest up to
# 4.1. (fp32 products reduce over tokens with both operands token-major in memory, a layout TF32 wgmma does not
# take, so they are 2-3x slower per byte than bf16.) 16-bit operands never use 1 stage (not measured on the H200).
_F32_OUT = ((128, 8, 1), (128, 8, 2), (64, 8, 1))
_F32_LOCAL = ((128, 8, 1), (128, 8, 3), (64, 4, 1))


def _f32_configs(table):
    if _PINNED:
        return []
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in table]


def _by_dtype(table):
    keep32 = set(table)

    def prune(configs, named_args, **kwargs):
        """fp32 operands: only the configs of `table` (each TF32 config compiles for seconds on the H200, and the
        bf16 ones never won in fp32); 16-bit operands: every config but the fp32-only 1-stage ones."""
        if named_args["k_ptr"].element_size() < 4:
            kept = [c for c in configs if c.num_stages > 1]
        else:
            kept = [c for c in configs if (c.kwargs["BV"], c.num_warps, c.num_stages) in keep32]
        return kept or configs[:1]
    return prune


@triton.jit
def _chunk_bounds(c, chunk_start_ptr, chunk_end_ptr, T, NSS, L, IS_VARLEN: tl.constexpr):
    """Token range [a, b) (flat token index over batch x seq) of chunk c."""
    if IS_VARLEN:
        a = tl.load(chunk_start_ptr + c).to(tl.int64)
        b = tl.load(chunk_end_ptr + c).to(tl.int64)
    else:
        seq = c // NSS
        j = c - seq * NSS
        bos = seq.to(tl.int64) * T
        a = bos + j.to(tl.int64) * L
        b = tl.minimum(a + L, bos + T)
    return a, b


@triton.jit
def block_weights(offs_t, ln, mt, s2, out_scale, kv_mult, REVERSE: tl.constexpr):
    """Decay weights of one block of ln tokens (rows past ln: 0): wq[i] for the state term of output i
    (lam^(i+1), in time order), wk[j] for token j's share of the block's state update (lam^(ln-1-j));
    mirrored in reverse. Times out_scale and kv_mult."""
    if REVERSE:
        eq = ln - 1 - offs_t
        ek = offs_t + 1
    else:
        eq = offs_t + 1
        ek = ln - 1 - offs_t
    wq = tl.where(mt, tl.exp2(-s2 * eq.to(tl.float32)), 0.0) * out_scale
    wk = tl.where(mt, tl.exp2(-s2 * ek.to(tl.float32)), 0.0) * kv_mult
    return wq, wk


@triton.jit
def _program_chunk(DV, BV: tl.constexpr, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                   IS_VARLEN: tl.constexpr):
    """Decode this program's (V-block i_v, head h, chunk c) from its flat id (V-block fastest) and return
    them with the chunk's token range [a, b) and the head's decay in log2 units (s2)."""
    pid = tl.program_id(0)
    nvb = tl.cdiv(DV, BV)
    i_v = pid % nvb
    hc = pid // nvb
    h = hc % H
    c = hc // H
    a, b = _chunk_bounds(c, chunk_start_ptr, chunk_end_ptr, T, NSS, L, IS_VARLEN)
    s2 = tl.load(decay_ptr + h).to(tl.float32) * 1.4426950408889634
    return i_v, h, c, a, b, s2


@triton.jit
def pow2_scale(bound):
    """(2^s, 2^-s) for the integer s that puts a positive fp32 `bound` in [2^14, 2^15), clamped so both are
    normal fp32 numbers. A tile whose entries are at most `bound` in size, times 2^s, fits fp16."""
    e = ((bound.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # floor(log2 bound) for a normal bound
    sh = tl.minimum(tl.maximum(14 - e, -126), 126)
    return ((sh + 127) << 23).to(tl.float32, bitcast=True), ((127 - sh) << 23).to(tl.float32, bitcast=True)


@triton.jit
def amax(x):
    return tl.max(tl.max(tl.abs(x), axis=1), axis=0)


@triton.jit
def f16_scaled(x, bound):
    """An fp32 tile as fp16 times 2^s (pow2_scale of `bound`, at least the tile's largest |x|): fp16 keeps TF32's
    11-bit significand and the power-of-two scale keeps the tile inside fp16's range. Only entries below
    2^-29 of `bound` lose significand bits (subnormal): a bound looser than the true maximum by a factor f
    costs nothing while f * 2^-29 stays far under TF32's 2^-11, so bounds derived from other tiles' maxima
    (a product's, instead of reducing over the product) are as good as the exact maximum.
    Returns (the fp16 tile, 2^-s); products of such tiles times the two 2^-s are exact rescalings."""
    up, down = pow2_scale(bound)
    return (x * up).to(tl.float16), down


@triton.jit
def split_hi_lo(x, dtype: tl.constexpr):
    """An fp32 tile as hi + lo of a 16-bit dtype (lo = what hi leaves out, rounded): about 16 significand bits for
    bf16 (hi + lo within 2^-15.5 of x), so products of both parts with an exact 16-bit operand, summed in fp32, stay
    far below TF32's 2^-11. bf16: hi is x with its low 16 bits cleared (truncated, so x - hi needs no conversion
    back to fp32: one AND and one subtraction per entry, then two packed conversions per pair; a rounded hi cost
    sm_90 an unpacked F2F and a shift to widen it again: 1997 -> 1851 instructions per TMA-kernel loop)."""
    if dtype == tl.bfloat16:
        hi32 = (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        hi = hi32.to(dtype)  # exact: hi32 has bf16's bits only
        lo = (x - hi32).to(dtype)
    else:
        hi = x.to(dtype)
        lo = (x - hi.to(tl.float32)).to(dtype)
    return hi, lo


@triton.jit
def add_kT_weighted_v_split(acc, kt, vt, w):
    """acc + k^T diag(w) v with the weighted v as a hi + lo pair (split_hi_lo; k and v are exact 16-bit operands):
    the state update of SALA_LIGHTNING_16BIT_DOT=split, in the local-state and chunk-output kernels."""
    vw_hi, vw_lo = split_hi_lo(vt.to(tl.float32) * w[:, None], vt.dtype)
    return tl.dot(tl.trans(kt), vw_lo, tl.dot(tl.trans(kt), vw_hi, acc))


@triton.autotune(configs=_configs([64, 128], [4, 8], [2, 3]) + _f32_configs(_F32_LOCAL),
                 key=["DK", "DV", "BT", "REVERSE", "PREC"],
                 prune_configs_by={"early_config_prune": _by_dtype(_F32_LOCAL)})
@triton.jit
def _local_state_kernel(k_ptr, v_ptr, ds_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr,
                        T, NSS, L, H, GK, GV, stride_k, stride_v, kv_mult, DK, DV,
                        BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                        IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # One flat program axis, decoded in the order the old (V-block, head, chunk) grid launched in:
    # CUDA limits grid axes 1 and 2 to 65535 programs, and the chunk count can pass that (varlen:
    # T // L + number of sequences; the interpreter does not enforce the limit).
    i_v, h, c, a, b, s2 = _program_chunk(DV, BV, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                                          IS_VARLEN)
    hk = h // GK
    hv = h // GV
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk = offs_k < DK
    mv = offs_v < DV
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    nblk = ((b - a + BT - 1) // BT).to(tl.int32)
    for m in range(0, nblk):
        t = a + m * BT + offs_t
        mt = t < b
        kt = tl.load(k_ptr + t[:, None] * stride_k + hk * DK + offs_k[None, :],
                     mask=mt[:, None] & mk[None, :], other=0.0)
        vt = tl.load(v_ptr + t[:, None] * stride_v + hv * DV + offs_v[None, :],
                     mask=mt[:, None] & mv[None, :], other=0.0)
        if REVERSE:
            e = (t - a + 1).to(tl.float32)
        else:
            e = (b - 1 - t).to(tl.float32)
        w = tl.where(mt, tl.exp2(-s2 * e), 0.0)
        if PREC == "f16s":  # fp32 inputs as scaled fp16 tiles (f16_scaled): 16-bit tensor-core products
            kh, ik = f16_scaled(kt, amax(kt))
            vh, iv = f16_scaled(vt * w[:, None], amax(vt))  # w <= 1
            acc += tl.dot(tl.trans(kh), vh) * ik * iv
        elif PREC == "split":
            acc = add_kT_weighted_v_split(acc, kt, vt, w)
        elif BV <= BK:  # weight the narrower operand
            vw = (vt.to(tl.float32) * w[:, None]).to(vt.dtype)
            acc += tl.dot(tl.trans(kt), vw, input_precision=PREC)
        else:
            kw = (kt.to(tl.float32) * w[:, None]).to(kt.dtype)
            acc += tl.dot(tl.trans(kw), vt, input_precision=PREC)
    acc = acc * kv_mult
    base = (c.to(tl.int64) * H + h) * DK * DV
    tl.store(ds_ptr + base + offs_k[:, None] * DV + offs_v[None, :], acc, mask=mk[:, None] & mv[None, :])


# Not autotuned, on purpose: it rewrites `ds` in place (dS_c -> S_start[c]), so an autotuner re-running
# it to time configs would scan already-scanned states (wrong results) unless it restored `ds` first
# (restore_value). The autotuned kernels below and above only write buffers they do not read.
@triton.jit
def _scan_kernel(ds_ptr, init_ptr, final_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr, seq_chunk_ptr,
                 T, NSS, L, H, DK, DV,
                 BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
                 HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    # flat program axis (tile fastest, then head, then sequence): CUDA limits grid axes 1 and 2 to 65535
    # and varlen calls can pack more sequences than that
    pid0 = tl.program_id(0)
    nvb = tl.cdiv(DV, BV)
    ntile = tl.cdiv(DK, BK) * nvb
    pid = pid0 % ntile
    hn = pid0 // ntile
    h = hn % H
    n = hn // H
    i_k = pid // nvb
    i_v = pid - i_k * nvb
    if IS_VARLEN:
        c0 = tl.load(seq_chunk_ptr + n).to(tl.int32)
        c1 = tl.load(seq_chunk_ptr + n + 1).to(tl.int32)
    else:
        c0 = n * NSS
        c1 = c0 + NSS
    s2 = tl.load(decay_ptr + h).to(tl.float32) * 1.4426950408889634
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    msk = (offs_k[:, None] < DK) & (offs_v[None, :] < DV)
    tile = offs_k[:, None] * DV + offs_v[None, :]
    seq_base = (n.to(tl.int64) * H + h) * DK * DV
    if HAS_INIT:
        S = tl.load(init_ptr + seq_base + tile, mask=msk, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    nc = c1 - c0
    if REVERSE:
        c_first = c1 - 1
    else:
        c_first = c0
    zi = tl.zeros([BK, BV], dtype=tl.int32)
    # software pipelined: the next chunk's dS is in flight while this one is combined
    d_next = tl.load(ds_ptr + (c_first.to(tl.int64) * H + h) * DK * DV + tile, mask=msk & ((zi + nc) > 0), other=0.0)
    for m in range(0, nc):
        if REVERSE:
            c = c1 - 1 - m
            cn = c - 1
        else:
            c = c0 + m
            cn = c + 1
        a, b = _chunk_bounds(c, chunk_start_ptr, chunk_end_ptr, T, NSS, L, IS_VARLEN)
        d = d_next
        d_next = tl.load(ds_ptr + (cn.to(tl.int64) * H + h) * DK * DV + tile, mask=msk & ((zi + m + 1) < nc), other=0.0)
        tl.store(ds_ptr + (c.to(tl.int64) * H + h) * DK * DV + tile, S, mask=msk)
        S = tl.exp2(-s2 * (b - a).to(tl.float32)) * S + d
    if STORE_FINAL:
        tl.store(final_ptr + seq_base + tile, S, mask=msk)


@triton.autotune(configs=_configs([64, 32], [4, 8], [2, 3]) + ([] if _PINNED else _configs([128], [8], [2, 3]))
                 + _f32_configs(_F32_OUT),
                 key=["DK", "DV", "BT", "REVERSE"], prune_configs_by={"early_config_prune": _by_dtype(_F32_OUT)})
@triton.jit
def _chunk_out_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr,
                      T, NSS, L, H, GQ, GK, GV, stride_q, stride_k, stride_v, stride_o,
                      st_sk, st_sv, out_scale, kv_mult, DK, DV,
                      BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # One flat program axis, decoded in the order the old (V-block, head, chunk) grid launched in:
    # CUDA limits grid axes 1 and 2 to 65535 programs, and the chunk count can pass that (varlen:
    # T // L + number of sequences; the interpreter does not enforce the limit).
    i_v, h, c, a, b, s2 = _program_chunk(DV, BV, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                                          IS_VARLEN)
    hq = h // GQ
    hk = h // GK
    hv = h // GV
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk = offs_k < DK
    mv = offs_v < DV
    st_base = (c.to(tl.int64) * H + h) * DK * DV
    S = tl.load(st_ptr + st_base + offs_k[:, None] * st_sk + offs_v[None, :] * st_sv,
                mask=mk[:, None] & mv[None, :], other=0.0)
    # intra-block decay mask lam^(i-j) on and below the diagonal (above it in reverse)
    if REVERSE:
        dif = offs_t[None, :] - offs_t[:, None]
    else:
        dif = offs_t[:, None] - offs_t[None, :]
    dmask = tl.where(dif >= 0, tl.exp2(-s2 * tl.maximum(dif, 0).to(tl.float32)), 0.0) * kv_mult
    nblk = ((b - a + BT - 1) // BT).to(tl.int32)
    for m in range(0, nblk):
        if REVERSE:
            p = a + (nblk - 1 - m) * BT
        else:
            p = a + m * BT
        t = p + offs_t
        ln = tl.minimum(b - p, BT).to(tl.int32)
        mt = offs_t < ln
        qt = tl.load(q_ptr + t[:, None] * stride_q + hq * DK + offs_k[None, :],
                     mask=mt[:, None] & mk[None, :], other=0.0)
        kt = tl.load(k_ptr + t[:, None] * stride_k + hk * DK + offs_k[None, :],
                     mask=mt[:, None] & mk[None, :], other=0.0)
        vt = tl.load(v_ptr + t[:, None] * stride_v + hv * DV + offs_v[None, :],
                     mask=mt[:, None] & mv[None, :], other=0.0)
        wq, wk = block_weights(offs_t, ln, mt, s2, out_scale, kv_mult, REVERSE)
        # (q diag(wq)) S = diag(wq) (q S): the row weights go on the product, the loaded q tile feeds
        # the tensor cores as it is
        A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * dmask
        o = tl.dot(A.to(vt.dtype), vt, input_precision=PREC) * out_scale
        o += tl.dot(qt, S.to(qt.dtype), input_precision=PREC) * wq[:, None]
        tl.store(o_ptr + t[:, None] * stride_o + h * DV + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        if BV <= BK:
            vw = (vt.to(tl.float32) * wk[:, None]).to(vt.dtype)
            U = tl.dot(tl.trans(kt), vw, input_precision=PREC)
        else:
            kw = (kt.to(tl.float32) * wk[:, None]).to(kt.dtype)
            U = tl.dot(tl.trans(kw), vt, input_precision=PREC)
        S = S * tl.exp2(-s2 * ln.to(tl.float32)) + U


# ----------------------------------------------------------------------------------------------
# host side


# SALA_LIGHTNING_F32_DOT (diagnostics): the fp32 products' precision. (A "bf16x3" option, the token-sum products
# as three bf16 products of hi/lo splits, measured slower than TF32 on the H200 in run 5, 0.69x / 0.76x fla vs
# 0.73x / 0.81x at 32K / 128K, and was removed: bench/NOTES_lightning.md.)
# "f16s": each fp32 tile rounded to fp16 after a power-of-two scale from its largest entry (f16_scaled): TF32's
# significand, 16-bit tensor-core products (which take the token-major layouts that TF32 products do not), v1
# chunk-output kernel only.
F32_DOTS = ("tf32", "tf32x3", "ieee", "f16s")
# SALA_LIGHTNING_16BIT_DOT=split (bf16 / fp16 inputs, opt-in): the three intermediates the 16-bit path rounds to the
# input dtype for a tensor-core product (the decayed score tile, the state, the decay-weighted v) go in as hi + lo
# pairs of that dtype instead (split_hi_lo), so they keep about 16 significand bits (bf16: 8 -> ~16). q, k and v are
# 16-bit already and their products are exact in the fp32 accumulator. Three more products per block. It targets
# the released model's call (bf16 activations cast to fp32, then TF32 products): emulated on a 4K-token bf16
# sequence, the output's error vs fp64 is the error of rounding the exact result to bf16 (1.66e-3 relative), where
# the plain 16-bit path has 2.70e-3 and fla in fp32 (TF32) 2.65e-4 before and 1.68e-3 after the model rounds its
# output to bf16 (bench/NOTES_lightning.md, session 12).
BIT16_DOTS = ("default", "split")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        forced = os.environ.get("SALA_LIGHTNING_16BIT_DOT") or "default"
        if forced not in BIT16_DOTS:
            raise ValueError(f"lightning_attention: SALA_LIGHTNING_16BIT_DOT must be one of {BIT16_DOTS}, "
                             f"got {forced!r}")
        return "split" if forced == "split" else "tf32"  # "tf32": ignored by 16-bit products
    forced = os.environ.get("SALA_LIGHTNING_F32_DOT")
    if forced:
        if forced not in F32_DOTS:
            raise ValueError(f"lightning_attention: SALA_LIGHTNING_F32_DOT must be one of {F32_DOTS}, got {forced!r}")
        return forced
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _refuse_special_dots(dtype: torch.dtype, what: str):
    """The scaled-fp16 and split products exist in the default kernels only (lightning_chunk_out.py, the local-state
    kernel): refuse them for the older / experimental ones instead of running them at another precision."""
    prec = _dot_precision(dtype)
    if prec in ("f16s", "split"):
        env = "SALA_LIGHTNING_F32_DOT=f16s" if prec == "f16s" else "SALA_LIGHTNING_16BIT_DOT=split"
        raise ValueError(f"lightning_attention: {env} runs with the default chunk-output kernel only, not with {what}")


def _pad(d: int) -> int:
    # head-dim tiles are at least 64 wide: every tensor-core product then has M, N, K >= 32, the
    # shapes the real-size (D=128) runs use. A GPU run of small fp32 cases (D = 8..32, 16-wide tiles)
    # hit an illegal memory access inside these kernels on triton 3.6 / H200 (small fp32/tf32 tiles
    # are a known source of such compiler bugs); that run came before this change (bench/NOTES_lightning.md).
    return max(64, triton.next_power_of_2(d))


class Chunks:
    """How the tokens are cut into chunks; built from shapes only (plus device-side tables for
    varlen), so no host synchronisation."""

    def __init__(self, B: int, T: int, H: int, DV: int, cu_seqlens, device):
        self.B, self.T, self.varlen = B, T, cu_seqlens is not None
        self.N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        self.L, self.BT = chunk_len(B, T, H, DV, self.N)
        BT = self.BT
        if BT < 16 or BT & (BT - 1):
            raise ValueError(f"lightning_chunk: block BT must be a power of two >= 16 (tl.dot, tl.arange), got {BT}")
        if torch.device(device).type == "cuda" and not INTERPRET:
            # compiled: BT is the M (and N/K) of the output kernel's q k^T, A v and q S products. Below 64
            # they are too small for Hopper's wgmma (M a multiple of 64), and Triton then mixes mma.sync
            # and wgmma products in one kernel (checked on the sm_90 TTGIR) -- the configuration of the
            # illegal memory access seen with 16/32-wide tiles (see _pad). Any L works with any BT
            # (a chunk shorter than BT is one partial block), so a smaller forced BT is only raised.
            self.BT = max(BT, DEFAULT_BT)
        L = self.L
        if cu_seqlens is None:
            self.NSS = triton.cdiv(T, L)  # chunks per sequence
            self.NS = B * self.NSS
            self.seq_T = T
            dummy = torch.empty(1, dtype=torch.int64, device=device)
            self.start = self.end = self.seq_chunk = dummy
        else:
            N = self.N
            self.NSS = 1
            self.seq_T = T
            self.NS = T // L + N  # upper bound on sum_n ceil(len_n / L)
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
            lens = cu[1:] - cu[:-1]
            nch = (lens + L - 1) // L
            ccum = torch.zeros(N + 1, dtype=torch.int64, device=device)
            ccum[1:] = torch.cumsum(nch, 0)
            idx = torch.arange(self.NS, device=device, dtype=torch.int64)
            seq = segment_of(ccum, idx).clamp_(max=N - 1)
            j = idx - ccum[seq]
            a = cu[seq] + j * L
            b = torch.minimum(a + L, cu[seq + 1])
            valid = idx < ccum[N]
            zero = torch.zeros((), dtype=torch.int64, device=device)
            self.start = torch.where(valid, a, zero).contiguous()
            self.end = torch.where(valid, b, zero).contiguous()
            self.seq_chunk = ccum

    def args(self):
        return (self.start, self.end, self.seq_T, self.NSS, self.L)


def local_states(kk, vv, GK, GV, H, decay, kv_mult, reverse, ch: Chunks):
    """Pass 1: per-chunk states from zero, fp32 [NS, H, DK, DV]."""
    DK, DV = kk.shape[-1], vv.shape[-1]
    ds = torch.empty(ch.NS, H, DK, DV, device=kk.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(DV, META["BV"]) * H * ch.NS,)  # noqa: E731  (flat: see the kernel)
    _local_state_kernel[grid](kk, vv, ds, decay, *ch.args(), H, GK, GV, kk.shape[-2] * DK, vv.shape[-2] * DV,
                              float(kv_mult), DK, DV, BK=_pad(DK), BT=ch.BT, REVERSE=reverse,
                              IS_VARLEN=ch.varlen, PREC=_dot_precision(kk.dtype))
    return ds


def scan_states(ds, decay, init, want_final, reverse, ch: Chunks):
    """Pass 2: in place, dS_c -> state entering chunk c; returns the final state [N, H, DK, DV] or None."""
    NS, H, DK, DV = ds.shape
    final = torch.empty(ch.N, H, DK, DV, device=ds.device, dtype=torch.float32) if want_final else ds
    BK = min(_pad(DK), 32)
    BV = min(_pad(DV), 32)
    grid = (triton.cdiv(DK, BK) * triton.cdiv(DV, BV) * H * ch.N,)  # flat: see the kernel
    _scan_kernel[grid](ds, init if init is not None else ds, final, decay, ch.start, ch.end, ch.seq_chunk,
                       ch.seq_T, ch.NSS, ch.L, H, DK, DV, BK=BK, BV=BV, REVERSE=reverse, IS_VARLEN=ch.varlen,
                       HAS_INIT=init is not None, STORE_FINAL=want_final, num_warps=4)
    return final if want_final else None


def chunk_outputs(qq, kk, vv, GQ, GK, GV, H, out, states, transposed, decay, out_scale, kv_mult, reverse,
                  ch: Chunks):
    """Pass 3: out[b, t, h] for every token, from the chunk start states (`transposed`: the state
    buffer holds [DV, DK] tiles and is read as its transpose)."""
    from . import lightning_chunk_out as CO
    if CO.variant() != "v0":  # the default (lightning_chunk_out.py); SALA_LIGHTNING_OUT=v0: the kernel below
        return CO.chunk_outputs(qq, kk, vv, GQ, GK, GV, H, out, states, transposed, decay, out_scale, kv_mult,
                                reverse, ch)
    _refuse_special_dots(qq.dtype, "SALA_LIGHTNING_OUT=v0")
    DK, DV = kk.shape[-1], vv.shape[-1]
    if transposed:
        st_sk, st_sv = 1, DK
    else:
        st_sk, st_sv = DV, 1
    grid = lambda META: (triton.cdiv(DV, META["BV"]) * H * ch.NS,)  # noqa: E731  (flat: see the kernel)
    _chunk_out_kernel[grid](qq, kk, vv, out, states, decay, *ch.args(), H, GQ, GK, GV,
                            qq.shape[-2] * DK, kk.shape[-2] * DK, vv.shape[-2] * DV, out.shape[-2] * DV,
                            st_sk, st_sv, float(out_scale), float(kv_mult), DK, DV,
                            BK=_pad(DK), BT=ch.BT, REVERSE=reverse, IS_VARLEN=ch.varlen,
                            PREC=_dot_precision(qq.dtype))
    return out


def _c(x):
    return x if x.is_contiguous() else x.contiguous()


def lightning_chunk_fwd(q, k, v, decay, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Returns (o [B,T,H,V] in q.dtype, final_state [N,H,K,V] fp32 or None, states [NS,H,K,V] fp32:
    the state entering each chunk, kept for the backward pass)."""
    q, k, v = _c(q), _c(k), _c(v)
    decay = _c(decay.to(torch.float32))
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    G = H // Hkv
    ch = Chunks(B, T, H, V, cu_seqlens, q.device)
    init = None if initial_state is None else _c(initial_state)
    # experimental forward variants (lightning_fwd_variants.py), selected with SALA_LIGHTNING_FWD
    fwd_variant = os.environ.get("SALA_LIGHTNING_FWD", "default") or "default"
    if fwd_variant != "default":
        from . import lightning_fwd_variants as FV
        FV.variant()  # validates the name
        if fwd_variant == "fused":
            return FV.fused_fwd(q, k, v, decay, scale, init, output_final_state, cu_seqlens, ch)
    states = local_states(k, v, G, G, H, decay, 1.0, False, ch)
    final = scan_states(states, decay, init, output_final_state, False, ch)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    if fwd_variant == "walk2":
        FV.walk2_outputs(q, k, v, G, H, o, states, decay, scale, ch)
    else:
        chunk_outputs(q, k, v, 1, G, G, H, o, states, False, decay, scale, 1.0, False, ch)
    return o, final, states


def lightning_chunk_bwd(do, dfinal, q, k, v, decay, states, scale, need_dh0, cu_seqlens=None):
    """Gradients (dq, dk, dv, d initial_state or None) given dO (and the final-state gradient)."""
    do, q, k, v = _c(do), _c(q), _c(k), _c(v)
    decay = _c(decay.to(torch.float32))
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    G = H // Hkv
    ch = Chunks(B, T, H, V, cu_seqlens, q.device)
    # dq: forward in time, state S^T read from the forward pass's chunk states
    dq = torch.empty_like(q)
    chunk_outputs(do, v, k, 1, G, G, H, dq, states, True, decay, scale, 1.0, False, ch)
    # reverse-time states of dS (K from q, V from dO)
    rstates = local_states(q, do, 1, 1, H, decay, scale, True, ch)
    dfin = None if dfinal is None else _c(dfinal.to(torch.float32))
    dh0 = scan_states(rstates, decay, dfin, need_dh0, True, ch)
    kdt = torch.float32 if G > 1 else k.dtype
    dk = torch.empty(B, T, H, K, device=q.device, dtype=kdt)
    dv = torch.empty(B, T, H, V, device=q.device, dtype=kdt)
    chunk_outputs(v, do, q, G, 1, 1, H, dk, rstates, True, decay, 1.0, scale, True, ch)
    chunk_outputs(k, q, do, G, 1, 1, H, dv, rstates, False, decay, 1.0, scale, True, ch)
    if G > 1:
        dk = dk.view(B, T, Hkv, G, K).sum(3).to(k.dtype)
        dv = dv.view(B, T, Hkv, G, V).sum(3).to(v.dtype)
    return dq, dk, dv, dh0


def chunk_len(B, T, H, DV, N):
    """(chunk length L, block BT): long chunks, but >= ~512 output programs (4 per H200 SM).
    H200 sweep, bf16, B=1 H=32 D=128 (bench/NOTES_lightning.md): longer chunks were never slower
    at 32K/128K (L 512 -> 8192: fwd 3.41 -> 2.88 ms, fwd+bwd 11.4 -> 10.3 ms at 128K); BT=128 was
    slower than BT=64."""
    if CHUNK_OVERRIDE is not None:
        return CHUNK_OVERRIDE
    nvb = max(1, triton.cdiv(DV, 64))
    L = 8192
    while L > 256 and (B * T // L + N) * H * nvb < 512:
        L //= 2
    return L, DEFAULT_BT


def num_chunks(B, T, H, V, N, varlen):
    """The chunk count Chunks() will use (for fake tensors under torch.compile)."""
    L = chunk_len(B, T, H, V, N)[0]
    return T // L + N if varlen else B * triton.cdiv(T, L)


__all__ = ["lightning_chunk_fwd", "lightning_chunk_bwd", "num_chunks", "chunk_len", "Chunks"]
