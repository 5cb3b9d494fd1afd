"""A one-program Triton kernel around the fast sparse-decode select's threshold searches, for
tests/test_sparse_decode.py (a module of its own: a @triton.jit function resolves names in its module's globals)."""
import triton
import triton.language as tl

from sala_ops.triton.sparse_decode_fast import _kth_largest_bisect, _kth_largest_radix


@triton.jit
def kth_kernel(x, out, N, n_sel, NP: tl.constexpr, RADIX: tl.constexpr, K: tl.constexpr, NIT: tl.constexpr):
    i = tl.arange(0, NP)
    valid = i < N
    bits = tl.where(valid, tl.load(x + i, mask=valid, other=0.0).to(tl.int32, bitcast=True), -1)
    if RADIX:
        lo = _kth_largest_radix(bits, valid, n_sel)
    else:
        lo = _kth_largest_bisect(bits, n_sel, K, NIT)
    tl.store(out, lo)
