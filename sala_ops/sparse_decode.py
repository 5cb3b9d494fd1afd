"""Sparse-layer decode for InfLLM-V2 (MiniCPM-SALA's sparse layers): a per-layer cache and a one-token op.

    cache = SparseLayerCache(batch_size=B, max_len=L, num_kv_heads=Hkv, head_dim=D, dtype=q.dtype,
                             device=q.device, config=SparseConfig())
    o = sparse_prefill(q, k, v, cache)            # appends the prompt, returns sparse_attention over it
    for each new token:
        cache.append_token(k_t, v_t)              # [B, Hkv, D]: K/V row, new C1/C2 keys, lengths += 1
        o_t = sparse_decode(q_t, cache)           # [B, H, D]: the query sits at position lengths - 1

API decision: append and attend are two calls (append_token, then sparse_decode, which appends
nothing), as in the spec's "the caller appends the new token's k/v first, then decodes";
`sparse_decode_step(q, k, v, cache)` does both. Prefill (`sparse_prefill` / `cache.append`) may
synchronise with the host; a decode step (append_token + sparse_decode) does not: the lengths are a
device int32 tensor, every buffer (including the kernels' workspace, allocated on the first decode)
is preallocated to the cache's capacity and the launch grids depend only on that capacity, so the
step can be captured in a CUDA graph.

"Sparse compute, dense storage" (spec section 2): K/V [B, max_len, Hkv, D] in the model dtype;
compressed keys C1 (mean over kernel_size keys every kernel_stride tokens, complete windows only)
and C2 (lse_kernel_size / lse_kernel_stride) in fp32, one new key each time a window completes.
A sequence with L cached keys (after the append) decodes with dense causal attention while
L < dense_len and with selection + block-sparse attention from L >= dense_len on: exactly what
`sparse_attention` gives the query at position L - 1 (its per-query rule, reference/sparse.py), so
prefill + decode one token at a time reproduces one sparse_attention call over the whole sequence
at every position.

Backends: CUDA tensors run the Triton kernels of sala_ops/triton/sparse_decode_kernels.py
(flash-decoding split-K over the selected blocks); CPU tensors a PyTorch path that reads the same
cache (SALA_OPS_BACKEND / use_backend to force one; CPU + TRITON_INTERPRET=1 runs the kernels).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from . import _checks as C
from . import _dispatch
from ._dispatch import choose, env_choice, on_device_of_first_arg
from .reference import sparse as ref
from .sparse import SparseConfig, _config, sparse_attention

__all__ = ["SparseLayerCache", "sparse_prefill", "sparse_decode", "sparse_decode_step"]


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _n_windows(L: int, ks: int, st: int) -> int:
    return 0 if L < ks else (L - ks) // st + 1


_KERNELS = None  # (sparse_decode_kernels, _launch.launch), imported on first use


def _import_kernels():
    global _KERNELS
    from .triton import sparse_decode_kernels
    from .triton._launch import launch
    _KERNELS = (sparse_decode_kernels, launch)
    return _KERNELS


# (k, v, cache) metadata signatures that passed append_token's checks (see sparse_decode's _decode_sigs)
_append_sigs: set = set()
_SIGS_MAX = 256


class SparseLayerCache:
    """Decode cache of one sparse layer for a batch of B sequences (lengths may differ).

    Attributes: k, v [B, max_len, Hkv, D] (dtype); c1 [B, N1, Hkv, D], c2 [B, N2, Hkv, D] fp32
    (N1/N2 = number of complete windows at max_len); lengths int32 [B] (device); overflow int32 [B]
    (set by append_token when a sequence is full: the token is dropped, see `check()`); config.
    """

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, device=None, config: Optional[SparseConfig] = None,
                 **hyperparameters):
        op = "SparseLayerCache"
        self.config = cfg = _config(op, config, hyperparameters)
        for name, val in (("batch_size", batch_size), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            C.positive_int(op, name, val)
        if dtype not in C.FLOAT_DTYPES:
            raise TypeError(f"sala_ops.{op}: dtype must be one of {[str(d) for d in C.FLOAT_DTYPES]}, got {dtype}")
        # the device the buffers really live on ("cuda" -> "cuda:0"), so argument checks compare equal
        device = torch.empty(0, device=device if device is not None else "cpu").device
        self.batch_size, self.max_len, self.num_kv_heads, self.head_dim = batch_size, max_len, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        ks2, st2 = cfg.c2
        self.n1_max = _n_windows(max_len, cfg.kernel_size, cfg.kernel_stride)
        self.n2_max = _n_windows(max_len, ks2, st2)
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # at least one row so kernels always get a valid pointer
        self.c1 = torch.zeros(batch_size, max(1, self.n1_max), num_kv_heads, head_dim, dtype=torch.float32,
                              device=device)
        self.c2 = torch.zeros(batch_size, max(1, self.n2_max), num_kv_heads, head_dim, dtype=torch.float32,
                              device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.overflow = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.chunk_target = 32  # selection chunks per (sequence, KV head) at full capacity (kernel tiling)
        self._ws = {}

    # ------------------------------------------------------------------ bookkeeping (host side)
    def reset(self):
        """Empty every sequence (keeps the buffers)."""
        self.lengths.zero_()
        self.overflow.zero_()

    def lengths_host(self) -> list[int]:
        return [int(x) for x in self.lengths.tolist()]

    def check(self):
        """Raise if a decode step ever ran past max_len (host sync; call outside the hot loop)."""
        if bool(self.overflow.any()):
            rows = torch.nonzero(self.overflow).flatten().tolist()
            raise ValueError(f"sala_ops.SparseLayerCache: sequences {rows} reached max_len={self.max_len}; "
                             f"tokens past it were dropped")

    def compressed_keys(self, row: int):
        """(C1 [n1, Hkv, D], C2 [n2, Hkv, D]) of sequence `row` at its current length (views)."""
        L = int(self.lengths[row])
        ks2, st2 = self.config.c2
        return (self.c1[row, :_n_windows(L, self.config.kernel_size, self.config.kernel_stride)],
                self.c2[row, :_n_windows(L, ks2, st2)])

    # ------------------------------------------------------------------ reallocation, rows, roll-back
    # The HF-style cache (sala_ops.cache) grows, reorders and crops through these. Each returns or leaves
    # buffers other than the ones a captured CUDA graph holds (except truncate): capture after the last one.
    def resized(self, max_len: int, keep: Optional[int] = None) -> "SparseLayerCache":
        """A new cache of capacity `max_len` holding this one's contents: K/V of the first `keep` positions
        (default: the whole old capacity; it must cover every length), their compressed keys, lengths,
        overflow flags. Same layout, batch, dtype, device and config; the workspace is rebuilt lazily."""
        op = "SparseLayerCache.resized"
        C.positive_int(op, "max_len", max_len)
        keep = self.max_len if keep is None else C.positive_int(op, "keep", keep, minimum=0)
        if not keep <= min(max_len, self.max_len):
            raise ValueError(f"sala_ops.{op}: cannot keep {keep} positions in max_len={max_len} "
                             f"(old max_len {self.max_len})")
        # The new cache takes over the lengths, so `keep` must cover them all: a shorter keep copied fewer K/V rows
        # than the lengths claim (zero keys attended silently, and lengths past the new max_len made the decode
        # kernels read out of bounds). A host sync, as for the allocation itself: resizing is not a decode step.
        longest = int(self.lengths.max()) if keep < self.max_len else 0
        if keep < longest:
            raise ValueError(f"sala_ops.{op}: keep={keep} positions would drop cached tokens (a sequence holds "
                             f"{longest}); truncate() first to shorten the sequences")
        new = SparseLayerCache(self.batch_size, max_len, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                               device=self.device, config=self.config)
        new.chunk_target = self.chunk_target
        new.k[:, :keep] = self.k[:, :keep]
        new.v[:, :keep] = self.v[:, :keep]
        cfg = self.config
        for src, dst, (ks, st) in ((self.c1, new.c1, (cfg.kernel_size, cfg.kernel_stride)), (self.c2, new.c2, cfg.c2)):
            n = _n_windows(keep, ks, st)
            dst[:, :n] = src[:, :n]
        new.lengths.copy_(self.lengths)
        new.overflow.copy_(self.overflow)
        return new

    def map_rows(self, fn) -> "SparseLayerCache":
        """A new cache whose batch rows are `fn(x)` of this one's for every per-sequence buffer (x has the
        batch first; fn = index_select / repeat_interleave / boolean or integer indexing along dim 0)."""
        new = copy.copy(self)
        new.k, new.v, new.c1, new.c2, new.lengths, new.overflow = (
            fn(x).contiguous() for x in (self.k, self.v, self.c1, self.c2, self.lengths, self.overflow))
        new.batch_size = new.k.shape[0]
        new._ws = {}  # sized by the batch
        return new

    def truncate(self, length: int):
        """Roll every sequence back to at most `length` tokens (in place, keeps the buffers). The compressed
        keys of the kept complete windows are the prefix's own; a window that was complete only past
        `length` is recomputed from the new keys when appends complete it again. Overflow flags clear when
        length < max_len (the roll-back cuts before the dropped tokens)."""
        C.positive_int("SparseLayerCache.truncate", "length", length, minimum=0)
        self.lengths.clamp_(max=length)
        # An overflowed sequence holds max_len tokens and lost the ones after: only a roll-back below max_len
        # cuts past the loss. Clearing the flags unconditionally hid the loss from check() after a truncate that
        # kept the sequence whole (length >= max_len).
        if length < self.max_len:
            self.overflow.zero_()

    # ------------------------------------------------------------------ appends
    def _check_kv(self, op, k, v, ndim):
        for name, x in (("k", k), ("v", v)):
            C.tensor(op, name, x, ndim=ndim)
            if x.dtype != self.dtype:
                raise TypeError(f"sala_ops.{op}: {name} must have the cache dtype {self.dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"sala_ops.{op}: {name} must be on the cache device {self.device}, got {x.device}")
        if k.shape != v.shape:
            raise ValueError(f"sala_ops.{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if tuple(k.shape[-2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"sala_ops.{op}: k must end in [Hkv, D] = [{self.num_kv_heads}, {self.head_dim}], "
                             f"got {tuple(k.shape)}")

    def append(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None):
        """Append a chunk (prefill; synchronises with the host). k, v [B, T, Hkv, D]: every sequence
        gets T tokens; or packed [1, total, Hkv, D] with cu_seqlens [B+1]: sequence n gets
        k[0, cu[n]:cu[n+1]]. Writes K/V and the compressed keys of every window completed by the chunk."""
        op = "SparseLayerCache.append"
        self._check_kv(op, k, v, 4)
        B = self.batch_size
        if cu_seqlens is None:
            if k.shape[0] != B:
                raise ValueError(f"sala_ops.{op}: k must have batch {B} (the cache's), got {k.shape[0]}")
            segs = [(b, k[b], v[b]) for b in range(B)]
        else:
            C.cu_seqlens(op, cu_seqlens, k.shape[1], batch=k.shape[0], device=k.device)
            if cu_seqlens.numel() != B + 1:
                raise ValueError(f"sala_ops.{op}: cu_seqlens must describe {B} sequences (the cache's batch), "
                                 f"got {cu_seqlens.numel() - 1}")
            cu = cu_seqlens.tolist()
            segs = [(b, k[0, cu[b]:cu[b + 1]], v[0, cu[b]:cu[b + 1]]) for b in range(B)]
        lens = self.lengths_host()
        for b, kk, _ in segs:
            if lens[b] + kk.shape[0] > self.max_len:
                raise ValueError(f"sala_ops.{op}: sequence {b} would hold {lens[b] + kk.shape[0]} tokens, more than "
                                 f"max_len={self.max_len}")
        cfg = self.config
        ks2, st2 = cfg.c2
        new = []
        for b, kk, vv in segs:
            L0, T = lens[b], kk.shape[0]
            L1 = L0 + T
            self.k[b, L0:L1] = kk
            self.v[b, L0:L1] = vv
            for buf, ks, st in ((self.c1, cfg.kernel_size, cfg.kernel_stride), (self.c2, ks2, st2)):
                j_lo, j_hi = _n_windows(L0, ks, st), _n_windows(L1, ks, st)
                if j_hi > j_lo:
                    x = self.k[b, st * j_lo: st * (j_hi - 1) + ks].float()  # [T', Hkv, D]
                    buf[b, j_lo:j_hi] = x.unfold(0, ks, st)[: j_hi - j_lo].mean(dim=-1)
            new.append(L1)
        self.lengths.copy_(torch.tensor(new, dtype=torch.int32))

    def append_token(self, k: torch.Tensor, v: torch.Tensor):
        """Append one token to every sequence: k, v [B, Hkv, D] (or [B, 1, Hkv, D]). No host sync on
        the Triton backend; a full sequence drops the token and sets `overflow` (see check())."""
        op = "SparseLayerCache.append_token"
        if isinstance(k, torch.Tensor) and k.dim() == 4:  # (a non-tensor gets _check_kv's TypeError)
            if k.shape[1] != 1:
                raise ValueError(f"sala_ops.{op}: k must be [B, Hkv, D] or [B, 1, Hkv, D], got {tuple(k.shape)}")
            k, v = k[:, 0], v[:, 0] if isinstance(v, torch.Tensor) and v.dim() == 4 else v
        try:
            sig = (type(self), type(k), k.shape, k.dtype, k.device, type(v), v.shape, v.dtype, v.device, self.dtype,
                   self.device, self.batch_size, self.num_kv_heads, self.head_dim)
            ok = sig in _append_sigs
        except Exception:  # the checks say what is wrong
            sig, ok = None, False
        if not ok:
            self._check_kv(op, k, v, 3)
            if k.shape[0] != self.batch_size:
                raise ValueError(f"sala_ops.{op}: k must have batch {self.batch_size} (the cache's), got {k.shape[0]}")
            if sig is not None and not torch.compiler.is_compiling():
                if len(_append_sigs) >= _SIGS_MAX:
                    _append_sigs.clear()
                _append_sigs.add(sig)
        if choose("sparse_decode", k) == "triton":
            with _dispatch.device_of(k, "SparseLayerCache.append_token"):
                self._append_token_triton(k, v)
            return
        cfg = self.config
        ks2, st2 = cfg.c2
        lens = self.lengths_host()
        for b in range(self.batch_size):
            pos = lens[b]
            if pos >= self.max_len:
                self.overflow[b] = 1
                continue
            self.k[b, pos] = k[b]
            self.v[b, pos] = v[b]
            L = pos + 1
            for buf, ks, st in ((self.c1, cfg.kernel_size, cfg.kernel_stride), (self.c2, ks2, st2)):
                if L >= ks and (L - ks) % st == 0:
                    buf[b, (L - ks) // st] = self.k[b, L - ks:L].float().mean(dim=0)
            self.lengths[b] = L

    def _append_token_triton(self, k, v):
        K, launch = _KERNELS or _import_kernels()
        k, v = k.contiguous(), v.contiguous()
        cx = self._ws.get("append")
        if cx is None:
            cfg = self.config
            ks2, st2 = cfg.c2
            cx = self._ws["append"] = dict(KS=cfg.kernel_size, ST=cfg.kernel_stride, KS2=ks2, ST2=st2,
                                           BD=max(16, _pow2(self.head_dim)), BR=16, num_warps=4)
        kc, c1, c2 = self.k, self.c1, self.c2
        sk, s1, s2 = kc.stride(), c1.stride(), c2.stride()
        launch(K._append_token_kernel, (self.batch_size,),
               (k, v, kc, self.v, c1, c2, self.lengths, self.overflow),
               (k.stride(0), k.stride(1), sk[0], sk[1], sk[2], s1[0], s1[1], s1[2], s2[0], s2[1], s2[2],
                self.num_kv_heads, self.head_dim, self.max_len), cx)

    # ------------------------------------------------------------------ kernel plan + workspace
    def _workspace(self, H: int):
        ws = self._ws.get(H)
        if ws is not None:
            return ws
        cfg = self.config
        B, Hkv, D = self.batch_size, self.num_kv_heads, self.head_dim
        bs, ks, st = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
        ksel = cfg.num_selected
        G = H // Hkv
        p = dict(G=G, BG=max(16, _pow2(G)), BD=max(16, _pow2(D)), BJ=64)
        # LSE partials over C2 keys: at most 32 splits per (sequence, KV head)
        n2 = max(1, self.n2_max)
        p["CH2"] = p["BJ"] * _cdiv(_cdiv(n2, 32), p["BJ"])
        p["S2"] = _cdiv(n2, p["CH2"])
        p["S2P"] = _pow2(p["S2"])
        # selection chunks of CB blocks; each keeps its top KP, merged by one program per (b, g)
        nb = _cdiv(self.max_len, bs)
        p["KP"] = KP = _pow2(ksel)
        p["CB"] = CB = max(KP, _pow2(_cdiv(nb, self.chunk_target)))
        p["NCH"] = _cdiv(nb, CB)
        p["NCHP"] = _pow2(p["NCH"])
        p["PW"] = (CB * bs + ks - 1) // st + 2
        p["W"] = (bs + ks - 1) // st + 2
        # attention slots: the selected blocks, or every block of a sequence still below dense_len
        p["NSLOT"] = NSLOT = max(ksel, _cdiv(cfg.dense_len, bs))
        SPB = max(4, _cdiv(NSLOT * B * Hkv, 264))
        p["SPB"] = SPB = min(SPB, NSLOT)
        p["NSPLIT"] = _cdiv(NSLOT, SPB)
        p["NSP"] = _pow2(p["NSPLIT"])
        p["BN"] = max(16, _pow2(bs))
        dev, f32 = self.device, torch.float32
        ws = dict(p=p,
                  m2=torch.empty(B, H, p["S2"], dtype=f32, device=dev),
                  l2=torch.empty(B, H, p["S2"], dtype=f32, device=dev),
                  pbuf=torch.empty(B, Hkv, p["NCH"], p["PW"], dtype=f32, device=dev),
                  cand=torch.empty(B, Hkv, p["NCH"], KP, dtype=torch.int64, device=dev),
                  sel=torch.full((B, Hkv, ksel), -1, dtype=torch.int32, device=dev),
                  o_part=torch.empty(B, H, p["NSPLIT"], D, dtype=f32, device=dev),
                  m_part=torch.empty(B, H, p["NSPLIT"], dtype=f32, device=dev),
                  l_part=torch.empty(B, H, p["NSPLIT"], dtype=f32, device=dev))
        self._ws[H] = ws
        return ws


# ---------------------------------------------------------------------- public ops
def _check_q(op, q, cache: SparseLayerCache):
    C.tensor(op, "q", q, ndim=(3, 4))
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"sala_ops.{op}: q must be [B, H, D] or [B, 1, H, D] (one token), got {tuple(q.shape)}")
        q = q[:, 0]
    if not isinstance(cache, SparseLayerCache):
        raise TypeError(f"sala_ops.{op}: cache must be a SparseLayerCache, got {type(cache).__name__}")
    _check_q_matches_cache(op, q, cache)
    if q.shape[0] != cache.batch_size:
        raise ValueError(f"sala_ops.{op}: q must have batch {cache.batch_size} (the cache's), got {q.shape[0]}")
    return q, squeeze


def _check_q_matches_cache(op, q, cache: SparseLayerCache):
    """q [..., H, D] against the cache: dtype, device, head dim, a GQA group of its KV heads."""
    if q.dtype != cache.dtype:
        raise TypeError(f"sala_ops.{op}: q must have the cache dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"sala_ops.{op}: q must be on the cache device {cache.device}, got {q.device}")
    C.dim_eq(op, "q", q, q.dim() - 1, cache.head_dim, "head dim of the cache")
    C.gqa(op, q.shape[-2], cache.num_kv_heads, kv_name="cache")


def sparse_prefill(q, k, v, cache: SparseLayerCache, scale=None, cu_seqlens=None):
    """Append a prompt chunk to the cache and return `sparse_attention` of its queries over everything
    cached so far (queries bottom-right aligned: a later chunk continues the earlier ones).
    q [B, T, H, D], k/v [B, T, Hkv, D]; or packed with B = 1 and cu_seqlens [cache batch + 1]."""
    op = "sparse_prefill"
    if not isinstance(cache, SparseLayerCache):
        raise TypeError(f"sala_ops.{op}: cache must be a SparseLayerCache, got {type(cache).__name__}")
    # Every check on q comes before the append: sparse_attention used to be the one to refuse a bad q (wrong
    # dtype, heads, head dim, scale), after cache.append had already added k/v, so a refused call grew the cache.
    C.tensor(op, "q", q, ndim=4)
    C.tensor(op, "k", k, ndim=4)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"sala_ops.{op}: q and k must share [batch, seq], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] < 1:  # (a bare 'step must be nonzero' from torch.arange, or sparse_attention's message)
        raise ValueError(f"sala_ops.{op}: q must hold at least one token, got sequence length {q.shape[1]}")
    _check_q_matches_cache(op, q, cache)
    C.scale_arg(op, scale, q.shape[-1])
    cache.append(k, v, cu_seqlens)
    lens = cache.lengths_host()
    cfg = cache.config
    if cu_seqlens is None and len(set(lens)) == 1:
        L = lens[0]
        return sparse_attention(q, cache.k[:, :L].contiguous(), cache.v[:, :L].contiguous(), scale, config=cfg)
    B = cache.batch_size
    if cu_seqlens is None:
        T = q.shape[1]
        qp = q.reshape(1, B * T, *q.shape[2:])
        cu_q = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    else:
        qp, cu_q = q, cu_seqlens.to(torch.int32)
    kp = torch.cat([cache.k[b, :lens[b]] for b in range(B)])[None]
    vp = torch.cat([cache.v[b, :lens[b]] for b in range(B)])[None]
    cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=q.device)
    out = sparse_attention(qp, kp, vp, scale, cu_seqlens=cu_q, cu_seqlens_k=cu_k, config=cfg)
    return out.reshape(q.shape[:3] + (v.shape[-1],))


# Call signatures of sparse_decode that passed every check (q's type, shape, dtype, device; the cache's
# type, dtype, device, batch, KV heads, head dim; scale and its type): a call with one of them skips
# the checks. Bounded: cleared when full.
_decode_sigs: dict = {}


def _decode_signature(q, cache, scale):
    return (type(q), q.shape, q.dtype, q.device, type(cache), cache.dtype, cache.device, cache.batch_size,
            cache.num_kv_heads, cache.head_dim, scale, type(scale))


def _decode_args(op, q, cache, scale):
    """(scale, squeeze) of a valid decode call; raises naming `op` for a bad one (checks skipped for a call
    signature that passed them before)."""
    try:
        sig = _decode_signature(q, cache, scale)
        hit = _decode_sigs.get(sig)
    except Exception:  # not a tensor / not a cache / unhashable: the checks say what is wrong
        sig = hit = None
    if hit is None:
        _, squeeze = _check_q(op, q, cache)
        hit = (C.scale_arg(op, scale, q.shape[-1]), squeeze)
        if sig is not None and not torch.compiler.is_compiling():
            if len(_decode_sigs) >= _SIGS_MAX:
                _decode_sigs.clear()
            _decode_sigs[sig] = hit
    return hit


def _decode_backend(op, q):
    backend = choose(op, q)
    # an error rather than an output with no gradient path
    if backend == "triton" and q.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"sala_ops.{op}: q requires grad, but the Triton decode kernels have no backward; "
                         f"run decoding under torch.no_grad(), or call sparse_attention for a differentiable step")
    return backend


def _decode_run(q, cache, scale, squeeze, backend, return_indices):
    if squeeze:
        q = q[:, 0]
    if backend == "triton":
        o, idx = _decode_triton(q, cache, scale)
        # idx is the workspace's selection buffer, rewritten by the next decode: the caller gets its own copy
        if return_indices:
            idx = idx.clone()
    else:
        with _dispatch.no_autocast(q):
            o, idx = _decode_torch(q, cache, scale)
    if squeeze:
        o = o[:, None]
    return (o, idx) if return_indices else o


def sparse_decode(q, cache: SparseLayerCache, scale=None, return_indices: bool = False):
    """One decode step of a sparse layer: q [B, H, D] (or [B, 1, H, D]) is the query of the token at
    position lengths[b] - 1 of each sequence (its K/V already appended with cache.append_token).
    Dense causal attention over the cache while lengths[b] < dense_len, else InfLLM-V2 selection
    from the cached compressed keys + block-sparse attention. Returns o like q; with
    return_indices, (o, indices int32 [B, Hkv, topk + window_size // block_size]): the selected
    blocks ascending, -1 padded; all -1 for a sequence decoding densely."""
    op = "sparse_decode"
    scale, squeeze = _decode_args(op, q, cache, scale)
    return _decode_run(q, cache, scale, squeeze, _decode_backend(op, q), return_indices)


def sparse_decode_step(q, k, v, cache: SparseLayerCache, scale=None):
    """append_token(k, v) then sparse_decode(q): one token per sequence, q [B, H, D], k/v [B, Hkv, D]."""
    # q is checked (and the backend's refusal of a q that requires grad raised) before the append: checked
    # only by sparse_decode after append_token, a refused q still appended its token to every sequence
    op = "sparse_decode"
    scale, squeeze = _decode_args(op, q, cache, scale)
    backend = _decode_backend(op, q)
    cache.append_token(k, v)
    return _decode_run(q, cache, scale, squeeze, backend, False)


# ---------------------------------------------------------------------- backends
_FAST = None


def _import_fast():
    global _FAST
    # read once by the kernel module when it is imported (as MERGE and FUSED, which it checks itself); any value
    # but "1" meant off, so a typo ("true", "on") silently ran without PDL
    env_choice("SALA_SPARSE_DECODE_PDL", "0", ("0", "1"), "sparse_decode")
    from .triton import sparse_decode_fast
    _FAST = sparse_decode_fast
    return sparse_decode_fast


@on_device_of_first_arg
def _decode_triton(q, cache: SparseLayerCache, scale):
    # Default: the fast kernel (sparse_decode_fast.py, 5-6 launches), 2.3-6x faster than the 5-launch "sort" path on the
    # H200 (bench/NOTES_sparse_decode.md); SALA_SPARSE_DECODE=sort selects the latter (kept: it has no config limits).
    if env_choice("SALA_SPARSE_DECODE", "fast", ("fast", "sort"), "sparse_decode") == "fast":
        FAST = _FAST or _import_fast()
        if FAST.supported(cache.config):
            return FAST.decode(q.contiguous(), cache, scale)
    from .triton import sparse_decode_kernels as K
    cfg = cache.config
    B, H, D = q.shape
    Hkv = cache.num_kv_heads
    q = q.contiguous()
    ws = cache._workspace(H)
    p = ws["p"]
    ks2, st2 = cfg.c2
    o = torch.empty_like(q)
    K._lse_partial_kernel[(B, Hkv, p["S2"])](
        q, cache.c2, cache.lengths, ws["m2"], ws["l2"], q.stride(0), q.stride(1), *cache.c2.stride()[:3],
        scale, D, cfg.dense_len, p["CH2"],
        G=p["G"], KS2=ks2, ST2=st2, S2=p["S2"], BG=p["BG"], BD=p["BD"], BJ=p["BJ"], PREC="ieee", num_warps=4)
    K._score_chunk_kernel[(B, Hkv, p["NCH"])](
        q, cache.c1, cache.lengths, ws["m2"], ws["l2"], ws["pbuf"], ws["cand"], q.stride(0), q.stride(1),
        *cache.c1.stride()[:3], scale, D, cfg.dense_len, p["PW"],
        G=p["G"], KS=cfg.kernel_size, ST=cfg.kernel_stride, BS=cfg.block_size, INIT=cfg.init_blocks,
        WB=cfg.window_size // cfg.block_size, S2=p["S2"], S2P=p["S2P"], CB=p["CB"], KP=p["KP"], W=p["W"],
        BG=p["BG"], BD=p["BD"], BJ=p["BJ"], IEEE=True, num_warps=4)
    K._topk_merge_kernel[(B, Hkv)](
        ws["cand"], cache.lengths, ws["sel"], cfg.dense_len, p["NCH"],
        BS=cfg.block_size, CB=p["CB"], KP=p["KP"], NCHP=p["NCHP"], KSEL=cfg.num_selected, num_warps=4)
    K._attend_kernel[(B, Hkv, p["NSPLIT"])](
        q, cache.k, cache.v, cache.lengths, ws["sel"], o, ws["o_part"], ws["m_part"], ws["l_part"],
        q.stride(0), q.stride(1), *cache.k.stride()[:3], o.stride(0), o.stride(1),
        scale, D, cfg.dense_len, p["NSLOT"], p["SPB"],
        G=p["G"], BS=cfg.block_size, KSEL=cfg.num_selected, NSPLIT=p["NSPLIT"], BG=p["BG"], BD=p["BD"],
        BN=p["BN"], IEEE=q.dtype == torch.float32, num_warps=4)
    if p["NSPLIT"] > 1:
        K._combine_kernel[(B, H)](o, ws["o_part"], ws["m_part"], ws["l_part"], o.stride(0), o.stride(1), D,
                                  NSPLIT=p["NSPLIT"], NSP=p["NSP"], BD=p["BD"], num_warps=4)
    return o, ws["sel"]


def _select_from_cache(qf, c1, c2, L, cfg: SparseConfig, scale):
    """Reference selection for the query at position L - 1 from cached C1 [n1, Hkv, D] / C2: int64
    [Hkv, k_sel] ascending, -1 padded (reference/sparse.py steps 2-5)."""
    H = qf.shape[0]
    Hkv = c1.shape[1]
    G = H // Hkv
    bs, ks, st = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
    wb, ksel = cfg.window_size // bs, cfg.num_selected
    t = L - 1
    qb = t // bs
    nb = qb + 1
    n1 = c1.shape[0]
    j = torch.arange(n1, device=qf.device)
    bidx = torch.arange(nb, device=qf.device)
    touches = (st * j[None, :] < bs * (bidx[:, None] + 1)) & (st * j[None, :] + ks > bs * bidx[:, None])
    out = torch.full((Hkv, ksel), -1, dtype=torch.int64, device=qf.device)
    n_sel = min(ksel, nb)
    for g in range(Hkv):
        qg = qf[g * G:(g + 1) * G]
        if c2.shape[0] > 0:
            lse = torch.logsumexp(qg @ c2[:, g].T * scale, dim=-1)
        else:
            lse = torch.zeros(G, device=qf.device)
        P = torch.exp(qg @ c1[:, g].T * scale - lse[:, None]).sum(0) if n1 > 0 else qf.new_zeros(0)
        score = torch.where(touches, P[None, :], torch.zeros((), device=qf.device)).amax(-1) if n1 > 0 \
            else torch.zeros(nb, device=qf.device)
        forced = (bidx < cfg.init_blocks) | ((bidx >= qb - wb) & (bidx <= qb))
        score = score.masked_fill(forced, float("inf"))
        idx = torch.sort(score, descending=True, stable=True).indices[:n_sel].sort().values
        out[g, :n_sel] = idx
    return out


def _decode_torch(q, cache: SparseLayerCache, scale):
    cfg = cache.config
    B, H, D = q.shape
    Hkv = cache.num_kv_heads
    o = torch.zeros_like(q)
    sel = torch.full((B, Hkv, cfg.num_selected), -1, dtype=torch.int32, device=q.device)
    for b, L in enumerate(cache.lengths_host()):
        if L == 0:
            continue
        kk, vv = cache.k[b, :L], cache.v[b, :L]
        allowed = torch.ones(Hkv, 1, L, dtype=torch.bool, device=q.device)
        if L >= cfg.dense_len:
            c1, c2 = cache.compressed_keys(b)
            idx = _select_from_cache(q[b].float(), c1, c2, L, cfg, scale)
            sel[b] = idx.to(torch.int32)
            nb = (L - 1) // cfg.block_size + 1
            chosen = torch.zeros(Hkv, nb + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(1, torch.where(idx < 0, nb, idx), True)
            allowed = chosen[:, torch.arange(L, device=q.device) // cfg.block_size][:, None, :]
        o[b] = ref._attend(q[b][None], kk, vv, allowed, scale)[0].to(q.dtype)
    return o, sel
