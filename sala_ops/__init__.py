"""sala_ops: MiniCPM-SALA's hybrid attention as drop-in ops.

    from sala_ops import lightning_attention, sparse_attention, hype_embed

Layout [batch, seq, heads, head_dim]; GQA by passing fewer K/V heads; scale=None means
1/sqrt(head_dim); varlen through cu_seqlens. CUDA tensors run Triton kernels, CPU tensors the
naive references (SALA_OPS_BACKEND or use_backend() to force one; backend_for() tells).
"""
from ._dispatch import backend_for, use_backend
from .lightning import (LightningOutput, lightning_attention, lightning_attention_step, sala_decay_slopes,
                        minimax_decay_slopes)
from .sparse import SparseConfig, sparse_attention, select_blocks, block_sparse_attention, compress_keys
from .hype import hype_embed, HYPE_POLICY
from .sparse_decode import SparseLayerCache, sparse_prefill, sparse_decode, sparse_decode_step
from .layers import SparseMixer, LightningMixer

# These two import transformers (and convert registers the SALA classes with the Auto classes), so
# they load on first use: `import sala_ops` stays light.
_LAZY = {"SalaCache": ".cache", "convert_to_sala": ".convert"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sala_ops' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = [
    "backend_for", "use_backend",
    "lightning_attention", "lightning_attention_step", "LightningOutput", "sala_decay_slopes", "minimax_decay_slopes",
    "sparse_attention", "select_blocks", "block_sparse_attention", "compress_keys", "SparseConfig",
    "hype_embed", "HYPE_POLICY",
    "SparseLayerCache", "sparse_prefill", "sparse_decode", "sparse_decode_step",
    "SparseMixer", "LightningMixer", "SalaCache", "convert_to_sala",
]
