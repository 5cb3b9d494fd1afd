"""hype_embed: HyPE, MiniCPM-SALA's hybrid positional encoding (spec section 4).

A model states the layer type; HyPE decides the mechanics: lightning layers get per-head RMSNorm
of q and k (when weights are given) then RoPE; sparse layers get no positional encoding (NoPE)
and only the norm, if one is given. The naive math is in reference/rope.py.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._dispatch import choose
from .reference import rope as ref
from .reference.rope import HYPE_POLICY

LAYER_TYPES = tuple(HYPE_POLICY)


def _positions(op, positions, q, cu_seqlens):
    B, T = q.shape[:2]
    if positions is None:
        if cu_seqlens is not None:
            return ref.positions_from_cu_seqlens(cu_seqlens, T)[None]
        return torch.arange(T, device=q.device)[None].expand(B, -1)
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
    if layer_type not in HYPE_POLICY:
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
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            C.tensor(op, name, w, ndim=1)
            C.dim_eq(op, name, w, 0, D, "head dim")
            if w.device != q.device:
                raise ValueError(f"sala_ops.{op}: {name} must be on {q.device}, got {w.device}")
    if cu_seqlens is not None:
        C.cu_seqlens(op, cu_seqlens, T, batch=B, device=q.device)
    pos = _positions(op, positions, q, cu_seqlens)
    backend = choose(op, q)
    if backend == "triton":
        raise NotImplementedError("sala_ops.hype_embed: triton backend not built yet")
    return ref.hype_embed(q, k, pos, layer_type, theta, r, q_norm_weight, k_norm_weight, eps)
