"""Small Triton kernels around the fast sparse-decode select's threshold search and the fused step's rank select, for
tests/test_sparse_decode.py (a module of its own: a @triton.jit function resolves names in its module's globals)."""
import triton
import triton.language as tl

from sala_ops.triton.sparse_decode_fast import _kth_largest_bisect
from sala_ops.triton.sparse_decode_fused import _rank_blocks, _sel_from_ranks


@triton.jit
def kth_kernel(x, out, N, n_sel, NP: tl.constexpr, K: tl.constexpr, NIT: tl.constexpr):
    i = tl.arange(0, NP)
    valid = i < N
    bits = tl.where(valid, tl.load(x + i, mask=valid, other=0.0).to(tl.int32, bitcast=True), -1)
    tl.store(out, _kth_largest_bisect(bits, n_sel, K, NIT))


@triton.jit
def rank_kernel(bscore, lens, brank, byrank, N, SPB, INIT: tl.constexpr, WB: tl.constexpr, KSEL: tl.constexpr,
                KSP: tl.constexpr, NBP: tl.constexpr, RB: tl.constexpr, JC: tl.constexpr):
    """The rank select's phase 3 for row 0 (block size 1: block i is token i), program p of the grid."""
    p = tl.program_id(0)
    _rank_blocks(bscore, lens, brank, byrank, 0, 0, p, p * SPB, SPB, 0, N, 1, INIT, WB, KSEL, KSP, NBP, RB, JC)


@triton.jit
def sel_from_ranks_kernel(brank, lens, sel, N, KSEL: tl.constexpr, KSP: tl.constexpr, NBP: tl.constexpr):
    _sel_from_ranks(brank, lens, sel, 0, 0, 0, N, 1, KSEL, KSP, NBP)
