"""Naive lightning attention (constant per-head decay linear attention), the ground truth.

MiniCPM-SALA's linear layers (spec section 3). For every head h with decay rate s_h >= 0 and
lambda_h = exp(-s_h), starting from S_{-1} = S0 (zero unless an initial state is given):

    S_t = lambda_h * S_{t-1} + k_t^T v_t            (state: [K, V], fp32)
    o_t = scale * q_t S_t

No normaliser, no feature map. Unrolled, the same thing is the quadratic "parallel" form

    o_t = scale * ( sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s  +  lambda^(t+1) q_t S0 )
    S_T-1 = sum_s lambda^(T-1-s) k_s^T v_s + lambda^T S0

Layout [batch, seq, heads, dim]. K/V may have fewer heads than Q (GQA): query head h reads K/V
head h // (H / H_kv); the state is kept per query head because the decay is per query head.
With `cu_seqlens` the batch dimension is 1 and sequences are packed back to back; every
sequence starts from its own initial state (row n of `initial_state`).

Everything is computed in fp32 and cast back to q's dtype; the state stays fp32.
"""
from __future__ import annotations

import math
import numbers

import torch


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat K/V heads so head h of the result is head h // group of the input."""
    group = num_q_heads // x.shape[-2]
    return x.repeat_interleave(group, dim=-2) if group > 1 else x


def _segments(T: int, batch: int, cu_seqlens):
    """(batch row, start, end) of every sequence: the rows of a padded batch or the packed ranges."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(batch)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def lightning_recurrent(q, k, v, decay, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Token-by-token recurrence. Returns (o [B,T,H,V] in q.dtype, final_state [N,H,K,V] fp32 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    qf = q.float()
    kf = _expand_kv(k.float(), H)
    vf = _expand_kv(v.float(), H)
    lam = torch.exp(-decay.float().to(q.device))  # [H]
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    segs = _segments(T, B, cu_seqlens)
    finals = []
    for n, (b, start, end) in enumerate(segs):
        if initial_state is None:
            S = torch.zeros(H, K, V, dtype=torch.float32, device=q.device)
        else:
            S = initial_state[n].float().clone()
        for t in range(start, end):
            S = lam[:, None, None] * S + kf[b, t][:, :, None] * vf[b, t][:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", qf[b, t], S)
        finals.append(S)
    final = _stack_states(finals, H, K, V, q.device) if output_final_state else None
    return o.to(q.dtype), final


def _stack_states(finals, H, K, V, device):
    """[N, H, K, V] fp32 from the per-sequence states; [0, H, K, V] for an empty batch (torch.stack refuses [])."""
    return torch.stack(finals) if finals else torch.zeros(0, H, K, V, dtype=torch.float32, device=device)


def lightning_parallel(q, k, v, decay, scale=None, initial_state=None, output_final_state=False,
                       cu_seqlens=None):
    """The same function in quadratic form: a decay-weighted causal mask on q k^T (see module doc)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    qf = q.float()
    kf = _expand_kv(k.float(), H)
    vf = _expand_kv(v.float(), H)
    s = decay.float().to(q.device)  # [H]
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(_segments(T, B, cu_seqlens)):
        L = end - start
        qs, ks, vs = qf[b, start:end], kf[b, start:end], vf[b, start:end]  # [L,H,*]
        pos = torch.arange(L, device=q.device, dtype=torch.float32)
        diff = pos[:, None] - pos[None, :]  # t - s
        causal = diff >= 0
        # decay^(t-s) on and below the diagonal, 0 above it; exponent clamped so exp never sees +inf
        weight = torch.where(causal[None], torch.exp(-s[:, None, None] * diff.clamp(min=0)[None]),
                             torch.zeros((), device=q.device))  # [H,L,L]
        scores = torch.einsum("thk,shk->hts", qs, ks) * weight
        out = torch.einsum("hts,shv->thv", scores, vs)
        S0 = None if initial_state is None else initial_state[n].float()
        if S0 is not None:
            lam_t = torch.exp(-s[None, :] * (pos[:, None] + 1))  # [L,H]: lambda^(t+1)
            out = out + lam_t[:, :, None] * torch.einsum("thk,hkv->thv", qs, S0)
        o[b, start:end] = scale * out
        if output_final_state:
            w_end = torch.exp(-s[None, :] * (L - 1 - pos[:, None]))  # [L,H]: lambda^(L-1-s)
            S = torch.einsum("sh,shk,shv->hkv", w_end, ks, vs)
            if S0 is not None:
                S = S + torch.exp(-s * L)[:, None, None] * S0
            finals.append(S)
    final = _stack_states(finals, H, K, V, q.device) if output_final_state else None
    return o.to(q.dtype), final


def lightning_step(q, k, v, state, decay, scale=None):
    """One decode step for B sequences: q [B,H,K], k [B,Hkv,K], v [B,Hkv,V], state [B,H,K,V] fp32.

    Returns (o [B,H,V] in q.dtype, new_state fp32). The input state is not modified.
    """
    H, K = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    kf = _expand_kv(k.float(), H)
    vf = _expand_kv(v.float(), H)
    lam = torch.exp(-decay.float().to(q.device))
    S = lam[None, :, None, None] * state.float() + kf[..., :, None] * vf[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q.float(), S)
    return o.to(q.dtype), S


def _int_arg(op: str, name: str, value, minimum: int, below=None) -> int:
    """An int argument in [minimum, below): a float head count (2.5) silently gave a schedule of the wrong length,
    0 an empty one, a negative count or a string a bare torch error; a layer index past the last layer made
    minimax_decay_slopes' rates negative (a state growing every token)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"sala_ops.{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum or (below is not None and value >= below):
        where = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
        raise ValueError(f"sala_ops.{op}: {name} must be {where}, got {value}")
    return int(value)


def sala_decay_slopes(num_heads: int) -> torch.Tensor:
    """MiniCPM-SALA's per-head decay rates: the ALiBi schedule s_h = 2^(-8(h+1)/H), h = 0..H-1."""
    num_heads = _int_arg("sala_decay_slopes", "num_heads", num_heads, 1)
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (h + 1) / num_heads).float()


def minimax_decay_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """MiniMax-01's layer-scaled schedule: the ALiBi slopes times (1 - l/(L-1) + 1e-5)."""
    op = "minimax_decay_slopes"
    num_heads = _int_arg(op, "num_heads", num_heads, 1)
    num_layers = _int_arg(op, "num_layers", num_layers, 1)
    layer_idx = _int_arg(op, "layer_idx", layer_idx, 0, below=num_layers)
    factor = 1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5
    return sala_decay_slopes(num_heads) * factor
