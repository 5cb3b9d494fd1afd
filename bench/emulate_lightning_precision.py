"""Precision of the lightning forward's 16-bit operand sites, emulated in PyTorch on the CPU (no kernel runs here):
the block algorithm of the chunk-output kernel (64-token blocks, fp32 state and accumulation) with the three
intermediates that meet a tensor-core product (decayed score tile A, state S, decay-weighted v W) rounded as each
path rounds them, on bf16-valued q, k, v (RMS-normalised scale), 4K tokens, five SALA heads, against fp64:

- fla on fp32 copies (the released model's call): TF32 operands (11-bit significand), fp32 output;
- ours, bf16 default: A, S, W rounded to bf16, bf16 output;
- ours, SALA_LIGHTNING_16BIT_DOT=split: A, S, W as bf16 hi + lo pairs, bf16 output;
and which of the three sites matter. Numbers in bench/NOTES_lightning.md (session 12).

    python bench/emulate_lightning_precision.py      (~5 min on 2 cores)
"""
import argparse
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
import torch, math  # noqa: E402
torch.manual_seed(0)
def r_bf16(x): return x.to(torch.bfloat16).float()
def r_tf32(x):
    b = x.float().contiguous().view(torch.int32)
    b = (b + 0x0FFF + ((b >> 13) & 1)) & ~0x1FFF
    return b.view(torch.float32)
def r_split(x):  # hi + lo bf16
    h = r_bf16(x); return h + r_bf16(x - h)
def r_split_trunc(x):  # hi = x with its low 16 bits cleared (the kernel's split_hi_lo), lo rounded
    h = (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32); return h + r_bf16(x - h)
def ident(x): return x.float()
T, D, BT = 4096, 128, 64
Hs = [0, 8, 16, 24, 31]
slopes = torch.tensor([2 ** (-8 * (h + 1) / 32) for h in Hs], dtype=torch.float64)
H = len(Hs)
q = torch.randn(T, H, D) / D ** 0.25
k = torch.randn(T, H, D) / D ** 0.25
v = torch.randn(T, H, D)
q, k, v = r_bf16(q), r_bf16(k), r_bf16(v)   # the model's bf16 activations
scale = D ** -0.5
def ref():
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for h in range(H):
        lam = math.exp(-slopes[h].item())
        t = torch.arange(T, dtype=torch.float64)
        S = torch.zeros(D, D, dtype=torch.float64)
        qq, kk, vv = q[:, h].double(), k[:, h].double(), v[:, h].double()
        for b0 in range(0, T, BT):
            i = torch.arange(BT, dtype=torch.float64)
            dm = torch.where(i[:, None] >= i[None, :], lam ** (i[:, None] - i[None, :]), 0.0)
            qb, kb, vb = qq[b0:b0+BT], kk[b0:b0+BT], vv[b0:b0+BT]
            out[b0:b0+BT, h] = ((qb @ S) * (lam ** (i + 1))[:, None] + ((qb @ kb.T) * dm) @ vb) * scale
            S = lam ** BT * S + kb.T @ (vb * (lam ** (BT - 1 - i))[:, None])
    return out
def emul(rA, rS, rW, rQKV=ident):
    out = torch.zeros(T, H, D)
    for h in range(H):
        lam = math.exp(-slopes[h].item())
        S = torch.zeros(D, D)
        qq, kk, vv = rQKV(q[:, h]), rQKV(k[:, h]), rQKV(v[:, h])
        i = torch.arange(BT, dtype=torch.float64)
        dm = torch.where(i[:, None] >= i[None, :], lam ** (i[:, None] - i[None, :]), 0.0).float()
        wq = (lam ** (i + 1)).float(); wk = (lam ** (BT - 1 - i)).float()
        for b0 in range(0, T, BT):
            qb, kb, vb = qq[b0:b0+BT], kk[b0:b0+BT], vv[b0:b0+BT]
            A = (qb.double() @ kb.double().T).float() * dm
            o = (qb.double() @ rS(S).double()).float() * wq[:, None] + (rA(A).double() @ vb.double()).float()
            out[b0:b0+BT, h] = o * scale
            S = lam ** BT * S + (kb.double().T @ rW(vb * wk[:, None]).double()).float()
    return out
R = ref()
def rel(o): return ((o.double() - R).norm() / R.norm()).item()
def relh(o): return [round(((o[:, h].double() - R[:, h]).norm() / R[:, h].norm()).item(), 6) for h in range(H)]
res = {
 "fla fp32 (TF32 operands)": emul(r_tf32, r_tf32, r_tf32, r_tf32),
 "ours bf16 default": r_bf16(emul(r_bf16, r_bf16, r_bf16)),
 "ours bf16 split": r_bf16(emul(r_split, r_split, r_split)),
 "ours bf16 split, o fp32": emul(r_split, r_split, r_split),
 "ours bf16 split, truncated hi": r_bf16(emul(r_split_trunc, r_split_trunc, r_split_trunc)),
}
res["fla fp32, o rounded to bf16"] = r_bf16(res["fla fp32 (TF32 operands)"])
for kname, o in res.items():
    print(f"{kname:32s} {rel(o):.3e}  per head {relh(o)}")
print("bf16 rounding of the exact output:", f"{rel(r_bf16(R.float())):.3e}")
print("--- one site split at a time (bf16 output)")
for name, args in {"split S only": (r_bf16, r_split, r_bf16), "split A only": (r_split, r_bf16, r_bf16),
                   "split W only": (r_bf16, r_bf16, r_split), "split S+A": (r_split, r_split, r_bf16),
                   "split S+W": (r_bf16, r_split, r_split), "split A+W": (r_split, r_bf16, r_split)}.items():
    o = r_bf16(emul(*args)); print(f"{name:32s} {rel(o):.3e}  per head {relh(o)}")
