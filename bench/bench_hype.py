"""Benchmark: sala_ops.hype_embed (fused per-head RMSNorm + RoPE of q and k, one launch) against
Hugging Face's LlamaRMSNorm (q_norm / k_norm, per head, as Qwen3 / MiniCPM-SALA apply them) followed by
`apply_rotary_pos_emb` from transformers.models.llama.modeling_llama, on the same bf16 inputs.

HF's cos/sin come from LlamaRotaryEmbedding(x, position_ids); a model builds them once per forward and
shares them across layers, so they are built outside the timed region (the peer is not charged for
them). Both sides are timed fwd and fwd+bwd (grads for q, k and both norm weights) with
triton.testing.do_bench medians after a warm-up. Achieved bandwidth = the minimum bytes the op must
move (fwd: read q, k, write two outputs; bwd additionally reads q, k and the two output grads and writes
dq, dk) / time, against the 4.2 TB/s H200 copy ceiling (a device-to-device copy is measured in the
same run too).

    python bench/bench_hype.py [--out DIR] [--tokens 8192 32768 131072] [--heads 32 --kv-heads 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

CEILING_TBS = 4.2


def hf_functions(D, theta, device):
    """(rms_norm_cls, apply_rotary_pos_emb, rotary_embedding_or_None, source)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: using an inline copy of HF's formulas", file=sys.stderr)
        return _InlineRMSNorm, _inline_apply_rotary_pos_emb, None, "inline copy of HF's formulas"
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
    import transformers
    cfg = LlamaConfig(hidden_size=D * 32, num_attention_heads=32, head_dim=D, rope_theta=theta,
                      max_position_embeddings=1 << 21)
    try:
        rotary = LlamaRotaryEmbedding(cfg).to(device)
    except Exception as e:  # noqa: BLE001  (config API drift: build cos/sin by hand the way HF does)
        print(f"LlamaRotaryEmbedding unavailable ({e!r}); building cos/sin by hand as HF does", file=sys.stderr)
        rotary = None
    return LlamaRMSNorm, apply_rotary_pos_emb, rotary, f"transformers {transformers.__version__}"


class _InlineRMSNorm(torch.nn.Module):
    """LlamaRMSNorm's forward, verbatim in behaviour (fallback when transformers is absent)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _inline_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def hf_cos_sin(rotary, x, position_ids, D, theta):
    if rotary is not None:
        return rotary(x, position_ids)
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=x.device).float() / D))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--theta", type=float, default=10000.0)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_hype needs a CUDA GPU"

    import triton
    from triton.testing import do_bench
    import sala_ops

    dev = torch.device("cuda")
    dt = torch.bfloat16
    H, HK, D, theta = args.heads, args.kv_heads, args.head_dim, args.theta
    RMSNorm, apply_rotary_pos_emb, rotary, hf_src = hf_functions(D, theta, dev)
    esize = torch.tensor([], dtype=dt).element_size()

    # the copy ceiling, measured here (read + write of 1 GiB)
    src = torch.empty(1 << 29, dtype=dt, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    copy_tbs = 2 * src.numel() * esize / copy_ms / 1e9
    del src, dst

    rows = []
    for T in args.tokens:
        torch.manual_seed(0)
        q = torch.randn(1, T, H, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(1, T, HK, D, device=dev, dtype=dt, requires_grad=True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        pos = torch.arange(T, device=dev)[None]
        q_norm, k_norm = RMSNorm(D, eps=1e-6).to(dev, dt), RMSNorm(D, eps=1e-6).to(dev, dt)
        with torch.no_grad():
            q_norm.weight.uniform_(0.5, 1.5)
            k_norm.weight.uniform_(0.5, 1.5)
        wq = q_norm.weight.detach().clone().requires_grad_()
        wk = k_norm.weight.detach().clone().requires_grad_()
        cos, sin = hf_cos_sin(rotary, q, pos, D, theta)  # shared by all layers of a model: not timed

        def ours():
            return sala_ops.hype_embed(q, k, pos, "lightning", theta=theta, q_norm_weight=wq, k_norm_weight=wk)

        def hf():
            qs = q_norm(q).transpose(1, 2)  # [B, H, T, D], as HF attention modules hold them
            ks = k_norm(k).transpose(1, 2)
            return apply_rotary_pos_emb(qs, ks, cos, sin)

        def fwd_bwd(fn):
            g = (gq.transpose(1, 2), gk.transpose(1, 2)) if fn is hf else (gq, gk)  # HF returns [B, H, T, D]

            def run():
                torch.autograd.backward(fn(), g)
            return run

        # agreement check of the two (both bf16; ours is the more accurate one: fp32 throughout)
        with torch.no_grad():
            oq, ok = ours()
            hq, hk = hf()
            agree = max(((oq.float() - hq.transpose(1, 2).float()).norm() / hq.float().norm()).item(),
                        ((ok.float() - hk.transpose(1, 2).float()).norm() / hk.float().norm()).item())
            del oq, ok, hq, hk

        grads = [q, k, wq, wk, q_norm.weight, k_norm.weight]
        res = {"T": T, "H": H, "HK": HK, "D": D, "dtype": "bf16", "hf_vs_ours_rel_diff": agree}
        nbytes_fwd = 2 * (q.numel() + k.numel()) * esize
        nbytes_fb = 5 * (q.numel() + k.numel()) * esize
        with torch.no_grad():
            res["ours_fwd_ms"] = do_bench(ours, warmup=100, rep=300)
            res["hf_fwd_ms"] = do_bench(hf, warmup=100, rep=300)
        res["ours_fwdbwd_ms"] = do_bench(fwd_bwd(ours), warmup=100, rep=300, grad_to_none=grads)
        res["hf_fwdbwd_ms"] = do_bench(fwd_bwd(hf), warmup=100, rep=300, grad_to_none=grads)
        for kind, nb in (("fwd", nbytes_fwd), ("fwdbwd", nbytes_fb)):
            for who in ("ours", "hf"):
                res[f"{who}_{kind}_tbs"] = nb / res[f"{who}_{kind}_ms"] / 1e9
            res[f"{kind}_speedup"] = res[f"hf_{kind}_ms"] / res[f"ours_{kind}_ms"]
            res[f"ours_{kind}_pct_ceiling"] = 100 * res[f"ours_{kind}_tbs"] / CEILING_TBS
        rows.append(res)
        del q, k, gq, gk, cos, sin
        torch.cuda.empty_cache()

    hdr = (f"{'T':>7} {'H/Hkv':>6} | {'ours fwd':>9} {'HF fwd':>9} {'x':>5} {'TB/s':>5} {'%4.2':>5} | "
           f"{'ours f+b':>9} {'HF f+b':>9} {'x':>5} {'TB/s':>5} {'%4.2':>5} | {'diff':>8}")
    print(f"\nhype_embed (RMSNorm + RoPE on q and k), bf16, D={D}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}, peer: {hf_src}")
    print(f"measured copy bandwidth: {copy_tbs:.2f} TB/s (ceiling used for %: {CEILING_TBS} TB/s); times in ms")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['T']:>7} {r['H']:>3}/{r['HK']:<2} | {r['ours_fwd_ms']:9.3f} {r['hf_fwd_ms']:9.3f} "
              f"{r['fwd_speedup']:5.1f} {r['ours_fwd_tbs']:5.2f} {r['ours_fwd_pct_ceiling']:5.1f} | "
              f"{r['ours_fwdbwd_ms']:9.3f} {r['hf_fwdbwd_ms']:9.3f} {r['fwdbwd_speedup']:5.1f} "
              f"{r['ours_fwdbwd_tbs']:5.2f} {r['ours_fwdbwd_pct_ceiling']:5.1f} | {r['hf_vs_ours_rel_diff']:8.1e}")

    from sala_ops.triton import rope_qknorm as K
    tuned = {name: {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()}
             for name, fn in (("fwd", K._hype_fwd_kernel), ("bwd", K._hype_bwd_kernel))}
    print("autotuned:", json.dumps(tuned))
    os.makedirs(args.out, exist_ok=True)
    out = {"op": "hype_embed", "peer": f"HF LlamaRMSNorm + apply_rotary_pos_emb ({hf_src})",
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_tbs_measured": copy_tbs, "ceiling_tbs": CEILING_TBS,
           "bytes_model": "fwd 2x(q+k), fwd+bwd 5x(q+k) bytes", "autotuned": tuned, "rows": rows}
    with open(os.path.join(args.out, "hype.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'hype.json')}")


if __name__ == "__main__":
    main()
