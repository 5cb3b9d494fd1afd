"""Whole-model prefill on one GPU: MiniCPM-SALA 9B (sala_ops, random bf16 weights) against a
Qwen3-8B-geometry full-attention model from transformers (random bf16 weights, SDPA), in one process.

    python bench/bench_model.py --out DIR [--T 32768 131072] [--long]

Time to last-token logits (`logits_to_keep=1`), wall clock around a synchronised call, after one
warm-up at the smallest T. SALA prefills in chunks of --chunk tokens through its cache (activations
O(chunk)); the Qwen3 model runs one unchunked forward, as the anchors do (ANCHORS.md: 32K 2.31 s,
128K 13.3 s, 256K 48.3 s, 512K out of memory). --long adds 256K (both), 512K and 1M (SALA only).
Writes DIR/model.json.
"""
import argparse
import gc
import json
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import minicpm_sala_9b as sala9b  # noqa: E402


def _time(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30, out


def _sweep(name, model, vocab, Ts, call):
    """Time call(model, ids) at each T (the first, smallest T once more as warm-up), then free the model."""
    rows = []
    for i, T in enumerate([min(Ts)] + list(Ts)):
        ids = torch.randint(0, vocab, (1, T), device="cuda")
        try:
            with torch.no_grad():
                dt, peak, logits = _time(lambda: call(model, ids, T))
            row = dict(model=name, T=T, seconds=dt, peak_gib=peak, finite=bool(torch.isfinite(logits).all()))
        except torch.cuda.OutOfMemoryError:
            row = dict(model=name, T=T, seconds=None, peak_gib=None, finite=None, note="OOM")
        if i:  # the first pass is the warm-up (Triton compilation, cuBLAS handles)
            rows.append(row)
            print(row, flush=True)
        del ids
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def bench_sala(Ts, chunk):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = sala9b.MiniCPMSALA(sala9b.SalaConfig()).to(torch.bfloat16).eval()
    return _sweep("sala-9b", model, 73448, Ts, lambda m, ids, T: m.prefill(ids, min(chunk, T))[0])


def bench_qwen3(Ts):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 20,
                      attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    return _sweep("qwen3-8b-geometry", model, 151936, Ts,
                  lambda m, ids, T: m(ids, logits_to_keep=1, use_cache=False).logits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--long", action="store_true")
    args = ap.parse_args()
    both = list(args.T) + ([262144] if args.long else [])
    sala_only = [524288, 1048576] if args.long else []
    rows = bench_sala(both + sala_only, args.chunk) + bench_qwen3(both)
    by = {(r["model"], r["T"]): r["seconds"] for r in rows}
    print(f"{'T':>8} | {'SALA s':>8} | {'Qwen3 s':>8} | speedup")
    for T in both + sala_only:
        s, q = by.get(("sala-9b", T)), by.get(("qwen3-8b-geometry", T))
        ratio = f"{q / s:.2f}x" if s and q else "-"
        print(f"{T:>8} | {s if s is None else f'{s:8.2f}'} | {q if q is None else f'{q:8.2f}'} | {ratio}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "model.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
