"""Lightning attention decode step: one token per sequence, fp32 state.

    S' = exp(-decay[h]) * S + k^T v,     o = scale * q S'

One program per (V-block, query head, sequence); the state tile [K, BV] is read once and written
once (in place when the output state is the input state). No host synchronisation and no
allocation beyond the outputs, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lightning_step_kernel(q_ptr, k_ptr, v_ptr, s_in_ptr, s_out_ptr, o_ptr, decay_ptr, scale,
                           H, G, DK, DV, sq_b, sk_b, sv_b,
                           BK: tl.constexpr, BV: tl.constexpr):
    # flat program axis (V-block fastest, then head, then sequence): CUDA limits grid axes 1 and 2 to
    # 65535, and a decode batch can pass that
    pid = tl.program_id(0)
    nvb = tl.cdiv(DV, BV)
    i_v = pid % nvb
    hb = pid // nvb
    h = hb % H
    bb = (hb // H).to(tl.int64)
    hk = h // G
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    q = tl.load(q_ptr + bb * sq_b + h * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bb * sk_b + hk * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bb * sv_b + hk * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
    tile = ((bb * H + h) * DK + offs_k[:, None]) * DV + offs_v[None, :]
    msk = mk[:, None] & mv[None, :]
    S = tl.load(s_in_ptr + tile, mask=msk, other=0.0)
    lam = tl.exp(-tl.load(decay_ptr + h).to(tl.float32))
    S = lam * S + k[:, None] * v[None, :]
    o = tl.sum(q[:, None] * S, axis=0) * scale
    tl.store(s_out_ptr + tile, S, mask=msk)
    tl.store(o_ptr + bb * H * DV + h * DV + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def lightning_step(q, k, v, state, decay, scale, out_state=None):
    """q [B,H,K], k [B,Hkv,K], v [B,Hkv,V] (last dim contiguous), state [B,H,K,V] fp32 contiguous.
    Writes the new state into `out_state` (may be `state` itself: in place) or a new tensor.
    Returns (o [B,H,V] in q.dtype, new_state)."""
    B, H, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    q, k, v = (x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous() for x in (q, k, v))
    # the kernel reads decay[h] at decay_ptr + h: a strided (or expanded, stride 0) view would be read
    # wrongly, and past its storage
    decay = decay.contiguous()
    if out_state is None:
        out_state = torch.empty_like(state)
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(32, max(16, triton.next_power_of_2(V)))
    grid = (triton.cdiv(V, BV) * H * B,)  # flat: see the kernel
    _lightning_step_kernel[grid](q, k, v, state, out_state, o, decay, float(scale), H, H // Hkv, K, V,
                                 q.stride(0), k.stride(0), v.stride(0), BK=BK, BV=BV, num_warps=4)
    return o, out_state
