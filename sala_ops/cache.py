"""SalaCache: the hybrid decode cache of a SALA model, usable by Hugging Face `generate()`.

One entry per decoder layer, chosen by the layer's mixer type:

    SparseCacheLayer     sparse (InfLLM-V2) layers: the full K/V ("sparse compute, dense storage"),
                         [B, T, Hkv, D] in sala_ops' layout, grown by doubling; plus a reserved place
                         for the incrementally maintained compressed keys (C1 every kernel_stride
                         tokens, C2 every 4 * kernel_stride; spec section 2, issue 5).
    LightningCacheLayer  lightning layers: the fp32 recurrent state [B, H, K, V], independent of length.

`get_seq_length()` is the number of tokens every layer has seen. It subclasses
`transformers.cache_utils.Cache` so `generate()` and the mask helpers accept it; everything the
models and `generate()` ask of a cache is implemented here rather than inherited, because the base
class's internals moved between transformers 5.x releases.

Not supported (clear errors): cropping (assisted/speculative decoding rolls the cache back, which a
recurrent state cannot do), offloading, static/compiled caches. Beam search works (`reorder_cache`).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache

from .layers import MIXER_LIGHTNING, MIXER_SPARSE, MIXER_TYPES


class SparseCacheLayer:
    """K/V of one sparse layer, [B, T, Hkv, D] (sala_ops layout), stored in buffers that double in
    length when full so appending one decode token is amortised O(1) copies."""

    mixer_type = MIXER_SPARSE
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self.seq_len = 0
        # Incremental compressed keys (issue 5). `sparse_attention` recomputes them from the full key cache
        # on every call, so nothing lives here yet. The decode path of issue 5 (sala_ops/sparse_decode.py,
        # a preallocated cache with C1/C2 appended per token + a one-token kernel) can take this entry's
        # place; until it does, an incremental compressor keeps
        #   compressed_k1  [B, N1, Hkv, D] fp32: mean keys over (kernel_size, kernel_stride) windows
        #   compressed_k2  [B, N2, Hkv, D] fp32: the same over (4 kernel_size, 4 kernel_stride), for the LSE
        # appending a window whenever seq_len crosses a stride boundary (update() is the place).
        self.compressed_k1: Optional[torch.Tensor] = None
        self.compressed_k2: Optional[torch.Tensor] = None

    @property
    def is_initialized(self) -> bool:
        return self._k is not None

    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self._k is None else self._k[:, : self.seq_len]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self._v is None else self._v[:, : self.seq_len]

    @property
    def batch_size(self) -> int:
        return -1 if self._k is None else self._k.shape[0]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v [B, T, Hkv, D]; return all cached keys and values [B, seq_len, Hkv, D]."""
        B, T = k.shape[:2]
        if self._k is None:
            cap = max(T, 16)
            self._k = k.new_empty(B, cap, *k.shape[2:])
            self._v = v.new_empty(B, cap, *v.shape[2:])
        elif self._k.shape[0] != B or self._k.shape[2:] != k.shape[2:] or self._v.shape[2:] != v.shape[2:]:
            raise ValueError(f"sala_ops.SalaCache: new keys {tuple(k.shape)} do not continue the cached "
                             f"{tuple(self.keys.shape)} (batch, heads and head dim must match)")
        need = self.seq_len + T
        if need > self._k.shape[1]:
            cap = max(need, 2 * self._k.shape[1])
            nk = self._k.new_empty(B, cap, *self._k.shape[2:])
            nv = self._v.new_empty(B, cap, *self._v.shape[2:])
            nk[:, : self.seq_len] = self._k[:, : self.seq_len]
            nv[:, : self.seq_len] = self._v[:, : self.seq_len]
            self._k, self._v = nk, nv
        self._k[:, self.seq_len: need] = k
        self._v[:, self.seq_len: need] = v
        self.seq_len = need
        return self.keys, self.values

    def _map(self, fn):
        if self._k is not None:
            self._k, self._v = fn(self.keys), fn(self.values)
        for name in ("compressed_k1", "compressed_k2"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reset(self):
        self.__init__()


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
    `SalaCache(mixer_types=[...])`. Pass it as the model's cache (`cache=` / `past_key_values=`), or let
    a converted model create it (it does whenever use_cache is on and no SalaCache is given)."""

    is_compileable = False

    def __init__(self, config=None, mixer_types=None):
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
        layers = [_LAYER_CLASSES[m]() for m in mixer_types]
        try:
            super().__init__(layers=layers)
        except TypeError:  # an older Cache signature: set what the base class would
            super().__init__()
            self.layers = layers
        self.layers = layers
        self.mixer_types = list(mixer_types)
        self.layer_class_to_replicate = None
        self.offloading = False

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
        return False

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
        raise NotImplementedError("sala_ops.SalaCache: cannot crop (roll back) a cache with lightning layers: their "
                                  "recurrent state does not keep past tokens. Assisted/speculative decoding is not "
                                  "supported; use plain greedy/sampling/beam search.")

    def early_initialization(self, *args, **kwargs):
        return None  # entries are created by the first forward

    def offload(self, *args, **kwargs):
        raise NotImplementedError("sala_ops.SalaCache: offloading is not supported")

    def prefetch(self, *args, **kwargs):
        raise NotImplementedError("sala_ops.SalaCache: offloading is not supported")


__all__ = ["SalaCache", "SparseCacheLayer", "LightningCacheLayer"]
