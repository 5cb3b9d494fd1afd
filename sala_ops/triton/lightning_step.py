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

from ._launch import launch as _launch


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


class StepPlan:
    """Launch constants of one decode-step call shape (B, H, Hkv, K, V, q/k/v layout): everything
    lightning_step derives from the tensors' metadata, computed once per shape (see plan())."""
    __slots__ = ("B", "H", "K", "V", "fix_q", "fix_k", "fix_v", "sq", "sk", "sv", "G", "grid", "constexprs")

    def __init__(self, q, k, v):
        B, H, K = q.shape[0], q.shape[-2], q.shape[-1]
        Hkv, V = k.shape[-2], v.shape[-1]
        self.B, self.H, self.K, self.V = B, H, K, V
        # the kernel reads rows [H, D] at x_ptr + b * stride(0) + h * D + d: the last two dims must be dense
        self.fix_q, self.fix_k, self.fix_v = (not (x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]) for x in (q, k, v))
        self.sq, self.sk, self.sv = ((x.contiguous() if fix else x).stride(0)
                                     for x, fix in ((q, self.fix_q), (k, self.fix_k), (v, self.fix_v)))
        self.G = H // Hkv
        BK = max(16, triton.next_power_of_2(K))
        BV = min(32, max(16, triton.next_power_of_2(V)))
        self.grid = (triton.cdiv(V, BV) * H * B,)  # flat: see the kernel
        self.constexprs = dict(BK=BK, BV=BV, num_warps=4)


_plans: dict = {}


def plan(q, k, v) -> StepPlan:
    """The StepPlan of (q, k, v) ([B, H, K] / [B, Hkv, K] / [B, Hkv, V], or [B, 1, ...]), cached by
    shape and strides (the only things it depends on)."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride())
    p = _plans.get(key)
    if p is None:
        if len(_plans) >= 256:
            _plans.clear()
        p = _plans[key] = StepPlan(q, k, v)
    return p


def launch(p: StepPlan, q, k, v, state, out_state, o, decay, scale):
    """One step with plan `p`: state (fp32, contiguous) -> out_state (may be state), o [B, H, V]
    contiguous (or [B, 1, H, V]); decay fp32 contiguous [H]; scale a float."""
    if p.fix_q:
        q = q.contiguous()
    if p.fix_k:
        k = k.contiguous()
    if p.fix_v:
        v = v.contiguous()
    _launch(_lightning_step_kernel, p.grid, (q, k, v, state, out_state, o, decay),
            (scale, p.H, p.G, p.K, p.V, p.sq, p.sk, p.sv), p.constexprs)


def lightning_step(q, k, v, state, decay, scale, out_state=None):
    """q [B,H,K], k [B,Hkv,K], v [B,Hkv,V] (last dim contiguous), state [B,H,K,V] fp32 contiguous.
    Writes the new state into `out_state` (may be `state` itself: in place) or a new tensor.
    Returns (o [B,H,V] in q.dtype, new_state)."""
    p = plan(q, k, v)
    # the kernel reads decay[h] at decay_ptr + h: a strided (or expanded, stride 0) view would be read
    # wrongly, and past its storage
    decay = decay.contiguous()
    if out_state is None:
        out_state = torch.empty_like(state)
    o = q.new_empty((p.B, p.H, p.V))
    launch(p, q, k, v, state, out_state, o, decay, float(scale))
    return o, out_state
