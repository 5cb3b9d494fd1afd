"""Shared pieces of the sm_90 AOT compile scripts (bench/aot_*.py): no GPU needed.

- signature(K, ptrs, ints, floats): ASTSource signature, constexprs and attributes as a launch would
  specialise them (pointers and ints divisible by 16 get tt.divisibility, ints equal to 1 become
  constexprs; every other parameter is a constexpr the caller fills in);
- cubin_tool(triton): cuobjdump (on PATH or shipped with triton);
- stats(kernel, tool): registers / spills / shared memory, wgmma or mma.sync;
- fingerprint(kernel): a hash of the PTX without debug locations: two sources that compile to the same
  instructions (e.g. a refactor into @triton.jit helpers, which are inlined) get the same fingerprint.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile


def signature(K, ptrs, ints, floats=()):
    sig, const, attrs = {}, {}, {}
    for i, nme in enumerate(K.arg_names):
        if nme in ptrs:
            sig[nme] = ptrs[nme]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif nme in floats:
            sig[nme] = "fp32"
        elif nme in ints:
            val = ints[nme]
            if val == 1:
                sig[nme] = "constexpr"
                const[nme] = 1
            else:
                sig[nme] = "i32"
                if val % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[nme] = "constexpr"
    return sig, const, attrs


def cubin_tool(triton):
    tool = shutil.which("cuobjdump")
    if tool is None:
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        tool = cand if os.path.exists(cand) else None
    return tool


def stats(kernel, tool):
    md = kernel.metadata
    regs = getattr(md, "n_regs", None) if not isinstance(md, dict) else md.get("n_regs")
    spills = getattr(md, "n_spills", None) if not isinstance(md, dict) else md.get("n_spills")
    smem = md.shared if not isinstance(md, dict) else md.get("shared")
    res = {}
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m:
            res = dict(zip(("cubin_regs", "stack", "shared_static", "local"), map(int, m.groups())))
    ptx = kernel.asm.get("ptx", "")
    # fp64: PTX instructions on .f64 (a literal outside fp32's normal range is fp64 in Triton 3.6: run 6's LSE bug)
    return dict(regs=regs, spills=spills, shared=smem, wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                fp64=len(re.findall(r"^\s*\S+\.f64\b|\.f64\s", ptx, flags=re.M)), **res)


def fingerprint(kernel):
    """sha1 (12 hex) of the PTX instructions: the DWARF sections, .loc / .file lines, debug-scope labels
    and comments removed."""
    ptx = kernel.asm.get("ptx", "")
    m = re.search(r"^\s*\.section\s+\.debug", ptx, flags=re.M)
    if m:
        ptx = ptx[:m.start()]
    # $L__tmpN: labels that only delimit debug scopes (inlined @triton.jit helpers add some)
    keep = [ln for ln in ptx.splitlines() if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp\d+:)", ln)]
    return hashlib.sha1("\n".join(keep).encode()).hexdigest()[:12]


def sm90_compiler(width=52):
    """comp(name, kernel, ptrs, ints, floats, constexprs, num_warps, num_stages=3): compile `kernel` (a
    JITFunction; triton imported by the caller after any --triton path) for sm_90 as a launch would specialise
    it, print its stats line and return the compiled kernel (None on failure, with the error printed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = cubin_tool(triton)
    print(f"triton {triton.__version__}, sm_90 (regs/thread, spill bytes, shared bytes)")

    def comp(name, K, ptrs, ints, floats, const, nw, ns=3):
        sig, c0, attrs = signature(K, ptrs, ints, floats)
        c0.update(const)
        label = f"{name:<{width}} warps {nw:>2} stages {ns}"
        try:
            k = triton.compile(ASTSource(K, sig, c0, attrs), target=GPUTarget("cuda", 90, 64),
                               options=dict(num_warps=nw, num_stages=ns))
            print(f"{label}: {stats(k, tool)}", flush=True)
            return k
        except Exception as e:  # noqa: BLE001
            print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return comp
