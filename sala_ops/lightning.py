"""lightning_attention: MiniCPM-SALA's linear layers (constant per-head decay, no normaliser).

    S_t = exp(-decay_h) * S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t      (state fp32)

`lightning_attention` is the chunked training/prefill op; `lightning_attention_step` is the decode
form (one token per sequence). The math, in its naive form, is in reference/lightning.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _checks as C
from . import _dispatch
from ._dispatch import choose, no_autocast, on_device_of_first_arg
from .reference import lightning as ref
from .reference.lightning import sala_decay_slopes, minimax_decay_slopes  # noqa: F401  (public helpers)


class LightningOutput(NamedTuple):
    """`out.output` [B, T, H, V] in q's dtype; `out.final_state` [N, H, K, V] fp32 or None.
    Unpacks like fla's `(o, final_state)`."""
    output: torch.Tensor
    final_state: Optional[torch.Tensor]


def _check_decay(op, decay, H, device):
    C.tensor(op, "decay", decay, ndim=1)
    C.dim_eq(op, "decay", decay, 0, H, "one rate per query head")
    if decay.device != device:
        raise ValueError(f"sala_ops.{op}: decay must be on {device}, got {decay.device}")


def _refuse_decay_grad(op, decay):
    """decay gets no gradient (a fixed schedule: MiniCPM-SALA's slopes): the Triton backend returned None for it
    while the reference backend differentiated it, so a learnable decay trained on the CPU and silently froze on
    the GPU. Both backends refuse a decay that requires grad under autograd."""
    if decay.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"sala_ops.{op}: decay requires grad, but the decay rates get no gradient (a fixed "
                         f"schedule); pass decay.detach(), or call under torch.no_grad()")


def _check_state(op, name, state, N, H, K, V, device):
    C.tensor(op, name, state, ndim=4, dtypes=(torch.float32,))
    if tuple(state.shape) != (N, H, K, V):
        raise ValueError(f"sala_ops.{op}: {name} must have shape {(N, H, K, V)} (sequences, heads, K, V), "
                         f"got {tuple(state.shape)}")
    if state.device != device:
        raise ValueError(f"sala_ops.{op}: {name} must be on {device}, got {state.device}")


def check_lightning_args(op, q, k, v, decay, scale, initial_state, cu_seqlens):
    for name, x in (("q", q), ("k", k), ("v", v)):
        C.tensor(op, name, x, ndim=4)
    C.same(op, ("q", "k", "v"), (q, k, v), "dtype")
    C.same(op, ("q", "k", "v"), (q, k, v), "device")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"sala_ops.{op}: q must hold at least one token, got sequence length {T}")
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"sala_ops.{op}: q, k, v must share [batch, seq], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    C.dim_eq(op, "k", k, 3, K, "head dim of q")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"sala_ops.{op}: k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    C.gqa(op, H, k.shape[2])
    _check_decay(op, decay, H, q.device)
    _refuse_decay_grad(op, decay)
    scale = C.scale_arg(op, scale, K)
    N = B
    if cu_seqlens is not None:
        C.cu_seqlens(op, cu_seqlens, T, batch=B, device=q.device)
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state(op, "initial_state", initial_state, N, H, K, v.shape[-1], q.device)
    return scale


def lightning_attention(q, k, v, decay, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None) -> LightningOutput:
    """Chunked lightning attention.

    q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V] (Hkv divides H); decay [H] fp32 rates
    s_h >= 0 (the state is multiplied by exp(-s_h) per token; `sala_decay_slopes(H)` gives
    MiniCPM-SALA's); scale None = 1/sqrt(K); initial_state [N, H, K, V] fp32 (N = B, or the number
    of sequences with cu_seqlens); cu_seqlens int32/int64 [N+1] with B = 1 for packed sequences.
    Returns LightningOutput(output, final_state).
    """
    op = "lightning_attention"
    scale = check_lightning_args(op, q, k, v, decay, scale, initial_state, cu_seqlens)
    backend = choose(op, q)
    if backend == "triton":
        o, final = _LightningChunkFn.apply(q, k, v, decay, scale, initial_state, bool(output_final_state),
                                           cu_seqlens)
        return LightningOutput(o, final if output_final_state else None)
    with no_autocast(q):
        o, final = ref.lightning_parallel(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    return LightningOutput(o, final)


class _StepEntry:
    """What the checks of a validated lightning_attention_step call signature derived (see _step_signature)."""
    __slots__ = ("scale", "squeeze", "o_shape", "o_like_q", "state_contig", "decay_ready", "plan")

    def __init__(self, q, v, state, decay, scale, squeeze):
        self.scale, self.squeeze = scale, squeeze
        B, H = q.shape[0], q.shape[-2]
        self.o_shape = (B, 1, H, v.shape[-1]) if squeeze else (B, H, v.shape[-1])
        # the kernel writes o contiguous: empty_like(q) is that (and cheaper than new_empty) for a contiguous q
        self.o_like_q = tuple(q.shape) == self.o_shape and q.is_contiguous()
        self.state_contig = state.is_contiguous()
        # the kernel reads decay[h] at decay_ptr + h, in fp32
        self.decay_ready = decay.dtype == torch.float32 and decay.is_contiguous()
        self.plan = None  # the triton launch plan, made on the first triton call


# Call signatures (everything the argument checks look at) that passed every check once, so a call
# with the same signature skips them. Bounded: cleared when full.
_step_sigs: dict = {}
_STEP_SIGS_MAX = 256


def _step_signature(q, k, v, state, decay, scale, inplace):
    """Types, shapes (so ndim), strides (so contiguity), dtypes and devices of the five tensors, plus scale
    (value and type) and inplace. Raises AttributeError for a non-tensor (the checks then explain)."""
    return (type(q), q.shape, q.stride(), q.dtype, q.device, type(k), k.shape, k.stride(), k.dtype, k.device,
            type(v), v.shape, v.stride(), v.dtype, v.device,
            type(state), state.shape, state.stride(), state.dtype, state.device,
            type(decay), decay.shape, decay.stride(), decay.dtype, decay.device, scale, type(scale), inplace)


def _check_step(op, q, k, v, state, decay, scale):
    """All argument checks of lightning_attention_step; returns (scale, squeeze)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        C.tensor(op, name, x, ndim=(3, 4))
    squeeze = False
    if q.dim() == 4:
        if q.shape[1] != 1 or k.dim() != 4 or v.dim() != 4 or k.shape[1] != 1 or v.shape[1] != 1:
            raise ValueError(f"sala_ops.{op}: 4-D q, k, v must have sequence length 1, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        q, k, v, squeeze = q[:, 0], k[:, 0], v[:, 0], True
    if k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"sala_ops.{op}: k and v must be [B, Hkv, D] like q, got {tuple(k.shape)}, {tuple(v.shape)}")
    C.same(op, ("q", "k", "v"), (q, k, v), "dtype")
    C.same(op, ("q", "k", "v"), (q, k, v), "device")
    B, H, K = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[2] != K or v.shape[1] != k.shape[1]:
        raise ValueError(f"sala_ops.{op}: expected k [B, Hkv, {K}] and v [B, Hkv, V] with B = {B}, got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    C.gqa(op, H, k.shape[1])
    _check_decay(op, decay, H, q.device)
    _check_state(op, "state", state, B, H, K, v.shape[-1], q.device)
    return C.scale_arg(op, scale, K), squeeze


def lightning_attention_step(q, k, v, state, decay, scale=None, inplace=False):
    """Decode step: one new token per sequence. q [B, H, K] (or [B, 1, H, K]), k/v [B, Hkv, *],
    state [B, H, K, V] fp32. Returns (o like q but with V, new_state); with inplace=True the new
    state is written into `state` and returned.

    Host cost: a call whose signature (types, shapes, strides, dtypes, devices of the tensors, scale,
    inplace) matches one that passed every check before skips the checks and reuses the launch
    constants (bench/bench_host_overhead.py)."""
    op = "lightning_attention_step"
    if torch.compiler.is_compiling():
        return _step_compiled(op, q, k, v, state, decay, scale, inplace)
    try:
        sig = _step_signature(q, k, v, state, decay, scale, inplace)
        e = _step_sigs.get(sig)
    except Exception:  # a non-tensor, an unhashable argument, a tensor without strides: the checks say what is wrong
        sig = e = None
    if e is None:
        scale_, squeeze = _check_step(op, q, k, v, state, decay, scale)
        e = _StepEntry(q, v, state, decay, scale_, squeeze)
        if sig is not None:
            if len(_step_sigs) >= _STEP_SIGS_MAX:
                _step_sigs.clear()
            _step_sigs[sig] = e
    if decay.requires_grad:  # (not part of the cached signature)
        _refuse_decay_grad(op, decay)
    if choose(op, q) == "triton":
        if _step_needs_autograd(q, k, v, state):
            return _step_autograd(q, k, v, state, decay, inplace, e.scale, e.squeeze)
        with _dispatch.device_of(q, "lightning_attention_step"):
            return _step_triton(q, k, v, state, decay, inplace, e)
    if e.squeeze:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    with no_autocast(q):
        o, new_state = ref.lightning_step(q, k, v, state, decay, e.scale)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return (o[:, None] if e.squeeze else o), new_state


def _step_triton(q, k, v, state, decay, inplace, e):
    """The eager Triton step (lightning_attention_step's hot path), on q's device."""
    LS = _LS or _import_step()
    p = e.plan
    if p is None:
        p = e.plan = LS.plan(q, k, v)
    if not e.decay_ready:
        decay = decay.float().contiguous()
    o = torch.empty_like(q) if e.o_like_q else q.new_empty(e.o_shape)
    if inplace and e.state_contig:
        LS.launch(p, q, k, v, state, state, o, decay, e.scale)
        return o, state
    s_in = state if e.state_contig else state.contiguous()
    new_state = torch.empty_like(s_in)
    LS.launch(p, q, k, v, s_in, new_state, o, decay, e.scale)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return o, new_state


def _step_needs_autograd(q, k, v, state) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or state.requires_grad)


def _step_autograd(q, k, v, state, decay, inplace, scale, squeeze):
    """The step under autograd on the Triton backend: the step kernel has no backward (its output would come back
    detached, the gradients lost without a word), so the token runs through the differentiable chunk op, a
    one-token sequence starting from `state`."""
    if not squeeze:
        q, k, v = q[:, None], k[:, None], v[:, None]
    o, new_state = _LightningChunkFn.apply(q, k, v, decay, scale, state, True, None)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return (o if squeeze else o[:, 0]), new_state


_LS = None


def _import_step():
    """sala_ops.triton.lightning_step, imported on first use (importing triton is not free)."""
    global _LS
    from .triton import lightning_step
    _LS = lightning_step
    return lightning_step


def _step_compiled(op, q, k, v, state, decay, scale, inplace):
    """lightning_attention_step under torch.compile: full checks, the custom ops (traceable)."""
    scale, squeeze = _check_step(op, q, k, v, state, decay, scale)
    _refuse_decay_grad(op, decay)
    if squeeze:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    if choose(op, q) == "triton":
        if _step_needs_autograd(q, k, v, state):
            o, new_state = _step_autograd(q, k, v, state, decay, inplace, scale, False)  # q, k, v: [B, H, D] here
            return (o[:, None] if squeeze else o), new_state
        if inplace:
            o = torch.ops.sala_ops.lightning_step_inplace(q, k, v, state, decay, scale)
            new_state = state
        else:
            o, new_state = torch.ops.sala_ops.lightning_step(q, k, v, state, decay, scale)
        return (o[:, None] if squeeze else o), new_state
    with no_autocast(q):
        o, new_state = ref.lightning_step(q, k, v, state, decay, scale)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return (o[:, None] if squeeze else o), new_state


# --------------------------------------------------------------------------------------------------
# Triton backend: torch.library custom ops (with fake implementations, so torch.compile(fullgraph=True)
# traces through them) and the autograd.Function that ties forward and backward together.
# `decay` gets no gradient: it is a fixed schedule (MiniCPM-SALA's ALiBi slopes), not a parameter.

_EMPTY = (0,)


@on_device_of_first_arg
def _chunk_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, scale: float,
                            initial_state: Optional[torch.Tensor], output_final_state: bool,
                            cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.lightning_chunk import lightning_chunk_fwd
    o, final, states = lightning_chunk_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    if final is None:
        final = q.new_empty(_EMPTY, dtype=torch.float32)
    return o, final, states


_lightning_chunk_fwd_op = torch.library.custom_op("sala_ops::lightning_chunk_fwd", mutates_args=())(_chunk_fwd_impl)


@_lightning_chunk_fwd_op.register_fake
def _(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    from .triton.lightning_chunk import num_chunks
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    NS = num_chunks(B, T, H, V, N, cu_seqlens is not None)
    final = q.new_empty((N, H, K, V) if output_final_state else _EMPTY, dtype=torch.float32)
    return q.new_empty(B, T, H, V), final, q.new_empty(NS, H, K, V, dtype=torch.float32)


@on_device_of_first_arg
def _chunk_bwd_impl(do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, decay: torch.Tensor, states: torch.Tensor, scale: float, need_dh0: bool,
                            cu_seqlens: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.lightning_chunk import lightning_chunk_bwd
    dq, dk, dv, dh0 = lightning_chunk_bwd(do, dfinal, q, k, v, decay, states, scale, need_dh0, cu_seqlens)
    if dh0 is None:
        dh0 = q.new_empty(_EMPTY, dtype=torch.float32)
    return dq, dk, dv, dh0


_lightning_chunk_bwd_op = torch.library.custom_op("sala_ops::lightning_chunk_bwd", mutates_args=())(_chunk_bwd_impl)


@_lightning_chunk_bwd_op.register_fake
def _(do, dfinal, q, k, v, decay, states, scale, need_dh0, cu_seqlens):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh0 = q.new_empty((N, H, K, V) if need_dh0 else _EMPTY, dtype=torch.float32)
    # contiguous, as the kernels write them (empty_like would copy the strides of a strided q / k / v)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dh0


class _LightningChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
        if torch.compiler.is_compiling():
            o, final, states = torch.ops.sala_ops.lightning_chunk_fwd(q, k, v, decay, scale, initial_state,
                                                                     output_final_state, cu_seqlens)
        else:
            o, final, states = _chunk_fwd_impl(q, k, v, decay, scale, initial_state, output_final_state,
                                               cu_seqlens)
        ctx.save_for_backward(q, k, v, decay, states, cu_seqlens)
        ctx.scale = scale
        ctx.has_init = initial_state is not None
        ctx.output_final_state = output_final_state
        ctx.mark_non_differentiable(states)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, decay, states, cu_seqlens = ctx.saved_tensors
        if not ctx.output_final_state:
            dfinal = None
        need_dh0 = ctx.has_init and ctx.needs_input_grad[5]
        fn = (torch.ops.sala_ops.lightning_chunk_bwd if torch.compiler.is_compiling()
              else _chunk_bwd_impl)
        dq, dk, dv, dh0 = fn(do, dfinal, q, k, v, decay, states, ctx.scale, need_dh0, cu_seqlens)
        dq, dk, dv, dh0 = _dispatch.no_double_backward("lightning_attention", (do, dfinal, q, k, v),
                                                       (dq, dk, dv, dh0 if need_dh0 else None))
        return dq, dk, dv, None, None, dh0, None, None


@torch.library.custom_op("sala_ops::lightning_step", mutates_args=())
@on_device_of_first_arg
def _lightning_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, decay: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.lightning_step import lightning_step
    return lightning_step(q, k, v, state.contiguous(), decay.float(), scale)


@_lightning_step_op.register_fake
def _(q, k, v, state, decay, scale):
    # the new state is contiguous whatever the strides of `state` (the kernel writes a contiguous copy)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), state.new_empty(state.shape)


@torch.library.custom_op("sala_ops::lightning_step_inplace", mutates_args=("state",))
@on_device_of_first_arg
def _lightning_step_inplace_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                               decay: torch.Tensor, scale: float) -> torch.Tensor:
    from .triton.lightning_step import lightning_step
    if state.is_contiguous():
        return lightning_step(q, k, v, state, decay.float(), scale, out_state=state)[0]
    o, new_state = lightning_step(q, k, v, state.contiguous(), decay.float(), scale)
    state.copy_(new_state)
    return o


@_lightning_step_inplace_op.register_fake
def _(q, k, v, state, decay, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
