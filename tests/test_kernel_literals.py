"""Float literals inside the Triton kernels stay fp32 numbers. Triton 3.6 (the H200's; language/semantic.py
to_tensor) types a float literal outside fp32's normal range (0 < |x| < 2^-126, or |x| > fp32 max) as fp64, and
fp64 then spreads through every expression it touches: the sparse-decode LSE clamp 1e-38 made the block scores
fp64 until run 6 (402 fp64 instructions in the fused step's SASS). An sm_90 compile of the same kernel under
Triton 3.9 (CI's) showed no fp64 PTX, so a compile check in CI would not see it; this reads the sources."""
import ast
import pathlib
import struct

import pytest

KERNEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "sala_ops" / "triton"
FP32_MIN_NORMAL = 2.0 ** -126
FP32_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]


def _is_jit(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics"):
            return True
    return False


def out_of_fp32_literals(source: str):
    """(function, line, value) of every float literal in a @triton.jit function that fp32 cannot hold as a
    normal number."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, float):
                    v = abs(sub.value)
                    if v != 0.0 and v != float("inf") and (v < FP32_MIN_NORMAL or v > FP32_MAX):
                        bad.append((node.name, sub.lineno, sub.value))
    return bad


def test_the_check_sees_a_subnormal_literal():
    src = "import triton\n@triton.jit\ndef k(x):\n    return x + 1e-38\n"
    assert out_of_fp32_literals(src) == [("k", 4, 1e-38)]
    assert out_of_fp32_literals(src.replace("1e-38", "1e-30")) == []


@pytest.mark.parametrize("path", sorted(KERNEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_kernel_float_literals_are_fp32(path):
    bad = out_of_fp32_literals(path.read_text())
    assert not bad, f"{path.name}: float literals Triton 3.6 would type as fp64: {bad}"
