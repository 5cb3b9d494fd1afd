"""Naive PyTorch references: the ground truth every sala_ops kernel is checked against.

Written for clarity, never for speed. Installed as `sala_ops.reference` (pyproject maps this
folder there) so the CPU backend and the tests can use it from an installed package.
"""
from .lightning import (lightning_recurrent, lightning_parallel, lightning_step, sala_decay_slopes,
                        minimax_decay_slopes)
from .sparse import (compress_keys, select_blocks, block_sparse_attention, dense_attention, sparse_attention)
from .rope import (HYPE_POLICY, rope_cos_sin, apply_rope, rms_norm, hype_embed, positions_from_cu_seqlens)
