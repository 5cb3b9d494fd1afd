"""MiniCPM-SALA assembled from sala_ops parts (spec: ../shared/spec/minicpm-sala.md, the 9B config
in minicpm_sala_9b.json beside it).

    python examples/minicpm_sala_9b.py --tiny                      # CPU: a 4-layer model, checks + greedy tokens
    python examples/minicpm_sala_9b.py --weights DIR --prompt-ids 1,2,3   # the released 9B safetensors
    python examples/minicpm_sala_9b.py --prefill 1048576 --chunk 65536     # GPU: 1M-token prefill, random bf16 weights

The model: 32 pre-norm decoder layers, each `h = x + a * Mixer(RMSNorm(x))`, `x' = h + a * MLP(RMSNorm(h))`
with a = scale_depth / sqrt(num_layers); embeddings times scale_emb; the final hidden state divided by
hidden_size / dim_model_base before the untied LM head; logits in fp32. Mixers by `mixer_types`:
"minicpm4" -> sala_ops.SparseMixer (InfLLM-V2, NoPE, output gate), "lightning-attn" ->
sala_ops.LightningMixer (q/k RMSNorm + RoPE, decay, o_norm, z gate). Parameter names are the
released checkpoint's (spec section 5), so its safetensors load with strict name checks.

Long prefill runs in chunks through a sala_ops.SalaCache: lightning layers carry their fp32 state,
sparse layers keep the full K/V (+ compressed keys) in a SparseLayerCache and attend with each chunk's
queries over every cached key (bottom-right aligned), so activations stay O(chunk) while the context
grows to 1M tokens. Each generated token then takes the sparse decode path (sparse_decode_step on the
cached compressed keys, no recompression of the prefix). The cache is preallocated to prompt + new
tokens (SalaCache(max_length=...)), so nothing is reallocated during prefill or decode.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import sala_ops
from sala_ops.cache import SalaCache
from sala_ops.layers import MIXER_SPARSE, LightningMixer, RMSNorm, SparseMixer

SPARSE_LAYERS_9B = (0, 9, 16, 17, 22, 29, 30, 31)  # spec section 1: the released model's sparse layers


@dataclass
class SalaConfig:
    vocab_size: int = 73448
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    lightning_nh: int = 32
    lightning_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    # defaults = the released 9B config (minicpm_sala_9b.json); sparse_config {} = SparseConfig() = 9B's
    mixer_types: list = field(default_factory=lambda: ["minicpm4" if i in SPARSE_LAYERS_9B else "lightning-attn"
                                                       for i in range(32)])
    sparse_config: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            raw = json.load(f)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def tiny(cls):
        """A 4-layer model with the 9B's structure (one sparse layer in four, GQA group 4) and a sparse
        configuration small enough that the InfLLM-V2 path runs at a few hundred tokens on a CPU."""
        return cls(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, lightning_nh=4, lightning_head_dim=32,
                   mixer_types=["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"],
                   sparse_config=dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4,
                                      dense_len=64))

    def sparse(self) -> sala_ops.SparseConfig:
        keys = set(sala_ops.SparseConfig.__dataclass_fields__)
        return sala_ops.SparseConfig(**{k: v for k, v in self.sparse_config.items() if k in keys})


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SalaConfig, idx: int):
        super().__init__()
        if cfg.mixer_types[idx] == MIXER_SPARSE:
            self.self_attn = SparseMixer(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                         cfg.head_dim, cfg.sparse(), layer_idx=idx)
        else:
            self.self_attn = LightningMixer(cfg.hidden_size, cfg.lightning_nh, cfg.lightning_head_dim, layer_idx=idx,
                                            rope_theta=cfg.rope_theta, eps=cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.residual_scale = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)

    def forward(self, x, cache=None):
        h = x + self.residual_scale * self.self_attn(self.input_layernorm(x), cache=cache)[0]
        return h + self.residual_scale * self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: SalaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniCPMSALA(nn.Module):
    """The whole model. `forward(ids, cache)` returns fp32 logits of the last `logits_to_keep` tokens."""

    def __init__(self, cfg: SalaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, max_length: int | None = None) -> SalaCache:
        return SalaCache(mixer_types=self.cfg.mixer_types, max_length=max_length)

    def forward(self, input_ids, cache=None, logits_to_keep: int = 1):
        x = self.model.embed_tokens(input_ids) * self.cfg.scale_emb
        for layer in self.model.layers:
            x = layer(x, cache)
        x = self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        x = x / (self.cfg.hidden_size / self.cfg.dim_model_base)
        return self.lm_head(x).float()

    @torch.no_grad()
    def prefill(self, input_ids, chunk: int, cache=None):
        """Chunked prefill through the cache; returns (last-token logits, cache)."""
        cache = cache if cache is not None else self.new_cache(max_length=input_ids.shape[1])
        logits = None
        for s in range(0, input_ids.shape[1], chunk):
            logits = self(input_ids[:, s:s + chunk], cache)
        return logits, cache

    @torch.no_grad()
    def generate_greedy(self, input_ids, new_tokens: int, chunk: int = 65536):
        logits, cache = self.prefill(input_ids, chunk, self.new_cache(max_length=input_ids.shape[1] + new_tokens))
        out = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, cache)
        return torch.cat(out, 1)


def load_released_weights(model: MiniCPMSALA, folder: str, device="cpu"):
    """Load the released safetensors shards (spec section 5 names) into `model`, strictly: every
    parameter must be found and every tensor in the files must be used (rotary buffers and compressor
    weights do not exist in the release, and none are expected)."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    expected = dict(model.named_parameters())
    seen, unexpected = set(), []
    for path in files:
        for name, tensor in load_file(path, device=str(device)).items():
            if name not in expected:
                unexpected.append(name)
                continue
            p = expected[name]
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(tensor.to(p.dtype))
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    return model


def _tiny_demo():
    torch.manual_seed(0)
    cfg = SalaConfig.tiny()
    model = MiniCPMSALA(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 200))
    with torch.no_grad():
        full = model(ids)
        chunked, cache = model.prefill(ids, chunk=48)
    err = ((chunked - full).norm() / full.norm()).item()
    print(f"tiny MiniCPM-SALA ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, layers "
          f"{cfg.mixer_types}): chunked prefill vs one pass, rel err {err:.1e}; cache holds {cache.get_seq_length()} tokens")
    assert err < 1e-4, err
    print("greedy tokens:", model.generate_greedy(ids, 8, chunk=64).tolist())


def _long_prefill(T: int, chunk: int, layers: int | None):
    """Random bf16 9B weights on one GPU; prefill T tokens in chunks and report time and memory."""
    cfg = SalaConfig()
    if layers:  # a slice of the model with the same layer mix, for quick timing
        cfg.mixer_types = cfg.mixer_types[:layers]
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MiniCPMSALA(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    logits, cache = model.prefill(ids, chunk)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"prefill {T} tokens in chunks of {chunk}, {cfg.num_hidden_layers} layers: {dt:.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, logits finite: {bool(torch.isfinite(logits).all())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU demo on a 4-layer model")
    ap.add_argument("--weights", help="folder with the released safetensors (and config.json)")
    ap.add_argument("--prompt-ids", default="1", help="comma-separated token ids for --weights")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prefill", type=int, help="GPU: prefill this many random tokens")
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--layers", type=int, help="with --prefill: only the first N layers")
    args = ap.parse_args()
    if args.weights:
        cfg_path = os.path.join(args.weights, "config.json")
        cfg = SalaConfig.from_json(cfg_path) if os.path.exists(cfg_path) else SalaConfig()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = MiniCPMSALA(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
        load_released_weights(model, args.weights, device)
        ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]], device=device)
        print(model.generate_greedy(ids, args.new_tokens, args.chunk).tolist())
    elif args.prefill:
        _long_prefill(args.prefill, args.chunk, args.layers)
    else:
        _tiny_demo()


if __name__ == "__main__":
    main()
