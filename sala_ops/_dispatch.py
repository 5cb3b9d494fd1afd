"""Backend choice: `triton` (the kernels in sala_ops/triton) or `reference` (naive PyTorch).

Policy, in order:
  1. a `use_backend(...)` context, if one is active;
  2. the environment variable SALA_OPS_BACKEND (`triton` | `reference`);
  3. CUDA tensors -> triton, CPU tensors -> reference.
CPU tensors can still run the Triton kernels through the Triton interpreter (TRITON_INTERPRET=1
set before triton is imported); that is how CI proves the kernels. The choice is never silent:
`backend_for(tensor)` tells it, and the first call of each op logs it once at INFO level.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import typing

import torch

BACKENDS = ("triton", "reference")
_log = logging.getLogger("sala_ops")
_forced: list[str] = []
_announced: set[tuple[str, str]] = set()

# os.environ.get costs ~0.6-0.8 us (key encoding through the Mapping layers), a lot on the decode hot
# path; on POSIX os.environ keeps its contents in `_data` (encoded keys), which every os.environ
# update (monkeypatch.setenv included) writes through, so reading it directly gives the same answer.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_ENCODE, _ENV_DECODE = os.environ.encodekey, os.environ.decodevalue
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _ENV_DATA = None
_ENV_KEYS: dict = {}


def getenv(name: str, default=None):
    """os.environ.get(name, default), without the Mapping layers."""
    if _ENV_DATA is not None:
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = _ENV_ENCODE(name)
        raw = _ENV_DATA.get(key)
        return default if raw is None else _ENV_DECODE(raw)
    return os.environ.get(name, default)


def env_choice(name: str, default: str, choices: tuple, op: str) -> str:
    """The value of the environment variable `name` (unset or empty: `default`); a value outside `choices`
    raises a ValueError naming the variable, the op and the accepted values (a typo used to fall back to
    the default silently)."""
    value = getenv(name) or default
    if value not in choices:
        raise ValueError(f"sala_ops.{op}: {name} must be one of {choices}, got {value!r}")
    return value


def _backend_env():
    return getenv("SALA_OPS_BACKEND")


def _validate(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"sala_ops: {where} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block (tests use this to run the kernels on CPU)."""
    _forced.append(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


def backend_for(tensor: torch.Tensor) -> str:
    """The backend an op called on `tensor` will use."""
    if _forced:
        return _forced[-1]
    env = _backend_env()
    if env:
        return _validate(env, "SALA_OPS_BACKEND")
    return "triton" if tensor.is_cuda else "reference"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(op: str, tensor: torch.Tensor) -> str:
    """backend_for plus the one-time log line per (op, backend)."""
    backend = backend_for(tensor)
    if backend == "triton" and not tensor.is_cuda and not triton_interpreted():
        raise ValueError(f"sala_ops.{op}: the triton backend needs CUDA tensors or TRITON_INTERPRET=1 "
                         f"(set before triton is imported); got tensors on {tensor.device}")
    # dynamo cannot trace logging: under torch.compile the line was (or will be) logged eagerly
    if (op, backend) not in _announced and not torch.compiler.is_compiling():
        _announced.add((op, backend))
        _log.info("sala_ops.%s: using the %s backend", op, backend)
    return backend


_NO_SWITCH = contextlib.nullcontext()


def device_of(tensor: torch.Tensor, where: str):
    """A context in which `tensor`'s CUDA device is the current one; a no-op when it already is (or on the CPU).

    Triton launches on the current CUDA device and its current stream, whatever device the pointers belong to. A
    call with tensors on another GPU (a model spread over GPUs with device_map="auto", or a second GPU used without
    torch.cuda.set_device) would run its kernels on the wrong device: an illegal address, or with peer access
    enabled silently slow remote reads. Every Triton entry point runs inside this. `where` names the entry point
    (tests/test_device_guard.py records it). While torch.compile traces, nothing is switched: the kernels then run
    inside the custom ops' implementations, which are guarded when they execute."""
    if tensor.is_cuda and not torch.compiler.is_compiling() and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NO_SWITCH


def no_autocast(tensor: torch.Tensor):
    """A context without torch.autocast for the reference backend's math: its fp32 accumulation and the fp32
    states it returns would otherwise run (and come back) in the autocast dtype under AMP. (The Triton kernels
    ignore autocast already.)"""
    return torch.autocast(tensor.device.type, enabled=False)


def on_device_of_first_arg(fn):
    """Decorator: run fn inside device_of(its first argument), see device_of. The wrapper keeps fn's signature and
    its annotations resolved in fn's module (string annotations under `from __future__ import annotations` would
    otherwise be looked up in this module), so torch.library.custom_op infers the same schema from it."""
    where = fn.__qualname__

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with device_of(args[0], where):
            return fn(*args, **kwargs)
    guarded.__signature__ = inspect.signature(fn, eval_str=True)
    guarded.__annotations__ = typing.get_type_hints(fn)
    return guarded


class _NoDoubleBackward(torch.autograd.Function):
    """The identity on the gradients a Triton backward returns, made differentiable only to fail: see
    no_double_backward."""

    @staticmethod
    def forward(ctx, op, n_links, *tensors):
        ctx.op = op
        return tensors[n_links:]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"sala_ops.{ctx.op}: double backward (differentiating its gradients, create_graph=True) is "
                           f"not supported by the Triton backend's kernels")


def no_double_backward(op: str, links, grads):
    """The gradients of a Triton autograd.Function's backward, made to raise when something differentiates them.

    The kernels' gradients come back with no graph: under create_graph=True a gradient penalty (the norm of a
    gradient, added to a loss) got no contribution through them, silently. Outside create_graph (grad mode off in
    the backward) this returns `grads` unchanged. Otherwise each gradient becomes the output of one node whose
    inputs are `links` (the incoming gradients and the saved inputs that need grad: what the true gradients depend
    on), so any later backward that reaches through them raises instead of returning a partial result."""
    if not torch.is_grad_enabled():
        return grads
    links = [t for t in links if isinstance(t, torch.Tensor) and t.requires_grad]
    if not links:
        return grads
    pos = [i for i, g in enumerate(grads) if g is not None]
    outs = _NoDoubleBackward.apply(op, len(links), *links, *(grads[i] for i in pos))
    res = list(grads)
    for i, o in zip(pos, outs):
        res[i] = o
    return tuple(res)
