"""sparse_attention: InfLLM-V2 (MiniCPM-SALA's sparse layers) and its stages.

compress -> select (stage-1 scores with the C2 LSE approximation, summed over the GQA group,
max-pooled onto blocks, forced init/local blocks, top-k) -> block-sparse softmax attention.
Dense causal attention for the queries that see fewer than `dense_len` keys (per query, the same
rule as decode). The naive math is in reference/sparse.py; the defaults are the 9B model's (spec
section 2).

Triton backend (sala_ops/triton/sparse_select.py, sparse_attn.py): inputs are packed to varlen
form (a batch is N equal sequences), keys are compressed, blocks selected (no gradient), and the
block-sparse kernel runs under an autograd.Function. The dense path below `dense_len` is the same
block-sparse kernel with every causal block selected (one code path, varlen batches that mix
short and long sequences in one launch, same backward); it is not as fast as FlashAttention for
long dense sequences, but dense queries see fewer than dense_len keys by definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _checks as C
from . import _dispatch
from ._dispatch import choose, on_device_of_first_arg
from .reference import sparse as ref


def _kernels():
    # imported lazily: TRITON_INTERPRET must be set before triton is imported
    from .triton import sparse_attn, sparse_select
    return sparse_select, sparse_attn


def _pack(q, k, v, cu_q, cu_k):
    """[B, T, H, D] -> packed [B*T, H, D] + int64 offsets (a batch is B equal sequences)."""
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    if cu_q is None:
        ar = torch.arange(B + 1, device=q.device, dtype=torch.int64)
        cu_q, cu_k = ar * Tq, ar * Tk
    else:
        # the kernels read the offsets by pointer: a strided int64 view (not copied by the cast) must be made dense
        cu_q, cu_k = cu_q.to(torch.int64).contiguous(), cu_k.to(torch.int64).contiguous()
    flat = [None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous() for x in (q, k, v)]
    return (*flat, cu_q, cu_k)


# Triton backend as torch.library custom ops (fake implementations give torch.compile(fullgraph=True)
# the output shapes) and the autograd.Function that ties forward and backward together. Eager calls
# go straight to the implementations; under torch.compile the ops are used.

@on_device_of_first_arg
def _select_impl(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
                 kernel_size: int, kernel_stride: int, lse_kernel_size: int, lse_kernel_stride: int,
                 block_size: int, init_blocks: int, window_size: int, topk: int, dense_len: int,
                 width: int) -> torch.Tensor:
    Sel, _ = _kernels()
    # Default: contiguous C1 tiles + binary-search top-k (sparse_select_fast.py; it falls back to the online
    # bitonic kernel for configs it does not cover). H200, 9B config: 2.5x at 128K, 2.7x at 32K, identical
    # indices. SALA_SPARSE_SELECT=online forces the older kernel.
    if _dispatch.env_choice("SALA_SPARSE_SELECT", "fast", ("fast", "online"), "sparse_attention") == "fast":
        from .triton import sparse_select_fast
        Sel = sparse_select_fast
    return Sel.select(q, k, cu_q, cu_k, scale, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride,
                      block_size, init_blocks, window_size, topk, dense_len, width)


_sparse_select_op = torch.library.custom_op("sala_ops::sparse_select", mutates_args=())(_select_impl)


@_sparse_select_op.register_fake
def _(q, k, cu_q, cu_k, scale, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride, block_size,
      init_blocks, window_size, topk, dense_len, width):
    return q.new_empty((q.shape[0], k.shape[1], width), dtype=torch.int32)


@on_device_of_first_arg
def _attn_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, cu_q: torch.Tensor,
                   cu_k: torch.Tensor, tok_seq: torch.Tensor, scale: float,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, A = _kernels()
    # Default: K/V shared across tiles of 4 tokens (sparse_attn_tiled.py); H200, 9B config, random q: 1.2x the
    # one-token kernel at 128K, 1.8x with locally smooth q. SALA_SPARSE_FWD=onetoken forces the older kernel.
    if _dispatch.env_choice("SALA_SPARSE_FWD", "tiled", ("tiled", "onetoken"), "sparse_attention") == "tiled":
        from .triton import sparse_attn_tiled
        return sparse_attn_tiled.forward(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size)
    return A.forward(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size)


_sparse_attn_fwd_op = torch.library.custom_op("sala_ops::sparse_attn_fwd", mutates_args=())(_attn_fwd_impl)


@_sparse_attn_fwd_op.register_fake
def _(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty(q.shape[:2], dtype=torch.float32)


@on_device_of_first_arg
def _attn_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, idx: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   tok_seq: torch.Tensor, scale: float,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, A = _kernels()
    return A.backward(do, q, k, v, o, lse, idx, cu_q, cu_k, tok_seq, scale, block_size)


_sparse_attn_bwd_op = torch.library.custom_op("sala_ops::sparse_attn_bwd", mutates_args=())(_attn_bwd_impl)


@_sparse_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, idx, cu_q, cu_k, tok_seq, scale, block_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _BlockSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size):
        fwd = torch.ops.sala_ops.sparse_attn_fwd if torch.compiler.is_compiling() else _attn_fwd_impl
        o, lse = fwd(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size)
        ctx.save_for_backward(q, k, v, o, lse, idx, cu_q, cu_k, tok_seq)
        ctx.scale, ctx.block_size = scale, block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, cu_q, cu_k, tok_seq = ctx.saved_tensors
        bwd = torch.ops.sala_ops.sparse_attn_bwd if torch.compiler.is_compiling() else _attn_bwd_impl
        dq, dk, dv = bwd(do.contiguous(), q, k, v, o, lse, idx, cu_q, cu_k, tok_seq, ctx.scale, ctx.block_size)
        dq, dk, dv = _dispatch.no_double_backward("sparse_attention", (do, q, k, v), (dq, dk, dv))
        return dq, dk, dv, None, None, None, None, None, None


def _positive_scale(q, scale):
    """(q', scale') with scale' > 0 and scale' * q' = scale * q, for the Triton kernels, which fold the scale into
    the row maxima (max(s) * scale is the largest scaled score only for scale > 0): a scale of 0 or below gave
    NaN outputs. Exact: softmax(scale q.k) = softmax(-scale (-q).k); scale 0 scores every key 0 (q' = 0 q, so a
    NaN/inf in q still propagates), as the reference does. Differentiable (the backward sees q' and scale')."""
    if scale > 0:
        return q, scale
    if scale < 0:
        return -q, -scale
    return q * 0.0, 1.0


def _triton_select(qp, kp, cu_q, cu_k, scale, cfg, dense_len, width):
    ks2, st2 = cfg.c2
    sel = torch.ops.sala_ops.sparse_select if torch.compiler.is_compiling() else _select_impl
    with torch.no_grad():
        return sel(qp, kp, cu_q, cu_k, scale, cfg.kernel_size, cfg.kernel_stride, ks2, st2, cfg.block_size,
                   cfg.init_blocks, cfg.window_size, cfg.topk, dense_len, width)


@on_device_of_first_arg
def _triton_sparse_attention(q, k, v, scale, cfg, cu_q, cu_k):
    _, A = _kernels()
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, scale = _positive_scale(q, scale)
    qp, kp, vp, cu_q, cu_k = _pack(q, k, v, cu_q, cu_k)
    tok_seq = A.token_seq(cu_q, qp.shape[0])
    bs = cfg.block_size
    varlen = B == 1 and cu_q.numel() > 2
    if not varlen and Tk < cfg.dense_len:  # every query is dense (either rule): no selection at all
        idx = A.dense_indices(cu_q, cu_k, tok_seq, bs, (Tk + bs - 1) // bs, Hkv)
    elif cfg.dense_rule == "call" and not varlen:  # Tk >= dense_len: every query of the call selects
        idx = _triton_select(qp, kp, cu_q, cu_k, scale, cfg, 0, cfg.num_selected)
    else:
        # queries that see fewer than dense_len keys are dense (per-query rule, as in decode): leave
        # room for all their causal blocks, up to ceil((dense_len - 1) / block_size)
        width = cfg.num_selected
        if cfg.dense_len > 0:
            width = max(width, (min(cfg.dense_len - 1, Tk) + bs - 1) // bs)
        if cfg.dense_rule == "call":
            # per sequence: every query selects when the sequence has >= dense_len keys, none otherwise (then
            # its queries see < dense_len keys, and the per-query rule makes them all dense): selection with
            # dense_len 0 where the sequence is long, every causal block where it is short (no host sync)
            lk = (cu_k[1:] - cu_k[:-1])[tok_seq.long()]
            long_seq = (lk >= cfg.dense_len)[:, None, None]
            idx = torch.where(long_seq, _triton_select(qp, kp, cu_q, cu_k, scale, cfg, 0, width),
                              A.dense_indices(cu_q, cu_k, tok_seq, bs, width, Hkv))
        else:
            idx = _triton_select(qp, kp, cu_q, cu_k, scale, cfg, cfg.dense_len, width)
    o = _BlockSparseFn.apply(qp, kp, vp, idx, cu_q, cu_k, tok_seq, scale, bs)
    return o.reshape(B, Tq, H, v.shape[-1])


@dataclass(frozen=True)
class SparseConfig:
    """InfLLM-V2 hyperparameters; defaults are MiniCPM-SALA 9B's."""
    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    lse_kernel_size: Optional[int] = None  # default 4 * kernel_size (C2)
    lse_kernel_stride: Optional[int] = None  # default 4 * kernel_stride
    # Which queries run dense below dense_len. "query" (the default): a query at position t attends densely iff
    # t + 1 < dense_len, so a prompt prefilled in chunks gives the same result as in one call, and decode is the
    # same rule. "call": the released modeling code's rule (kv_seq_len < dense_len), per call and sequence: all
    # its queries dense if the sequence has fewer than dense_len keys, else all select (queries at 6144 <= t <
    # 8191 then keep 96 of their up to 128 blocks where "query" runs them dense); for exact parity with the
    # released model's prefill. Decode steps agree under both rules.
    dense_rule: str = "query"

    @property
    def c2(self):
        return (4 * self.kernel_size if self.lse_kernel_size is None else self.lse_kernel_size,
                4 * self.kernel_stride if self.lse_kernel_stride is None else self.lse_kernel_stride)

    @property
    def num_selected(self) -> int:
        """Blocks selected per (KV head, query): topk + window_size // block_size (96 for 9B)."""
        return self.topk + self.window_size // self.block_size

    def check(self, op: str) -> "SparseConfig":
        for name in ("kernel_size", "kernel_stride", "block_size", "topk"):
            C.positive_int(op, name, getattr(self, name))
        for name in ("init_blocks", "window_size", "dense_len"):
            C.positive_int(op, name, getattr(self, name), minimum=0)
        if not isinstance(self.dense_rule, str):
            raise TypeError(f"sala_ops.{op}: dense_rule must be a str, got {type(self.dense_rule).__name__}")
        if self.dense_rule not in ("query", "call"):
            raise ValueError(f"sala_ops.{op}: dense_rule must be 'query' or 'call', got {self.dense_rule!r}")
        ks2, st2 = self.c2
        C.positive_int(op, "lse_kernel_size", ks2)
        C.positive_int(op, "lse_kernel_stride", st2)
        if self.kernel_stride > self.kernel_size:
            raise ValueError(f"sala_ops.{op}: kernel_stride ({self.kernel_stride}) must be <= kernel_size "
                             f"({self.kernel_size}) so every key lies in some compression window")
        if self.window_size % self.block_size:
            raise ValueError(f"sala_ops.{op}: window_size ({self.window_size}) must be a multiple of block_size "
                             f"({self.block_size})")
        if self.topk < self.init_blocks + 1:
            raise ValueError(f"sala_ops.{op}: topk ({self.topk}) must be >= init_blocks + 1 "
                             f"({self.init_blocks + 1}) so the forced blocks fit in the selection")
        return self


def _check_qkv(op, q, k, v, cu_seqlens, cu_seqlens_k):
    for name, x in (("q", q), ("k", k), ("v", v)):
        C.tensor(op, name, x, ndim=4)
    C.same(op, ("q", "k", "v"), (q, k, v), "dtype")
    C.same(op, ("q", "k", "v"), (q, k, v), "device")
    B, Tq, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1]:
        raise ValueError(f"sala_ops.{op}: q, k, v must share the batch and k, v the sequence dimension, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    C.dim_eq(op, "k", k, 3, D, "head dim of q")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"sala_ops.{op}: k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    C.gqa(op, H, k.shape[2])
    Tk = k.shape[1]
    if Tq < 1:
        raise ValueError(f"sala_ops.{op}: q must hold at least one token, got sequence length {Tq}")
    if cu_seqlens is None and cu_seqlens_k is not None:
        raise ValueError(f"sala_ops.{op}: cu_seqlens_k needs cu_seqlens (the query offsets) as well")
    if cu_seqlens is None:
        if Tq > Tk:
            raise ValueError(f"sala_ops.{op}: q ({Tq} tokens) cannot be longer than k ({Tk}): queries are "
                             f"bottom-right aligned to the keys")
        return None, None
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    C.cu_seqlens(op, cu_seqlens, Tq, batch=B, device=q.device)
    C.cu_seqlens(op, cu_k, Tk, name="cu_seqlens_k" if cu_seqlens_k is not None else "cu_seqlens", device=q.device)
    if cu_k.numel() != cu_seqlens.numel():
        raise ValueError(f"sala_ops.{op}: cu_seqlens and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cu_seqlens.numel() - 1} and {cu_k.numel() - 1}")
    if torch.compiler.is_compiling():
        # the offsets are data under torch.compile (as in C.cu_seqlens): a Python branch on them cannot be
        # traced (fullgraph=True failed with 'Could not guard on data-dependent expression'); each sequence's
        # rule becomes a runtime assertion of the compiled graph instead
        hq, hk = cu_seqlens.tolist(), cu_k.tolist()
        for n in range(len(hq) - 1):
            torch._check(hq[n + 1] - hq[n] <= hk[n + 1] - hk[n],  # a constant message, as in C.cu_seqlens
                         lambda: "sala_ops: every sequence needs at least as many keys as queries")
        return cu_seqlens, cu_k
    lq = cu_seqlens[1:] - cu_seqlens[:-1]
    lk = cu_k[1:] - cu_k[:-1]
    if bool((lq > lk.to(lq.dtype)).any()):
        raise ValueError(f"sala_ops.{op}: every sequence needs at least as many keys as queries (queries are "
                         f"bottom-right aligned), got query lengths {lq.tolist()} and key lengths {lk.tolist()}")
    return cu_seqlens, cu_k


def _config(op, config, overrides) -> SparseConfig:
    if config is not None and not isinstance(config, SparseConfig):
        raise TypeError(f"sala_ops.{op}: config must be a SparseConfig or None, got {type(config).__name__}")
    base = config or SparseConfig()
    unknown = set(overrides) - set(SparseConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"sala_ops.{op}: unknown sparse hyperparameters {sorted(unknown)}")
    # field by field (not base.__dict__): dynamo in torch 2.11 cannot trace a frozen dataclass's __dict__
    return SparseConfig(**{f: overrides[f] if f in overrides else getattr(base, f)
                           for f in SparseConfig.__dataclass_fields__}).check(op)


def sparse_attention(q, k, v, scale=None, cu_seqlens=None, cu_seqlens_k=None, config: SparseConfig | None = None,
                     **hyperparameters):
    """InfLLM-V2 attention for prefill and training.

    q [B, Tq, H, D], k/v [B, Tk, Hkv, D] with Tq <= Tk (queries bottom-right aligned: chunked
    prefill continues an existing key prefix); Hkv divides H. scale None = 1/sqrt(D).
    cu_seqlens [N+1] (queries) and optionally cu_seqlens_k (keys, default = cu_seqlens), B = 1.
    Hyperparameters: a SparseConfig and/or keyword overrides (kernel_size, kernel_stride,
    block_size, init_blocks, window_size, topk, dense_len, lse_kernel_size, lse_kernel_stride, dense_rule).
    A query that sees fewer than dense_len keys (position + 1 < dense_len) attends densely; the
    others select blocks (dense_rule="call": per call and sequence instead, as the released model code).
    Gradients flow to q, k, v through the attention; selection carries none.
    """
    op = "sparse_attention"
    cfg = _config(op, config, hyperparameters)
    cu_q, cu_k = _check_qkv(op, q, k, v, cu_seqlens, cu_seqlens_k)
    scale = C.scale_arg(op, scale, q.shape[-1])
    backend = choose(op, q)
    if backend == "triton":
        return _triton_sparse_attention(q, k, v, scale, cfg, cu_q, cu_k)
    ks2, st2 = cfg.c2
    with _dispatch.no_autocast(q):
        return ref.sparse_attention(q, k, v, scale, cfg.kernel_size, cfg.kernel_stride, cfg.block_size,
                                    cfg.init_blocks, cfg.window_size, cfg.topk, cfg.dense_len, ks2, st2, cu_q, cu_k,
                                    dense_rule=cfg.dense_rule)


def select_blocks(q, k, scale=None, cu_seqlens=None, cu_seqlens_k=None, config: SparseConfig | None = None,
                  **hyperparameters):
    """InfLLM-V2 block selection alone: int32 [B, Tq, Hkv, topk + window_size // block_size], block
    indices local to each sequence, ascending, padded with -1. No gradient."""
    op = "select_blocks"
    cfg = _config(op, config, hyperparameters)
    cu_q, cu_k = _check_qkv(op, q, k, k, cu_seqlens, cu_seqlens_k)
    scale = C.scale_arg(op, scale, q.shape[-1])
    backend = choose(op, q)
    if backend == "triton":
        with _dispatch.device_of(q, op):
            q, scale = _positive_scale(q, scale)
            qp, kp, _, cq, ck = _pack(q, k, None, cu_q, cu_k)
            idx = _triton_select(qp, kp, cq, ck, scale, cfg, 0, cfg.num_selected)
        return idx.reshape(q.shape[0], q.shape[1], k.shape[2], cfg.num_selected)
    ks2, st2 = cfg.c2
    with torch.no_grad(), _dispatch.no_autocast(q):
        return ref.select_blocks(q, k, scale, cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks,
                                 cfg.window_size, cfg.topk, ks2, st2, cu_q, cu_k)


def block_sparse_attention(q, k, v, block_indices, block_size=64, scale=None, cu_seqlens=None, cu_seqlens_k=None):
    """Softmax attention over given blocks (bring your own selection): block_indices int
    [B, Tq, Hkv, S] of block numbers local to each sequence, -1 = unused slot. Entries that are
    negative or past the sequence's last block are ignored like -1 and duplicates count once, on
    every backend (checked on the device, no host sync); future blocks are cut by the token-level
    causal mask. Queries bottom-right aligned; a query left with no key gets a zero output."""
    op = "block_sparse_attention"
    cu_q, cu_k = _check_qkv(op, q, k, v, cu_seqlens, cu_seqlens_k)
    C.positive_int(op, "block_size", block_size)
    C.tensor(op, "block_indices", block_indices, ndim=4, dtypes=(torch.int32, torch.int64))
    if tuple(block_indices.shape[:3]) != (q.shape[0], q.shape[1], k.shape[2]):
        raise ValueError(f"sala_ops.{op}: block_indices must have shape [B, Tq, Hkv, S] = "
                         f"[{q.shape[0]}, {q.shape[1]}, {k.shape[2]}, S], got {tuple(block_indices.shape)}")
    if block_indices.device != q.device:
        raise ValueError(f"sala_ops.{op}: block_indices must be on {q.device}, got {block_indices.device}")
    scale = C.scale_arg(op, scale, q.shape[-1])
    backend = choose(op, q)
    if backend == "triton":
        _, A = _kernels()
        B, Tq, H, _ = q.shape
        with _dispatch.device_of(q, op):
            q, scale = _positive_scale(q, scale)
            qp, kp, vp, cq, ck = _pack(q, k, v, cu_q, cu_k)
            tok_seq = A.token_seq(cq, qp.shape[0])
            idx = block_indices.reshape(B * Tq, *block_indices.shape[2:])
            idx = A.sanitize_indices(idx, cq, ck, tok_seq, block_size)
            o = _BlockSparseFn.apply(qp, kp, vp, idx, cq, ck, tok_seq, scale, block_size)
        return o.reshape(B, Tq, H, v.shape[-1])
    with _dispatch.no_autocast(q):
        return ref.block_sparse_attention(q, k, v, block_indices, block_size, scale, cu_q, cu_k)


def compress_keys(k, kernel_size=32, kernel_stride=16):
    """Mean-pooled keys over complete windows: [B, T, H, D] -> [B, N, H, D] (fp32),
    N = (T - kernel_size) // kernel_stride + 1 (0 if T < kernel_size)."""
    op = "compress_keys"
    C.tensor(op, "k", k, ndim=4)
    C.positive_int(op, "kernel_size", kernel_size)
    C.positive_int(op, "kernel_stride", kernel_stride)
    if choose(op, k) == "triton":
        Sel, _ = _kernels()
        B, T, H, D = k.shape
        n = 0 if T < kernel_size else (T - kernel_size) // kernel_stride + 1
        if k.numel() == 0:  # an empty batch has no sequence for the kernel's tile map to index
            return torch.zeros(B, n, H, D, dtype=torch.float32, device=k.device)
        cu = torch.arange(B + 1, device=k.device, dtype=torch.int64) * T
        with _dispatch.device_of(k, op):
            c, _ = Sel.compress(k.reshape(B * T, H, D).contiguous(), cu, kernel_size, kernel_stride)
        return c[:B * n].reshape(B, n, H, D)
    return ref.compress_keys(k, kernel_size, kernel_stride)
