"""Argument checks shared by every public op. Each error names the op, the argument, what was
expected and what came, as a ValueError (bad value/shape) or TypeError (bad type/dtype)."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(op, name, x, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sala_ops.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"sala_ops.{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"sala_ops.{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if any(s < 0 for s in x.shape):
        raise ValueError(f"sala_ops.{op}: {name} has a negative size {tuple(x.shape)}")
    return x


def same(op, names, tensors, what="dtype"):
    vals = [getattr(t, what) for t in tensors]
    if any(v != vals[0] for v in vals):
        got = ", ".join(f"{n}={v}" for n, v in zip(names, vals))
        raise (TypeError if what == "dtype" else ValueError)(f"sala_ops.{op}: {', '.join(names)} must share one {what}, got {got}")


def dim_eq(op, name, x, dim, expected, what):
    if x.shape[dim] != expected:
        raise ValueError(f"sala_ops.{op}: {name}.shape[{dim}] ({what}) must be {expected}, got {x.shape[dim]}")


def positive_int(op, name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"sala_ops.{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"sala_ops.{op}: {name} must be >= {minimum}, got {value}")
    return value


def as_float(op, name, value):
    """float(value) of an int or float; an int past the float range (10**400: float() raised a bare OverflowError)
    is a ValueError naming the op and the argument."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"sala_ops.{op}: {name} must fit a float, got an int of {value.bit_length()} bits") from None


def scale_arg(op, scale, head_dim):
    if scale is None:
        if head_dim < 1:  # 0 ** -0.5 raised a bare ZeroDivisionError
            raise ValueError(f"sala_ops.{op}: scale=None means 1/sqrt(head dim), but q has head dim {head_dim}; "
                             f"pass a scale")
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"sala_ops.{op}: scale must be a float or None, got {type(scale).__name__}")
    value = as_float(op, "scale", scale)
    if not math.isfinite(value):
        raise ValueError(f"sala_ops.{op}: scale must be finite, got {scale}")
    return value


def gqa(op, q_heads, kv_heads, q_name="q", kv_name="k"):
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(f"sala_ops.{op}: {q_name} heads ({q_heads}) must be a multiple of {kv_name} heads "
                         f"({kv_heads}) (grouped-query attention)")
    return q_heads // kv_heads


def cu_seqlens(op, cu, total, name="cu_seqlens", batch=None, device=None):
    """Validate packed-sequence offsets: 1-D int32/int64, starts at 0, strictly increasing (no empty
    sequence), ends at `total`; batch dimension must be 1. Reads the offsets on the host: varlen
    callers that need a sync-free hot path validate once and pass `validate=False` upstream."""
    tensor(op, name, cu, ndim=1, dtypes=(torch.int32, torch.int64))
    if batch is not None and batch != 1:
        raise ValueError(f"sala_ops.{op}: with {name} the batch dimension must be 1 (packed sequences), got {batch}")
    if device is not None and cu.device != device:
        raise ValueError(f"sala_ops.{op}: {name} must be on {device}, got {cu.device}")
    if cu.numel() < 2:
        raise ValueError(f"sala_ops.{op}: {name} must hold at least 2 offsets [0, ..., total], got {cu.numel()}")
    host = cu.tolist()
    if torch.compiler.is_compiling():
        # Under torch.compile the offsets are data (unbacked ints): Python comparisons on them cannot be traced
        # (fullgraph=True failed with 'Could not guard on data-dependent expression'). torch._check turns each
        # rule into a runtime assertion of the compiled graph: a bad offset still fails (RuntimeError).
        # The messages are constant strings: dynamo in torch 2.11 refuses a message function that references an
        # enclosing variable ("Can't extract message from torch._check()"), so they cannot name the op here.
        torch._check(host[0] == 0, lambda: "sala_ops: cu_seqlens / cu_seqlens_k must start at 0")
        torch._check(host[-1] == total, lambda: "sala_ops: cu_seqlens / cu_seqlens_k must end at the packed length")
        for a, b in zip(host, host[1:]):
            torch._check(b > a, lambda: "sala_ops: cu_seqlens / cu_seqlens_k must be strictly increasing (no empty "
                                        "or negative-length sequences)")
        return cu
    if host[0] != 0:
        raise ValueError(f"sala_ops.{op}: {name}[0] must be 0, got {host[0]}")
    if host[-1] != total:
        raise ValueError(f"sala_ops.{op}: {name}[-1] must equal the packed length {total}, got {host[-1]}")
    for a, b in zip(host, host[1:]):
        if b <= a:
            raise ValueError(f"sala_ops.{op}: {name} must be strictly increasing (no empty or negative-length "
                             f"sequences), got {host}")
    return cu
