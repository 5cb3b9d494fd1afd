"""sala_ops/triton/_launch.py: the cached-CompiledKernel launch path.

No GPU here (and the interpreter does not compile), so the key logic is tested with a real JITFunction
whose `run` is replaced by a fake that returns a fake CompiledKernel: the first launch of a
specialisation goes through kernel[grid] (JITFunction.run), a repeat calls the cached kernel's `run`
with JITFunction.run's argument list, and every change of what triton specialises on goes back to
kernel[grid]. The real-triton side is checked against the source of JITFunction.run (the contract
the fast path mirrors) and triton's own argument specialisation, for the installed triton and for a
triton 3.6 tree when one is at /tmp/t36 (or SALA_TRITON36_PATH)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from sala_ops.triton import _launch as FL


def _kern(a_ptr, b_ptr, scale, n, stride, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
    pass


class FakeCK:
    """Stands for triton.compiler.CompiledKernel."""

    def __init__(self):
        self.function, self.packed_metadata = object(), object()
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return ("meta", grid, stream, len(args))

    def run(self, *args):
        self.runs.append(args)


@pytest.fixture
def fake(monkeypatch):
    kernel = JITFunction(_kern)
    slow = []

    def fake_run(*args, grid, warmup, **kwargs):
        slow.append((grid, args, kwargs))
        return FakeCK()

    kernel.run = fake_run  # what kernel[grid](...) calls
    dev = {"device": 0, "stream": 1234}
    monkeypatch.setattr(FL, "ENABLED", True)
    monkeypatch.setattr(FL, "CompiledKernel", FakeCK)
    monkeypatch.setattr(FL, "_device_and_stream", lambda: (dev["device"], dev["stream"]))
    FL.clear()
    yield kernel, slow, dev
    FL.clear()


def _go(kernel, a, b, scale=0.5, n=64, stride=32, grid=(3,), **cx):
    cx = cx or dict(BLOCK=16, num_warps=4)
    return FL.launch(kernel, grid, (a, b), (scale, n, stride), cx)


def _ptrs():
    buf = torch.zeros(64)
    return buf[:16], buf[16:32]  # 64-byte aligned views of one 16-byte aligned buffer


def test_repeat_launch_goes_direct_with_jit_run_arguments(fake):
    kernel, slow, _ = fake
    a, b = _ptrs()
    ck = _go(kernel, a, b, grid=(3, 2))
    assert len(slow) == 1 and isinstance(ck, FakeCK) and len(FL._cache) == 1
    assert _go(kernel, a, b, grid=(5, 2)) is None
    assert len(slow) == 1 and len(ck.runs) == 1
    r = ck.runs[0]
    # grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter hook, exit hook, *bound args
    assert r[:6] == (5, 2, 1, 1234, ck.function, ck.packed_metadata)
    assert r[6] == ("meta", (5, 2), 1234, 7)
    assert r[7] is triton.knobs.runtime.launch_enter_hook and r[8] is triton.knobs.runtime.launch_exit_hook
    assert r[9:11] == (a, b) and r[11:] == (0.5, 64, 32, 16, True)  # BLOCK, then FLAG's default


def test_other_pointers_with_same_specialisation_go_direct(fake):
    kernel, slow, _ = fake
    a, b = _ptrs()
    ck = _go(kernel, a, b)
    c, d = torch.zeros(32)[:16], torch.ones(48)[16:]
    _go(kernel, c, d)
    assert len(slow) == 1 and ck.runs[0][9:11] == (c, d)


@pytest.mark.parametrize("change", [
    "misaligned a", "misaligned b", "dtype", "scale int", "n == 1", "n not /16", "n bool", "n i64",
    "stride value", "constexpr", "num_warps", "extra option", "device", "debug knob", "instrumentation knob",
    "kernel debug", "pre-run hook", "global changed", "stages hook",
])
def test_anything_triton_specialises_on_goes_back_to_jit_run(fake, monkeypatch, change):
    kernel, slow, dev = fake
    a, b = _ptrs()
    _go(kernel, a, b)
    _go(kernel, a, b)
    assert len(slow) == 1
    kw = dict(scale=0.5, n=64, stride=32)
    cx = dict(BLOCK=16, num_warps=4)
    if change == "misaligned a":
        a = torch.zeros(64)[1:17]
    elif change == "misaligned b":
        b = torch.zeros(64)[3:19]
    elif change == "dtype":
        a = torch.zeros(16, dtype=torch.float16)
    elif change == "scale int":
        kw["scale"] = 1  # an int 1 is ("constexpr", 1) to triton, a float fp32
    elif change == "n == 1":
        kw["n"] = 1
    elif change == "n not /16":
        kw["n"] = 65
    elif change == "n bool":
        kw["stride"] = True
    elif change == "n i64":
        kw["n"] = 2 ** 31 + 16
    elif change == "stride value":
        kw["stride"] = 48  # same triton specialisation, but the key is the exact value: still a miss
    elif change == "constexpr":
        cx["BLOCK"] = 32
    elif change == "num_warps":
        cx["num_warps"] = 8
    elif change == "extra option":
        cx["num_stages"] = 2
    elif change == "device":
        dev["device"] = 1
    elif change == "debug knob":
        monkeypatch.setattr(triton.knobs.runtime, "debug", not triton.knobs.runtime.debug)
    elif change == "instrumentation knob":
        monkeypatch.setattr(triton.knobs.compilation, "instrumentation_mode", "something")
    elif change == "kernel debug":
        kernel.debug = True
    elif change == "pre-run hook":
        kernel.pre_run_hooks.append(lambda *a, **k: None)
    elif change == "global changed":
        g = {"G": 1}
        kernel.used_global_vals = {("G", id(g)): (1, g)}
        assert _go(kernel, a, b) is None  # unchanged: direct
        g["G"] = 2
    elif change == "stages hook":
        if not FL._HAS_STAGES_HOOK:
            pytest.skip("no add_stages_inspection_hook in this triton")
        monkeypatch.setattr(triton.knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h"))
    before = len(slow)
    FL.launch(kernel, (3,), (a, b), (kw["scale"], kw["n"], kw["stride"]), cx)
    assert len(slow) == before + 1, f"{change}: the fast path was taken"


def test_not_a_jit_function_or_disabled_or_broken_contract_goes_to_getitem(fake, monkeypatch):
    kernel, slow, _ = fake
    a, b = _ptrs()
    calls = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    FL.launch(Stub(), (2,), (a, b), (0.5, 3), dict(BLOCK=16))
    assert calls == [((2,), (a, b, 0.5, 3), dict(BLOCK=16))] and not FL._cache
    monkeypatch.setattr(FL, "ENABLED", False)
    _go(kernel, a, b)
    _go(kernel, a, b)
    assert len(slow) == 2 and not FL._cache
    monkeypatch.setattr(FL, "ENABLED", True)
    FL.clear()
    monkeypatch.setattr(FL, "run_contract_ok", lambda run_fn=None: False)
    _go(kernel, a, b)
    _go(kernel, a, b)
    assert len(slow) == 4 and not FL._cache


def test_no_entry_when_the_signature_does_not_bind_as_ptrs_scalars_constexprs(fake):
    kernel, slow, _ = fake
    a, b = _ptrs()
    # BLOCK passed positionally as a "scalar": the tail would not be constexprs only
    FL.launch(kernel, (1,), (a, b), (0.5, 64, 32, 16), dict(num_warps=4))
    assert not FL._cache
    # a non-tensor pointer: no key, normal launch
    FL.launch(kernel, (1,), (a, 7), (0.5, 64, 32), dict(BLOCK=16))
    assert not FL._cache and len(slow) == 2


def test_cache_is_bounded(fake, monkeypatch):
    kernel, slow, _ = fake
    a, b = _ptrs()
    monkeypatch.setattr(FL, "MAX_ENTRIES", 4)
    for n in range(32, 32 + 16 * 10, 16):
        _go(kernel, a, b, n=n)
        assert len(FL._cache) <= 4


def test_contract_matches_installed_triton_and_detects_changes():
    assert FL.run_contract_ok(), f"JITFunction.run of triton {triton.__version__} changed: re-read it"

    def changed_run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug  # noqa: F821
        kwargs["new_option"] = 1
        return None

    assert not FL.run_contract_ok(changed_run)


def test_interpreter_launches_never_cache():
    """Under TRITON_INTERPRET the kernels are not JITFunctions: every launch is the normal one."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a GPU here")
    import sala_ops
    FL.clear()
    q, k, v = (torch.randn(1, 2, 16) for _ in range(3))
    state = torch.randn(1, 2, 16, 16)
    with sala_ops.use_backend("triton"):
        for _ in range(2):
            o, s = sala_ops.lightning_attention_step(q, k, v, state.clone(), sala_ops.sala_decay_slopes(2))
    exp_o, _ = sala_ops.reference.lightning_step(q, k, v, state, sala_ops.sala_decay_slopes(2))
    assert torch.allclose(o, exp_o, atol=1e-5)
    assert not FL._cache


_SPEC_CHECK = textwrap.dedent("""
    import sys, torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    sys.path.insert(0, {root!r})
    import importlib.util
    spec = importlib.util.spec_from_file_location("_launch", {launch!r})
    FL = importlib.util.module_from_spec(spec); spec.loader.exec_module(FL)
    import triton
    assert FL.run_contract_ok(), "contract broken on triton " + triton.__version__
    nat = lambda x: native_specialize_impl(BaseBackend, x, False, True, True)
    # pointers: one key (dtype, 16-byte aligned) -> one triton specialisation
    seen = {{}}
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64):
        buf = torch.zeros(256, dtype=dt)
        for off in range(0, 40):
            t = buf[off:off + 8]
            key = (t.dtype, t.data_ptr() & 15 == 0)
            assert seen.setdefault(key, nat(t)) == nat(t), (key, nat(t))
    # scalars: the key is (type, exact value), so it can only be finer than triton's; check the classes
    # triton distinguishes are what the docstring says
    assert nat(1) == ("constexpr", 1) and nat(16) == ("i32", "D") and nat(17) == ("i32", "")
    assert nat(2 ** 31 + 16)[0] == "i64" and nat(2 ** 63)[0] == "u64"
    assert nat(True)[0] == "u1" and nat(0.5) == nat(1e30) == ("fp32", None)
    print("ok", triton.__version__)
""")


def _t36_path():
    p = os.environ.get("SALA_TRITON36_PATH", "/tmp/t36")
    return p if os.path.isdir(os.path.join(p, "triton")) else None


@pytest.mark.parametrize("which", ["installed", "3.6"])
def test_key_is_finer_than_triton_specialisation(which, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if which == "3.6":
        p = _t36_path()
        if p is None:
            pytest.skip("no triton 3.6 tree (set SALA_TRITON36_PATH)")
        env["PYTHONPATH"] = p
    code = _SPEC_CHECK.format(root=root, launch=os.path.join(root, "sala_ops", "triton", "_launch.py"))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
    if which == "3.6":
        assert "3.6" in r.stdout
