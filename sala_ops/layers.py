"""The two SALA token mixers as nn.Modules (spec sections 2 and 3), built on the public ops.

    SparseMixer     InfLLM-V2 layer ("minicpm4"): q/k/v/o + o_gate, GQA, NoPE, no QK-norm,
                    o_proj(attn * sigmoid(o_gate(u))); dense causal attention below dense_len keys.
    LightningMixer  lightning layer ("lightning-attn"): q/k/v/o/z, H heads with K/V not shared,
                    per-head q_norm/k_norm then RoPE (hype_embed), decay sala_decay_slopes(H),
                    scale 1/sqrt(d), o_proj(o_norm(o) * sigmoid(z_proj(u))), o_norm over the whole width.

Both take the normed layer input u [B, T, hidden] and return (output [B, T, hidden], None), the
calling convention of Hugging Face attention modules, so they drop into a decoder layer's
`self_attn` slot. Parameter names are those of the released 9B checkpoint (spec section 5).

Prefill and training run the chunked ops over the whole input. With a `SalaCache` (sala_ops.cache)
the sparse layer works on the layer's `SparseLayerCache` (sala_ops.sparse_decode): a chunk of T > 1
tokens goes through `sparse_prefill` (K/V and compressed keys appended, then sparse_attention of the
new queries bottom-right aligned over every cached key, as one pass would), one token per sequence
through `sparse_decode_step` (selection from the incrementally kept compressed keys + attention over
the selected blocks: the decode kernel on CUDA, no recompression of the prefix); the lightning layer
continues from the cached fp32 state (`lightning_attention_step` for one token,
`lightning_attention(initial_state=...)` for a chunk).

Limits, stated rather than hidden: no padding inside a batch (a padded `attention_mask` is refused
by the converted model; see sala_ops.convert), so batched generation needs equal-length prompts;
packed sequences are supported through `cu_seqlens` (or HF's `cu_seq_lens_q`) without a cache.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
from torch import nn

from . import _checks as C
from .hype import hype_embed
from .lightning import lightning_attention, lightning_attention_step, sala_decay_slopes
from .sparse import SparseConfig, sparse_attention

MIXER_SPARSE = "minicpm4"           # the 9B config's name for a sparse (InfLLM-V2) layer
MIXER_LIGHTNING = "lightning-attn"  # ... and for a lightning layer
MIXER_TYPES = (MIXER_SPARSE, MIXER_LIGHTNING)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _size(op, name, value, minimum=1):
    """A layer size as an int >= minimum (C.positive_int, with numpy / 0-d tensor integers taken as ints through
    operator.index): a zero size built a layer that failed with a bare ZeroDivisionError or returned zeros silently,
    a float one failed in nn.Linear (or, for rotary_dim, was truncated by int())."""
    if not isinstance(value, (bool, int)):
        try:
            value = operator.index(value)
        except TypeError:
            pass  # positive_int names the type
    return C.positive_int(op, name, value, minimum)


def _check_hidden(op, u, hidden_size):
    """hidden_states: a float tensor [B, T, hidden_size] with T >= 1 (a 2-D input failed with a bare 'not enough
    values to unpack', a wrong width inside nn.Linear, a list with an AttributeError). Its dtype may differ from the
    weights' (torch.autocast)."""
    C.tensor(op, "hidden_states", u, ndim=3)
    if u.shape[-1] != hidden_size:
        raise ValueError(f"sala_ops.{op}: hidden_states must be [batch, seq, hidden_size={hidden_size}], "
                         f"got shape {tuple(u.shape)}")
    if u.shape[1] < 1:
        raise ValueError(f"sala_ops.{op}: hidden_states must hold at least one token, got shape {tuple(u.shape)}")


def _cache_arg(kwargs):
    """The cache object under either of the names transformers 5.x has used (`cache` from 5.2x,
    `past_key_values` before)."""
    cache = kwargs.pop("cache", None)
    pkv = kwargs.pop("past_key_values", None)
    return cache if cache is not None else pkv


def _cache_or_packing(kwargs, B, layer_idx, kind, op):
    """(this layer's SalaCache entry or None, cu_seqlens or None) from a mixer's keyword arguments:
    a cache and packed sequences exclude each other."""
    cache = _cache_arg(kwargs)
    cu = _cu_seqlens_arg(kwargs, B, op)
    layer_cache = _sala_cache_layer(cache, layer_idx, kind, op)
    if cu is not None and layer_cache is not None:
        raise ValueError(f"sala_ops.{op}: packed sequences (cu_seqlens) cannot be combined with a cache")
    return layer_cache, cu


def _sala_cache_layer(cache, layer_idx, kind, op):
    """The per-layer entry of a SalaCache, or a clear error for any other cache class."""
    if cache is None:
        return None
    from .cache import SalaCache
    if not isinstance(cache, SalaCache):
        raise TypeError(f"sala_ops.{op}: the cache must be a sala_ops.cache.SalaCache (it holds K/V for sparse "
                        f"layers and the fp32 state for lightning layers), got {type(cache).__name__}. Converted "
                        f"models create one themselves when use_cache=True; pass SalaCache(model.config) to reuse one.")
    if layer_idx is None:
        raise ValueError(f"sala_ops.{op}: layer_idx must be set to use a cache")
    return cache.layer(layer_idx, kind)


def _cu_seqlens_arg(kwargs, B, op):
    cu = kwargs.pop("cu_seqlens", None)
    if cu is None:
        cu = kwargs.get("cu_seq_lens_q", None)  # what HF's packing collator passes down
    if cu is not None and B != 1:
        raise ValueError(f"sala_ops.{op}: packed sequences (cu_seqlens) need batch size 1, got {B}")
    return cu


def _check_position_ids(op, position_ids, B, T):
    """position_ids: None or integer positions [T], [1, T] or [B, T] (a list failed with an AttributeError, a 3-D
    tensor in expand, a wrong length in hype_embed, naming its own `positions`)."""
    if position_ids is None:
        return
    C.tensor(op, "position_ids", position_ids, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
    if position_ids.shape[-1] != T or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
        raise ValueError(f"sala_ops.{op}: position_ids must be [T], [1, T] or [B, T] with B = {B}, T = {T} (the "
                         f"hidden_states' batch and length), got shape {tuple(position_ids.shape)}")


def _positions(position_ids, B, T, offset, device):
    if position_ids is None:
        return torch.arange(offset, offset + T, device=device)[None].expand(B, -1)
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.shape[0] == 1 and B > 1:
        position_ids = position_ids.expand(B, -1)
    return position_ids


class SparseMixer(nn.Module):
    """InfLLM-V2 sparse attention layer (spec section 2).

    Projections q: hidden -> H*D, k, v: hidden -> Hkv*D (GQA), o: H*D -> hidden, o_gate: hidden -> H*D.
    No positional encoding (NoPE) and no QK-norm. Dense causal softmax below `sparse_config.dense_len`
    keys, InfLLM-V2 from there on (both inside `sparse_attention`).
    """

    mixer_type = MIXER_SPARSE

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sparse_config: Optional[SparseConfig] = None, layer_idx: Optional[int] = None,
                 qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        op = "SparseMixer"
        hidden_size, num_heads, num_kv_heads, head_dim = (_size(op, n, x) for n, x in (
            ("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        if num_heads % num_kv_heads:
            raise ValueError(f"sala_ops.SparseMixer: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if sparse_config is not None and not isinstance(sparse_config, SparseConfig):
            raise TypeError(f"sala_ops.SparseMixer: sparse_config must be a SparseConfig or None, "
                            f"got {type(sparse_config).__name__}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.sparse_config = (sparse_config or SparseConfig()).check("SparseMixer")
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.o_gate = nn.Linear(hidden_size, num_heads * head_dim, bias=False)

    def qkv(self, u):
        """The layer's q [B,T,H,D], k, v [B,T,Hkv,D] (NoPE: no positional encoding is applied)."""
        B, T, _ = u.shape
        q = self.q_proj(u).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(u).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, hidden_states, position_ids=None, attention_mask=None, **kwargs):
        """hidden_states u [B, T, hidden] -> (out [B, T, hidden], None). `attention_mask` is ignored:
        the converted model refuses padded masks before any layer runs (causality is built in)."""
        op = "SparseMixer"
        u = hidden_states
        _check_hidden(op, u, self.hidden_size)
        B, T, _ = u.shape
        layer_cache, cu = _cache_or_packing(kwargs, B, self.layer_idx, self.mixer_type, op)
        q, k, v = self.qkv(u)
        if layer_cache is not None:
            # prefill: sparse_attention over every cached key (q bottom-right aligned); decode: sparse_decode
            attn = layer_cache.attend(q, k, v, self.sparse_config)
        else:
            attn = sparse_attention(q, k, v, cu_seqlens=cu, config=self.sparse_config)
        gate = torch.sigmoid(self.o_gate(u))
        out = self.o_proj(attn.reshape(B, T, -1) * gate)
        return out, None

    def extra_repr(self):
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layer_idx={self.layer_idx}, {self.sparse_config}")


class LightningMixer(nn.Module):
    """Lightning (constant-decay linear attention) layer (spec section 3).

    q, k, v, z: hidden -> H*D; o: H*D -> hidden (K/V not shared: H heads everywhere). q_norm/k_norm:
    per-head RMSNorm [D]; then RoPE (theta `rope_theta`, first `rotary_dim` dims, rotate-half) through
    hype_embed; decay rates sala_decay_slopes(H) (ALiBi schedule, not layer-scaled; computed, not stored);
    scale 1/sqrt(D); output o_proj(o_norm(o) * sigmoid(z_proj(u))) with o_norm over the whole H*D width.
    The decode state is fp32 [B, H, D, D].
    """

    mixer_type = MIXER_LIGHTNING

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: Optional[int] = None,
                 rope_theta: float = 10000.0, rotary_dim: Optional[int] = None, eps: float = 1e-6,
                 qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        op = "LightningMixer"
        hidden_size, num_heads, head_dim = (_size(op, n, x) for n, x in (
            ("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim)))
        if rotary_dim is not None:
            rotary_dim = _size(op, "rotary_dim", rotary_dim, minimum=2)
            if rotary_dim % 2 or rotary_dim > head_dim:
                raise ValueError(f"sala_ops.{op}: rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx = layer_idx
        # float(10**400) raised a bare OverflowError here, a string theta a bare ValueError / TypeError
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
            raise TypeError(f"sala_ops.{op}: rope_theta must be a number, got {type(rope_theta).__name__}")
        self.rope_theta = C.as_float(op, "rope_theta", rope_theta)
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"sala_ops.{op}: rope_theta must be positive and finite, got {rope_theta!r}")
        self.rotary_dim = head_dim if rotary_dim is None else int(rotary_dim)
        self.eps = eps
        width = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, width, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, width, bias=qkv_bias)
        self.o_proj = nn.Linear(width, hidden_size, bias=o_bias)
        self.z_proj = nn.Linear(hidden_size, width, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.o_norm = RMSNorm(width, eps)
        self._decay = {}  # device -> fp32 [H]; not a buffer so .to(bf16) can never round it

    def decay(self, device) -> torch.Tensor:
        d = self._decay.get(device)
        if d is None:
            d = self._decay[device] = sala_decay_slopes(self.num_heads).to(device=device, dtype=torch.float32)
        return d

    def qkv(self, u, positions, cu_seqlens=None):
        """q, k after q_norm/k_norm and RoPE, and v, all [B, T, H, D]."""
        B, T, _ = u.shape
        q = self.q_proj(u).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(u).view(B, T, self.num_heads, self.head_dim)
        v = self.v_proj(u).view(B, T, self.num_heads, self.head_dim)
        q, k = hype_embed(q, k, positions=positions, layer_type="lightning", theta=self.rope_theta,
                          rotary_dim=self.rotary_dim, q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight,
                          eps=self.eps, cu_seqlens=cu_seqlens)
        return q, k, v

    def forward(self, hidden_states, position_ids=None, attention_mask=None, **kwargs):
        """hidden_states u [B, T, hidden] -> (out [B, T, hidden], None). Positions: `position_ids`
        ([B, T] or [1, T]) when given, else counted on from the cache (or from 0 / per sequence with
        cu_seqlens)."""
        op = "LightningMixer"
        u = hidden_states
        _check_hidden(op, u, self.hidden_size)
        B, T, _ = u.shape
        _check_position_ids(op, position_ids, B, T)
        layer_cache, cu = _cache_or_packing(kwargs, B, self.layer_idx, self.mixer_type, op)
        if cu is not None:
            positions = None if position_ids is None else _positions(position_ids, B, T, 0, u.device)
        else:
            offset = layer_cache.seq_len if layer_cache is not None else 0
            positions = _positions(position_ids, B, T, offset, u.device)
        q, k, v = self.qkv(u, positions, cu)
        decay = self.decay(u.device)
        state = None if layer_cache is None else layer_cache.state
        if state is not None and T == 1:
            o, new_state = lightning_attention_step(q, k, v, state, decay)
        else:
            o, new_state = lightning_attention(q, k, v, decay, initial_state=state,
                                               output_final_state=layer_cache is not None, cu_seqlens=cu)
        if layer_cache is not None:
            layer_cache.update(new_state, T)
        gate = torch.sigmoid(self.z_proj(u))
        out = self.o_proj(self.o_norm(o.reshape(B, T, -1)) * gate)
        return out, None

    def extra_repr(self):
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, layer_idx={self.layer_idx}, "
                f"rope_theta={self.rope_theta}, rotary_dim={self.rotary_dim}")


__all__ = ["SparseMixer", "LightningMixer", "RMSNorm", "MIXER_SPARSE", "MIXER_LIGHTNING", "MIXER_TYPES"]
