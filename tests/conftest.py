"""Test harness shared by every test file.

- Without CUDA, the Triton kernels run on the CPU through the Triton interpreter: TRITON_INTERPRET
  must be set before triton is imported, so it is set here, at collection, before any sala_ops
  kernel module loads. (bf16 tl.dot is unreliable under the interpreter: kernel tests on CPU use
  fp32/fp16.)
- `gpu` marks tests that need CUDA; they are skipped without it.
- Under the interpreter every kernel launch is checked (tests/interp_checks.py): an unmasked access
  outside the launch's tensor arguments, or an element one program stores and another program of the
  same launch stores or reads, fails the test. SALA_INTERP_CHECKS=0 turns it off.
- Hypothesis profiles: "ci" (default, few examples: the interpreter is slow) and "gpu" (more).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("gpu", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SALA_INTERP_CHECKS", "1") != "0":
    import interp_checks  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
    interp_checks.install()
# The device kernel tests run on: the GPU when there is one, else the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
