"""A one-program Triton kernel around the fast sparse-decode select's threshold search, for
tests/test_sparse_decode.py (a module of its own: a @triton.jit function resolves names in its module's globals)."""
import triton
import triton.language as tl

from sala_ops.triton.sparse_decode_fast import _kth_largest_bisect


@triton.jit
def kth_kernel(x, out, N, n_sel, NP: tl.constexpr, K: tl.constexpr, NIT: tl.constexpr):
    i = tl.arange(0, NP)
    valid = i < N
    bits = tl.where(valid, tl.load(x + i, mask=valid, other=0.0).to(tl.int32, bitcast=True), -1)
    tl.store(out, _kth_largest_bisect(bits, n_sel, K, NIT))
