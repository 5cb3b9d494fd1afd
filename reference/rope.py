"""Naive RoPE, per-head RMSNorm and the HyPE policy, the ground truth for `hype_embed`.

RoPE, rotate-half pairing (dims i and i + r/2 form a pair, r = rotary dim, r even, r <= head dim):

    inv_freq_i = theta^(-2i / r),  angle = pos * inv_freq_i,   i = 0 .. r/2 - 1
    x'_i       = x_i cos(angle) - x_{i+r/2} sin(angle)
    x'_{i+r/2} = x_{i+r/2} cos(angle) + x_i sin(angle)
    dims r .. D-1 pass through unchanged.

Computed in fp32 (the spec: "RoPE ... computed in fp32"), returned in the input dtype.

Per-head RMSNorm (MiniCPM-SALA lightning layers: q_norm, k_norm with weight [D]):
    y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

HyPE (spec section 4): lightning layers get RoPE (after the q/k RMSNorm); sparse layers get no
positional encoding at all (NoPE).
"""
from __future__ import annotations

import torch

# The HyPE policy: which positional encoding each SALA layer type gets.
HYPE_POLICY = {"lightning": "rope", "sparse": "none"}


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0):
    """cos and sin of shape [..., rotary_dim // 2] for integer positions of any shape, in fp32."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64, device=positions.device) * 2 / rotary_dim))
    angle = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, rotary_dim=None):
    """Rotate x [B, T, H, D] by positions [B, T] (or [T]); rotate-half on the first rotary_dim dims."""
    D = x.shape[-1]
    r = D if rotary_dim is None else rotary_dim
    if positions.dim() == 1:
        positions = positions[None].expand(x.shape[0], -1)
    cos, sin = rope_cos_sin(positions, r, theta)  # [B, T, r/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    x1, x2, rest = xf[..., : r // 2], xf[..., r // 2: r], xf[..., r:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight=None, eps: float = 1e-6):
    """RMSNorm over the last dim, statistics in fp32, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def hype_embed(q, k, positions, layer_type="lightning", theta=10000.0, rotary_dim=None,
               q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """Positional encoding of one SALA layer: optional per-head RMSNorm of q and k, then RoPE where
    HyPE wants it (lightning layers) and nothing where it does not (sparse layers)."""
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    if HYPE_POLICY[layer_type] == "rope":
        q = apply_rope(q, positions, theta, rotary_dim)
        k = apply_rope(k, positions, theta, rotary_dim)
    return q, k


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, offsets=None) -> torch.Tensor:
    """Positions [total] of a packed batch: each sequence counts from 0 (or from offsets[n])."""
    pos = torch.empty(total, dtype=torch.int64, device=cu_seqlens.device)
    bounds = cu_seqlens.tolist()
    for n in range(len(bounds) - 1):
        start = 0 if offsets is None else int(offsets[n])
        pos[bounds[n]: bounds[n + 1]] = torch.arange(start, start + bounds[n + 1] - bounds[n])
    return pos
