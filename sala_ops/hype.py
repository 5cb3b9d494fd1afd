"""hype_embed: HyPE, MiniCPM-SALA's hybrid positional encoding (spec section 4).

A model states the layer type; HyPE decides the mechanics: lightning layers get per-head RMSNorm
of q and k (when weights are given) then RoPE; sparse layers get no positional encoding (NoPE)
and only the norm, if one is given. The naive math is in reference/rope.py.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _checks as C
from ._dispatch import choose, no_double_backward, on_device_of_first_arg
from ._segments import segment_of
from .reference import rope as ref
from .reference.rope import HYPE_POLICY

LAYER_TYPES = tuple(HYPE_POLICY)


def varlen_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions [total] of a packed batch, each sequence counting from 0, built on the device of
    cu_seqlens without a host synchronisation (same values as reference positions_from_cu_seqlens)."""
    tok = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    cu = cu_seqlens.to(torch.int64)
    seq = segment_of(cu, tok)
    return tok - cu[seq]


def _positions(op, positions, q, cu_seqlens, need_default=True):
    B, T = q.shape[:2]
    if positions is None:
        if cu_seqlens is not None:
            return varlen_positions(cu_seqlens, T)[None]
        return torch.arange(T, device=q.device)[None].expand(B, -1) if need_default else None
    C.tensor(op, "positions", positions, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
    if positions.device != q.device:
        raise ValueError(f"sala_ops.{op}: positions must be on {q.device}, got {positions.device}")
    if positions.dim() == 1:
        positions = positions[None].expand(B, -1)
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"sala_ops.{op}: positions must be [T] or [B, T] = [{B}, {T}], got {tuple(positions.shape)}")
    return positions


def hype_embed(q, k, positions=None, layer_type="lightning", theta=10000.0, rotary_dim=None, q_norm_weight=None,
               k_norm_weight=None, eps=1e-6, cu_seqlens=None):
    """Positional encoding of one SALA layer, applied to q [B, T, H, D] and k [B, T, Hkv, D].

    positions: int [T] or [B, T], any integers (None = 0..T-1, restarting per sequence with
    cu_seqlens). layer_type: "lightning" (RMSNorm then RoPE) or "sparse" (NoPE). rotary_dim (even,
    <= D, None = D) rotates the first rotary_dim dims (rotate-half pairing). q_norm_weight /
    k_norm_weight [D] turn on the per-head RMSNorm. Returns (q, k) in their dtypes; fp32 math.
    """
    op = "hype_embed"
    # a str first: an unhashable layer_type (a list) failed the dict lookup with a bare "unhashable type"
    if not isinstance(layer_type, str) or layer_type not in HYPE_POLICY:
        raise ValueError(f"sala_ops.{op}: layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
    C.tensor(op, "q", q, ndim=4)
    C.tensor(op, "k", k, ndim=4)
    C.same(op, ("q", "k"), (q, k), "dtype")
    C.same(op, ("q", "k"), (q, k), "device")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"sala_ops.{op}: k must be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}], got {tuple(k.shape)}")
    r = D if rotary_dim is None else rotary_dim
    C.positive_int(op, "rotary_dim", r, minimum=2)
    if r % 2 or r > D:
        raise ValueError(f"sala_ops.{op}: rotary_dim must be even and <= head dim {D}, got {r}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ValueError(f"sala_ops.{op}: theta must be a positive number, got {theta!r}")
    # a float from here on: the reference's theta ** tensor took a big int as an int64 (OverflowError)
    theta = C.as_float(op, "theta", theta)
    # the rotary frequencies are theta ** (-2i / rotary_dim), i < rotary_dim / 2: a tiny theta (1e-300) made the
    # largest one overflow to inf and the output NaN
    if -math.log(theta) * (r - 2) / r > 700:  # e**700: about 1e304, the largest frequency that stays finite
        raise ValueError(f"sala_ops.{op}: theta ({theta!r}) is too small: the rotary frequency theta ** "
                         f"(-(rotary_dim - 2) / rotary_dim) overflows (rotary_dim {r})")
    # eps: a negative one made mean(x^2) + eps negative for small rows (NaN returned silently), a NaN one
    # NaN everywhere; a string or None failed with Python's bare TypeError (or float()'s ValueError)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"sala_ops.{op}: eps must be a number, got {type(eps).__name__}")
    if not 0 <= eps < math.inf:
        raise ValueError(f"sala_ops.{op}: eps must be finite and >= 0, got {eps!r}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            C.tensor(op, name, w, ndim=1)
            C.dim_eq(op, name, w, 0, D, "head dim")
            if w.device != q.device:
                raise ValueError(f"sala_ops.{op}: {name} must be on {q.device}, got {w.device}")
    if cu_seqlens is not None:
        C.cu_seqlens(op, cu_seqlens, T, batch=B, device=q.device)
    backend = choose(op, q)
    if backend == "triton":
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            if w is not None and w.dtype not in C.FLOAT_DTYPES:
                raise TypeError(f"sala_ops.{op}: {name} must be a float tensor, got {w.dtype}")
        # the kernels read weight[d] at weight_ptr + d: a strided view (a column of a matrix, w[::2]) gave wrong
        # norms silently; .contiguous() is a no-op for a parameter and keeps the gradient path for a view
        if q_norm_weight is not None:
            q_norm_weight = q_norm_weight.contiguous()
        if k_norm_weight is not None:
            k_norm_weight = k_norm_weight.contiguous()
        rope = HYPE_POLICY[layer_type] == "rope"
        # positions None without cu_seqlens: the kernel counts 0..T-1 itself (nothing to read)
        pos = _positions(op, positions, q, cu_seqlens, need_default=False) if rope else None
        do_q, do_k = rope or q_norm_weight is not None, rope or k_norm_weight is not None
        if not (do_q or do_k):  # NoPE without norms: the identity
            return q, k
        args = (q, k, pos, q_norm_weight, k_norm_weight, float(theta), r, rope, float(eps), do_q, do_k)
        if _eager_ok(q, k, pos, q_norm_weight, k_norm_weight):
            yq, yk = _HypeFn.apply(*args)
        else:
            yq, yk = torch.ops.sala_ops.hype_embed_fwd(*args)
        return (yq if do_q else q), (yk if do_k else k)
    pos = _positions(op, positions, q, cu_seqlens)
    return ref.hype_embed(q, k, pos, layer_type, theta, r, q_norm_weight, k_norm_weight, eps)


# ----------------------------------------------------------------------------------------------------------------
# The Triton path as torch.library custom ops (so torch.compile sees one opaque op, with a fake
# implementation for shapes), with autograd registered on the forward op. A tensor the layer leaves
# alone (do_q / do_k False: a sparse layer with only the other tensor's norm) comes back as an empty
# placeholder and the public function returns the input itself.

_EMPTY = (0,)


@torch.library.custom_op("sala_ops::hype_embed_fwd", mutates_args=())
def _hype_fwd_op(q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor], q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], theta: float, rotary_dim: int, rope: bool, eps: float, do_q: bool,
                 do_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    yq, yk = _fwd_impl(q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k)
    return (yq if do_q else q.new_empty(_EMPTY)), (yk if do_k else k.new_empty(_EMPTY))


@_hype_fwd_op.register_fake
def _(q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device) if do_q else q.new_empty(_EMPTY),
            torch.empty(k.shape, dtype=k.dtype, device=k.device) if do_k else k.new_empty(_EMPTY))


@torch.library.custom_op("sala_ops::hype_embed_bwd", mutates_args=())
def _hype_bwd_op(q: torch.Tensor, k: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor,
                 positions: Optional[torch.Tensor], q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], theta: float, rotary_dim: int, rope: bool, eps: float, do_q: bool,
                 do_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dw): dw the fp32 [2, D] weight grads (row 0 q's, row 1 k's), empty without a norm weight."""
    dq, dk, dw = _bwd_impl(q, k, gq, gk, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k)
    return (dq if do_q else q.new_empty(_EMPTY)), (dk if do_k else k.new_empty(_EMPTY)), \
        (dw if dw is not None else q.new_empty(_EMPTY, dtype=torch.float32))


@_hype_bwd_op.register_fake
def _(q, k, gq, gk, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k):
    D = q.shape[-1]
    norm = (do_q and q_weight is not None) or (do_k and k_weight is not None)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device) if do_q else q.new_empty(_EMPTY),
            torch.empty(k.shape, dtype=k.dtype, device=k.device) if do_k else k.new_empty(_EMPTY),
            q.new_empty((2, D) if norm else _EMPTY, dtype=torch.float32))


@on_device_of_first_arg
def _fwd_impl(q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k):
    from .triton import rope_qknorm as K
    return K.hype_fwd(q, k, positions, q_weight, k_weight, theta=theta, rotary_dim=rotary_dim, rope=rope, eps=eps,
                      do_q=do_q, do_k=do_k)


@on_device_of_first_arg
def _bwd_impl(q, k, gq, gk, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k):
    from .triton import rope_qknorm as K
    return K.hype_bwd(q, k, gq, gk, positions, q_weight, k_weight, theta=theta, rotary_dim=rotary_dim, rope=rope,
                      eps=eps, do_q=do_q, do_k=do_k, stacked_dw=True)


def _setup(ctx, inputs):
    q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k = inputs
    norm = (q_weight is not None and do_q) or (k_weight is not None and do_k)
    # q and k are needed only to recompute the norm statistics
    ctx.save_for_backward(q if norm else None, k if norm else None, positions, q_weight, k_weight)
    ctx.args = (theta, rotary_dim, rope, eps, do_q, do_k)


def _backward(ctx, gyq, gyk, bwd):
    """Shared by the custom op's autograd and the eager autograd.Function; bwd returns (dq, dk, dw [2, D])."""
    q, k, positions, q_weight, k_weight = ctx.saved_tensors
    theta, rotary_dim, rope, eps, do_q, do_k = ctx.args
    if q is None:  # no norm (so RoPE on both): the kernel reads q and k only for their shapes
        q, k = gyq, gyk
    gq = gyq if do_q else q
    gk = gyk if do_k else k
    dq, dk, dw = bwd(q, k, gq, gk, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k)
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq = dq if (do_q and need_q) else None
    dk = dk if (do_k and need_k) else None
    want_q = q_weight is not None and do_q and ctx.needs_input_grad[3]
    want_k = k_weight is not None and do_k and ctx.needs_input_grad[4]
    dwq = dwk = None
    if want_q and want_k and q_weight.dtype == k_weight.dtype:
        dw = dw.to(q_weight.dtype)  # one cast for both rows
        dwq, dwk = dw[0], dw[1]
    else:
        dwq = dw[0].to(q_weight.dtype) if want_q else None
        dwk = dw[1].to(k_weight.dtype) if want_k else None
    dq, dk, dwq, dwk = no_double_backward("hype_embed", (gyq, gyk, q, k, q_weight, k_weight), (dq, dk, dwq, dwk))
    return dq, dk, None, dwq, dwk, None, None, None, None, None, None


def _fwd_setup(ctx, inputs, output):
    _setup(ctx, inputs)


def _fwd_backward(ctx, gyq, gyk):
    return _backward(ctx, gyq, gyk, torch.ops.sala_ops.hype_embed_bwd)


_hype_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


class _HypeFn(torch.autograd.Function):
    """The eager path: the same kernels and the same backward as the custom ops, without the
    torch.library dispatch (custom op + registered autograd cost several hundred microseconds of
    host time per forward+backward, more than the whole GPU work below ~32K tokens)."""

    @staticmethod
    def forward(ctx, q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k):
        yq, yk = _fwd_impl(q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k)
        _setup(ctx, (q, k, positions, q_weight, k_weight, theta, rotary_dim, rope, eps, do_q, do_k))
        return (yq if do_q else q.new_empty(_EMPTY)), (yk if do_k else k.new_empty(_EMPTY))

    @staticmethod
    def backward(ctx, gyq, gyk):
        return _backward(ctx, gyq, gyk, _bwd_impl)


def _eager_ok(*tensors) -> bool:
    """Plain tensors outside torch.compile / functorch transforms: the eager autograd.Function may run
    (anything else goes through the custom ops, which tracing and fake tensors understand)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True
