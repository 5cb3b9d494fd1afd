"""SalaCache: the hybrid decode cache of a SALA model, usable by Hugging Face `generate()`.

One entry per decoder layer, chosen by the layer's mixer type:

    SparseCacheLayer     sparse (InfLLM-V2) layers: a `sala_ops.sparse_decode.SparseLayerCache` ("sparse
                         compute, dense storage"): K/V [B, capacity, Hkv, D] in the model dtype, the
                         compressed keys C1 (kernel_size / kernel_stride) and C2 (lse windows) in fp32,
                         appended as windows complete, and device-side lengths.
    LightningCacheLayer  lightning layers: the fp32 recurrent state [B, H, K, V], independent of length.

Sparse layers (SparseMixer with a cache -> SparseCacheLayer.attend):
- prefill, T > 1 new tokens (empty cache or a later chunk): `sparse_prefill` appends K/V and the
  completed compressed windows, then runs `sparse_attention` of the new queries over every cached key,
  bottom-right aligned: exactly the one-pass result;
- decode, one new token per sequence: `sparse_decode_step` (append_token + sparse_decode: selection
  from the cached C1/C2, block-sparse attention over the selected blocks; dense below dense_len keys).
  O(selected blocks + compressed keys) per token instead of recompressing the whole prefix, and the
  Triton kernels on CUDA (a PyTorch path on CPU); same result as sparse_attention at that position.
- capacity: transformers' caches have no declared maximum, so the SparseLayerCache is reallocated
  when full, at max(needed, 2 x capacity) (K/V, C1/C2, lengths copied; amortised O(1) per token).
  The first allocation is max(prompt, max_length) tokens (max_length default 16):
  `SalaCache(config, max_length=N)` preallocates N tokens per sequence, so nothing is reallocated up
  to N (what CUDA-graph capture of the decode step needs: a reallocation changes the buffers; it
  also avoids the copy and the old + new peak for long contexts).

`get_seq_length()` is the number of tokens every layer has seen (a host int: reading it never syncs).
It subclasses `transformers.cache_utils.Cache` so `generate()` and the mask helpers accept it;
everything the models and `generate()` ask of a cache is implemented here rather than inherited,
because the base class's internals moved between transformers 5.x releases.

Beam search and friends: reorder_cache / batch_select_indices / batch_repeat_interleave map the rows
of every buffer (K/V, C1/C2, lengths; the lightning states). crop: supported when every layer is
sparse (the SparseLayerCache rolls its lengths back; the compressed keys of the kept prefix are its
own, later windows are recomputed from the new keys as they complete); a cache with lightning layers
cannot be rolled back (a recurrent state does not keep past tokens), so assisted/speculative decoding
is refused with a clear error. Not supported: offloading, static/compiled caches. Padding: none; the
mixers ignore attention masks and the converted model refuses padded ones (sala_ops.convert).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache

from .layers import MIXER_LIGHTNING, MIXER_SPARSE, MIXER_TYPES
from .sparse import SparseConfig
from .sparse_decode import SparseLayerCache, sparse_decode_step, sparse_prefill


class SparseCacheLayer:
    """One sparse layer's decode cache: a `sala_ops.sparse_decode.SparseLayerCache` (K/V [B, capacity, Hkv, D]
    in the model dtype, compressed keys C1/C2 in fp32 built as windows complete, device-side lengths),
    created by the first call with the layer's SparseConfig and reallocated (doubling) when full.

    attend(q, k, v, config): T > 1 new tokens -> `sparse_prefill` (appends, then sparse_attention of the
    new queries over every cached key, bottom-right aligned: the exact one-pass semantics, also for a
    later chunk); T == 1 -> `sparse_decode_step` (append_token + the one-token decode kernel)."""

    mixer_type = MIXER_SPARSE
    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False
    min_capacity = 16  # first allocation without a max_length: max(tokens, this)

    def __init__(self, max_length: Optional[int] = None):
        self.max_length = max_length  # preallocated capacity (tokens per sequence); growth past it reallocates
        self.cache: Optional[SparseLayerCache] = None
        self.seq_len = 0  # host copy of the (common) length of every sequence: no device sync to read it

    @property
    def is_initialized(self) -> bool:
        return self.cache is not None

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.max_len

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """Cached keys [B, seq_len, Hkv, D] (a view of the SparseLayerCache's buffer)."""
        return None if self.cache is None else self.cache.k[:, : self.seq_len]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self.cache is None else self.cache.v[:, : self.seq_len]

    def _compressed(self, which: int) -> Optional[torch.Tensor]:
        if self.cache is None:
            return None
        cfg = self.cache.config
        ks, st = (cfg.kernel_size, cfg.kernel_stride) if which == 1 else cfg.c2
        n = 0 if self.seq_len < ks else (self.seq_len - ks) // st + 1
        return (self.cache.c1 if which == 1 else self.cache.c2)[:, :n]

    @property
    def compressed_k1(self) -> Optional[torch.Tensor]:
        """C1 [B, N1, Hkv, D] fp32: mean keys over the complete (kernel_size, kernel_stride) windows."""
        return self._compressed(1)

    @property
    def compressed_k2(self) -> Optional[torch.Tensor]:
        """C2 [B, N2, Hkv, D] fp32: the same over the (lse_kernel_size, lse_kernel_stride) windows."""
        return self._compressed(2)

    @property
    def batch_size(self) -> int:
        return -1 if self.cache is None else self.cache.batch_size

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, config: SparseConfig, need: int):
        """Make room for `need` tokens per sequence: create the SparseLayerCache, or check the new K/V
        continue it and reallocate it at max(need, 2 x capacity) when it is full."""
        B, _, Hkv, D = k.shape
        c = self.cache
        if c is None:
            cap = max(need, self.max_length or self.min_capacity)
            self.cache = SparseLayerCache(B, cap, Hkv, D, dtype=k.dtype, device=k.device, config=config)
            return
        if c.batch_size != B or (c.num_kv_heads, c.head_dim) != (Hkv, D) or v.shape != k.shape:
            raise ValueError(f"sala_ops.SalaCache: new keys {tuple(k.shape)} do not continue the cached "
                             f"{tuple(self.keys.shape)} (batch, heads and head dim must match)")
        if k.dtype != c.dtype or k.device != c.device:
            raise TypeError(f"sala_ops.SalaCache: new keys ({k.dtype}, {k.device}) do not continue the cached "
                            f"({c.dtype}, {c.device}); reset the cache after moving or casting the model")
        if config != c.config:
            raise ValueError(f"sala_ops.SalaCache: the layer's sparse config {config} differs from the one the "
                             f"cache was built with ({c.config})")
        if need > c.max_len:
            self.cache = c.resized(max(need, 2 * c.max_len), keep=self.seq_len)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SparseConfig, scale=None):
        """Append k, v [B, T, Hkv, D] and return the InfLLM-V2 attention [B, T, H, D] of q [B, T, H, D]
        (bottom-right aligned over every cached key): prefill for T > 1, the decode kernel for T == 1."""
        T = k.shape[1]
        self._reserve(k, v, config, self.seq_len + T)
        # the decode kernels have no backward (sparse_decode refuses q that requires grad): under autograd a
        # one-token step takes the prefill path (sparse_attention over the cached keys, differentiable)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if T == 1 and not needs_grad:
            o = sparse_decode_step(q, k, v, self.cache, scale)  # [B, 1, H, D] in, [B, 1, H, D] out
        else:
            o = sparse_prefill(q, k, v, self.cache, scale)
        self.seq_len += T
        return o

    def update(self, k: torch.Tensor, v: torch.Tensor, config: Optional[SparseConfig] = None):
        """Append k, v [B, T, Hkv, D] without attending (compressed keys included); return all cached keys
        and values [B, seq_len, Hkv, D]."""
        T = k.shape[1]
        self._reserve(k, v, config if config is not None or self.cache is None else self.cache.config,
                      self.seq_len + T)
        self.cache.append(k, v)
        self.seq_len += T
        return self.keys, self.values

    def crop(self, length: int):
        """Keep the first `length` tokens (compressed keys of the kept windows stay; see SparseLayerCache.truncate)."""
        if self.cache is not None and length < self.seq_len:
            self.cache.truncate(length)
            self.seq_len = length

    def _map(self, fn):
        """Batch reshuffles (beam search): fn maps every per-sequence buffer along dim 0."""
        if self.cache is not None:
            self.cache = self.cache.map_rows(fn)

    def reset(self):
        self.__init__(self.max_length)


class LightningCacheLayer:
    """The fp32 recurrent state [B, H, K, V] of one lightning layer and how many tokens made it."""

    mixer_type = MIXER_LIGHTNING
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.state: Optional[torch.Tensor] = None
        self.seq_len = 0

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.shape[0]

    def update(self, new_state: torch.Tensor, num_tokens: int):
        if new_state.dtype != torch.float32:
            raise TypeError(f"sala_ops.SalaCache: the lightning state must be fp32, got {new_state.dtype}")
        self.state = new_state
        self.seq_len += num_tokens
        return self.state

    def _map(self, fn):
        if self.state is not None:
            self.state = fn(self.state)

    def reset(self):
        self.__init__()


_LAYER_CLASSES = {MIXER_SPARSE: SparseCacheLayer, MIXER_LIGHTNING: LightningCacheLayer}


class SalaCache(Cache):
    """Hybrid cache for a SALA model: `SalaCache(config)` (a config with `mixer_types`) or
    `SalaCache(mixer_types=[...])`; `max_length=N` preallocates the sparse layers' K/V and compressed keys
    for N tokens per sequence (they grow by reallocation past it). Pass it as the model's cache (`cache=` /
    `past_key_values=`), or let a converted model create it (it does whenever use_cache is on and no
    SalaCache is given)."""

    is_compileable = False

    def __init__(self, config=None, mixer_types=None, max_length: Optional[int] = None):
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"sala_ops.SalaCache: max_length must be a positive int or None, got {max_length!r}")
        if (config is None) == (mixer_types is None):
            raise ValueError("sala_ops.SalaCache: pass exactly one of config (with `mixer_types`) or mixer_types")
        if config is not None:
            mixer_types = getattr(config, "mixer_types", None)
            if mixer_types is None:
                raise ValueError(f"sala_ops.SalaCache: config {type(config).__name__} has no `mixer_types`; "
                                 f"it is not a SALA config (convert the model with sala_ops.convert_to_sala)")
        bad = [m for m in mixer_types if m not in MIXER_TYPES]
        if bad:
            raise ValueError(f"sala_ops.SalaCache: mixer_types must be drawn from {MIXER_TYPES}, got {bad}")
        layers = [SparseCacheLayer(max_length) if m == MIXER_SPARSE else LightningCacheLayer() for m in mixer_types]
        try:
            super().__init__(layers=layers)
        except TypeError:  # an older Cache signature: set what the base class would
            super().__init__()
            self.layers = layers
        self.layers = layers
        self.mixer_types = list(mixer_types)
        self.layer_class_to_replicate = None
        self.offloading = False
        self.max_length = max_length

    # -- what the SALA mixers use ---------------------------------------------------------------
    def layer(self, layer_idx: int, mixer_type: str):
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"sala_ops.SalaCache: layer {layer_idx} out of range (cache has {len(self.layers)} layers)")
        entry = self.layers[layer_idx]
        if entry.mixer_type != mixer_type:
            raise ValueError(f"sala_ops.SalaCache: layer {layer_idx} is cached as {entry.mixer_type!r} but the "
                             f"model's layer is {mixer_type!r}; build the cache from the model's config")
        return entry

    # -- what transformers' models, masks and generate() use -------------------------------------
    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        return f"SalaCache(layers={len(self.layers)}, seq_len={self.get_seq_length()})"

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        if not self.layers:
            return 0
        return self.layers[layer_idx or 0].seq_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        if isinstance(query_length, torch.Tensor):  # older releases passed cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def update(self, *args, **kwargs):
        raise NotImplementedError("sala_ops.SalaCache: the SALA mixers update their own entries; standard attention "
                                  "modules cannot use this cache (the model must be fully converted)")

    @property
    def is_initialized(self) -> bool:
        return any(layer.is_initialized for layer in self.layers)

    @property
    def is_sliding(self):
        return [False] * len(self.layers)

    @property
    def is_linear(self):
        return [False] * len(self.layers)  # every layer reports the common sequence length

    @property
    def is_dummy(self):
        return [False] * len(self.layers)

    @property
    def is_croppable(self) -> bool:
        """Only without lightning layers: a recurrent state cannot be rolled back."""
        return all(layer.is_croppable for layer in self.layers)

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if layer.is_initialized}
        return sizes.pop() if len(sizes) == 1 else -1

    def reset(self):
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer._map(lambda x: x[indices])

    def crop(self, max_length: int):
        """Roll the cache back as transformers' caches do: max_length <= 0 drops -max_length tokens (so
        crop(0) is a no-op; dropping more than are cached empties it), a positive value keeps the first
        max_length tokens (the older releases' absolute form). Sparse layers only: K/V and the compressed
        keys of the kept prefix stay, later windows are rebuilt as tokens are appended again."""
        if not self.is_croppable:
            raise NotImplementedError("sala_ops.SalaCache: cannot crop (roll back) a cache with lightning layers: "
                                      "their recurrent state does not keep past tokens. Assisted/speculative "
                                      "decoding is not supported; use plain greedy/sampling/beam search.")
        seq = self.get_seq_length()
        if max_length <= 0:
            max_length = seq - abs(max_length)
        if seq <= max_length:
            return
        for layer in self.layers:
            layer.crop(max(0, max_length))

    def early_initialization(self, *args, **kwargs):
        return None  # entries are created by the first forward

    def offload(self, *args, **kwargs):
        raise NotImplementedError("sala_ops.SalaCache: offloading is not supported")

    def prefetch(self, *args, **kwargs):
        raise NotImplementedError("sala_ops.SalaCache: offloading is not supported")


__all__ = ["SalaCache", "SparseCacheLayer", "LightningCacheLayer"]
