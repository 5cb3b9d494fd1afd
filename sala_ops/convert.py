"""convert_to_sala: turn a trained Hugging Face causal LM into a SALA hybrid (spec section 6).

    from sala_ops.convert import convert_to_sala
    model = AutoModelForCausalLM.from_pretrained(...)          # Llama, Qwen2, Qwen3 or Mistral
    convert_to_sala(model)                                     # in place; returns the same object
    model.save_pretrained(d); AutoModelForCausalLM.from_pretrained(d)   # after `import sala_ops.convert`

Every decoder layer's attention module is replaced: the chosen 25% become `SparseMixer`
(InfLLM-V2, NoPE), the others `LightningMixer`. Everything else (embeddings, norms, MLPs, head)
is untouched.

Design decisions
- Model classes. One registered pair per supported base: `Sala<Base>Config(<Base>Config)` with
  model_type "sala_<base>" (sala_llama, sala_qwen2, sala_qwen3, sala_mistral) and
  `Sala<Base>ForCausalLM(<Base>ForCausalLM)`, registered with AutoConfig / AutoModelForCausalLM when
  this module is imported. The subclass builds the base model and swaps each layer's `self_attn`
  for the mixer named by `config.mixer_types`, so checkpoints hold plain weights under the spec's
  names (`model.layers.i.self_attn.{q,k,v,o,z}_proj`, `o_gate`, `q_norm`, ...) and load without
  remote code. Conversion swaps the instance's class to the Sala subclass and its config to the
  Sala config (same fields plus `mixer_types`, `sparse_config`, `sala_base_model_type`).
- Layer choice. Default: 1 sparse : 3 lightning, first and last layer sparse, the sparse layers
  spread evenly (n = max(2, round(L/4)) of L, indices round(i (L-1)/(n-1))). "halo": the data-driven
  choice of spec section 6 (see `halo_scores`).
- Weight transfer. Sparse layers keep q/k/v/o. Lightning layers copy q/o and k/v with the K/V rows
  repeated per query head (GQA -> MHA: query head h reads source K/V head h // group, as HF's
  repeat_kv does); q_norm/k_norm are ones, or copied from a Qwen3 source's per-head QK-norm.
- New gates start at the identity. `o_gate` (sparse) and `z_proj` (lightning) start at zero, so
  every gate is sigmoid(0) = 0.5, its steepest point (largest gradient), and `o_proj` is multiplied
  by 2 so that 2 W (x * 0.5) = W x: the gate's first effect on the output is nil. A sparse layer then
  computes exactly the source attention except for RoPE (SALA sparse layers are NoPE) and the
  dropped QK-norm of a Qwen3 source; below dense_len its attention is plain causal softmax. A
  zero-weight, large-bias gate would also start near 1, but the released format has no gate bias
  and sigmoid near 1 passes almost no gradient. Lightning layers cannot reproduce softmax attention
  at init, but they start at the source's output scale: `o_norm`'s weight is, with
  `calibration_ids`, the per-channel RMS of the source attention output (the input of its o_proj)
  on those tokens, and without data the RMS of the source's values v = W_v u for unit-variance
  normed inputs (`value_rms`, an upper bound of the attention output's scale). Ones would start the
  layer orders of magnitude off for models whose attention outputs are small. Stage-1 alignment training (examples/convert_and_train.py) does the rest.
- RoPE on lightning layers uses the source's theta and rotary fraction (plain RoPE; a source with a
  scaled RoPE type such as llama3 or yarn gets a warning: the lightning layers use unscaled RoPE).
  Mistral's sliding window is not carried over (sparse layers keep the whole cache).
- Batches: no padding. The converted model refuses a padded `attention_mask` (batched generation
  needs equal-length prompts) and position_ids that restart unless HF's packing kwargs come with them
  (`cu_seq_lens_q`, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes; or call the
  mixers with cu_seqlens). It creates a `SalaCache` whenever use_cache is on, except for packed inputs
  without an explicit use_cache (a packed batch cannot fill a cache). The inner model gets an empty 4-D
  attention_mask, so HF builds no causal mask (O(T^2) with 'eager') that no mixer would read.
"""
from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from .cache import SalaCache
from .layers import MIXER_LIGHTNING, MIXER_SPARSE, LightningMixer, SparseMixer
from .sparse import SparseConfig

HALO_CLIP = 50.0


# ---------------------------------------------------------------------------------------------------
# Registered config and model classes
# ---------------------------------------------------------------------------------------------------

class _SalaConfigMixin:
    """What the Sala<Base>Config classes add to their base config."""

    def to_dict(self):
        """The base config's to_dict with `sparse_config` as a plain dict: a config written by hand may hold a
        SparseConfig (the model builds from either), which json cannot serialise (save_pretrained, print(config))."""
        d = super().to_dict()
        if isinstance(d.get("sparse_config"), SparseConfig):
            d["sparse_config"] = asdict(d["sparse_config"])
        return d


class SalaLlamaConfig(_SalaConfigMixin, LlamaConfig):
    model_type = "sala_llama"


class SalaQwen2Config(_SalaConfigMixin, Qwen2Config):
    model_type = "sala_qwen2"


class SalaQwen3Config(_SalaConfigMixin, Qwen3Config):
    model_type = "sala_qwen3"


class SalaMistralConfig(_SalaConfigMixin, MistralConfig):
    model_type = "sala_mistral"


class _SalaCausalLM:
    """Mixin for the Sala<Base>ForCausalLM classes: build the base model, then swap every layer's
    attention for the mixer its `config.mixer_types` entry names."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _check_sala_config(config)
        sparse_cfg = sparse_config_from(config)
        for i, layer in enumerate(_decoder_layers(self)):
            layer.self_attn = _new_mixer(layer.self_attn, config.mixer_types[i], config, i, sparse_cfg)
        # The base class's post_init initialised (and flagged) every module before the swap, so the new mixers
        # still had PyTorch's default init (kaiming-uniform, std ~ 1/sqrt(3 fan_in), far above initializer_range)
        # in a model built from its config. init_weights only touches modules without the `_is_hf_initialized`
        # flag (the mixers), and does nothing on the meta device from_pretrained builds on (the checkpoint fills them).
        self.init_weights()
        _install_hooks(self)


class SalaLlamaForCausalLM(_SalaCausalLM, LlamaForCausalLM):
    config_class = SalaLlamaConfig


class SalaQwen2ForCausalLM(_SalaCausalLM, Qwen2ForCausalLM):
    config_class = SalaQwen2Config


class SalaQwen3ForCausalLM(_SalaCausalLM, Qwen3ForCausalLM):
    config_class = SalaQwen3Config


class SalaMistralForCausalLM(_SalaCausalLM, MistralForCausalLM):
    config_class = SalaMistralConfig


# model_type of the source -> (its causal LM class, Sala config class, Sala model class)
SUPPORTED = {
    "llama": (LlamaForCausalLM, SalaLlamaConfig, SalaLlamaForCausalLM),
    "qwen2": (Qwen2ForCausalLM, SalaQwen2Config, SalaQwen2ForCausalLM),
    "qwen3": (Qwen3ForCausalLM, SalaQwen3Config, SalaQwen3ForCausalLM),
    "mistral": (MistralForCausalLM, SalaMistralConfig, SalaMistralForCausalLM),
}

for _base, (_src, _cfg_cls, _model_cls) in SUPPORTED.items():
    try:
        AutoConfig.register(_cfg_cls.model_type, _cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(_cfg_cls, _model_cls, exist_ok=True)
    except TypeError:  # releases without exist_ok
        try:
            AutoConfig.register(_cfg_cls.model_type, _cfg_cls)
            AutoModelForCausalLM.register(_cfg_cls, _model_cls)
        except ValueError:
            pass


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def _supported_msg():
    return ", ".join(f"{k} ({v[0].__name__})" for k, v in SUPPORTED.items())


def _check_sala_config(config):
    L = config.num_hidden_layers
    mt = getattr(config, "mixer_types", None)
    if mt is None or len(mt) != L:
        raise ValueError(f"sala_ops: a SALA config needs `mixer_types` with one entry per layer ({L}), got {mt!r}")
    bad = [m for m in mt if m not in (MIXER_SPARSE, MIXER_LIGHTNING)]
    if bad:
        raise ValueError(f"sala_ops: mixer_types entries must be {MIXER_SPARSE!r} or {MIXER_LIGHTNING!r}, got {bad}")


def sparse_config_from(config) -> SparseConfig:
    """The SparseConfig recorded in a SALA config (`config.sparse_config`, a dict)."""
    sc = getattr(config, "sparse_config", None)
    if sc is None:
        return SparseConfig()
    if isinstance(sc, SparseConfig):
        return sc
    fields = set(SparseConfig.__dataclass_fields__)
    return SparseConfig(**{k: v for k, v in dict(sc).items() if k in fields})


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"sala_ops.convert_to_sala: expected a causal LM with `.model.layers` (e.g. "
                         f"LlamaForCausalLM), got {type(model).__name__}")
    return layers


def _rope_settings(config, head_dim):
    rp = getattr(config, "rope_parameters", None) or {}
    if hasattr(rp, "get") and "rope_theta" not in rp and "full_attention" in rp:  # per-layer-type dicts
        rp = rp["full_attention"]
    theta = rp.get("rope_theta") if hasattr(rp, "get") else None
    if theta is None:
        theta = getattr(config, "rope_theta", None) or 10000.0
    rope_type = (rp.get("rope_type") or rp.get("type") or "default") if hasattr(rp, "get") else "default"
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = (rp.get("partial_rotary_factor") if hasattr(rp, "get") else None) or \
        getattr(config, "partial_rotary_factor", None) or 1.0
    rotary_dim = int(head_dim * factor) // 2 * 2
    return float(theta), rotary_dim, rope_type


def _new_mixer(attn, kind, config, layer_idx, sparse_cfg):
    """A fresh (untrained) mixer shaped like the source attention module `attn`."""
    H, Hkv, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    D = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or hidden // H
    qkv_bias = getattr(attn.q_proj, "bias", None) is not None
    o_bias = getattr(attn.o_proj, "bias", None) is not None
    if kind == MIXER_SPARSE:
        m = SparseMixer(hidden, H, Hkv, D, sparse_cfg, layer_idx, qkv_bias, o_bias)
    elif kind == MIXER_LIGHTNING:
        theta, rotary_dim, _ = _rope_settings(config, D)
        m = LightningMixer(hidden, H, D, layer_idx, theta, rotary_dim, config.rms_norm_eps, qkv_bias, o_bias)
    else:
        raise ValueError(f"sala_ops: unknown mixer type {kind!r}")
    w = attn.q_proj.weight
    return m.to(device=w.device, dtype=w.dtype)


def expand_kv_rows(weight: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """GQA -> MHA: rows [Hkv*D, ...] -> [H*D, ...], query head h getting K/V head h // (H/Hkv)."""
    group = num_heads // num_kv_heads
    x = weight.reshape(num_kv_heads, -1, *weight.shape[1:])
    return x.repeat_interleave(group, dim=0).reshape(num_heads * x.shape[1], *weight.shape[1:])


def _input_norm_weight(layer):
    norm = getattr(layer, "input_layernorm", None)
    return getattr(norm, "weight", None)


@torch.no_grad()
def value_rms(attn, num_heads, head_dim, input_norm_weight=None) -> torch.Tensor:
    """Data-free scale of the source attention output, per channel of the expanded width [H*D]: the
    RMS of v = W_v u when u is the layer's normed input (unit-variance entries times the input
    RMSNorm weight g, if given): sqrt(sum_j W_v[c, j]^2 g_j^2 (+ bias^2)). Softmax attention averages
    values, so this bounds its output scale from above; it is the lightning o_norm's start when no
    calibration data is given."""
    w = attn.v_proj.weight.float()
    if input_norm_weight is not None:
        w = w * input_norm_weight.float()[None, :]
    ms = w.pow(2).sum(1)
    if attn.v_proj.bias is not None:
        ms = ms + attn.v_proj.bias.float().pow(2)
    return expand_kv_rows(ms.sqrt().clamp_min(1e-6), w.shape[0] // head_dim, num_heads)


@torch.no_grad()
def _transfer(mixer, attn, o_norm_weight=None, input_norm_weight=None):
    """Copy the source attention's weights into a new mixer (see the module doc for the choices)."""
    def copy(dst: nn.Linear, src: nn.Linear, rows=None, factor=1.0):
        w, b = src.weight, src.bias
        if rows is not None:
            w = rows(w)
            b = None if b is None else rows(b)
        dst.weight.copy_(w * factor)
        if dst.bias is not None:
            dst.bias.copy_(b)

    copy(mixer.q_proj, attn.q_proj)
    if isinstance(mixer, SparseMixer):
        copy(mixer.k_proj, attn.k_proj)
        copy(mixer.v_proj, attn.v_proj)
        mixer.o_gate.weight.zero_()
    else:
        Hkv = attn.k_proj.weight.shape[0] // mixer.head_dim
        rows = lambda t: expand_kv_rows(t, Hkv, mixer.num_heads)  # noqa: E731
        copy(mixer.k_proj, attn.k_proj, rows)
        copy(mixer.v_proj, attn.v_proj, rows)
        mixer.z_proj.weight.zero_()
        for name in ("q_norm", "k_norm"):
            src = getattr(attn, name, None)
            w = getattr(src, "weight", None)
            getattr(mixer, name).weight.copy_(w if w is not None and w.shape == (mixer.head_dim,)
                                              else torch.ones(mixer.head_dim))
        if o_norm_weight is None:
            o_norm_weight = value_rms(attn, mixer.num_heads, mixer.head_dim, input_norm_weight)
        mixer.o_norm.weight.copy_(o_norm_weight)
    # the gate starts at sigmoid(0) = 0.5; doubling o_proj makes it start as the identity
    mixer.o_proj.weight.copy_(attn.o_proj.weight * 2)
    if mixer.o_proj.bias is not None:
        mixer.o_proj.bias.copy_(attn.o_proj.bias)


@torch.no_grad()
def attention_output_rms(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the per-channel RMS [H*D] of the attention output (the input of o_proj) of `model`
    on `input_ids`, in eval mode (no dropout). Used to initialise the lightning layers' o_norm at the source's scale."""
    layers = _decoder_layers(model)
    sums = [None] * len(layers)
    count = [0]
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, i=i):
            x = args[0].float()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s
            if i == 0:
                count[0] += x.numel() // x.shape[-1]
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()  # the outputs the model gives, not dropped-out ones (a model built from its config is in train mode)
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [(s / max(count[0], 1)).sqrt().clamp_min(1e-6) for s in sums]


# ---------------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------------

def default_sparse_layers(num_layers: int, ratio: float = 0.25) -> list[int]:
    """1 sparse : 3 lightning with the first and last layer sparse and the rest spread evenly."""
    if num_layers < 1:
        raise ValueError(f"sala_ops: num_layers must be >= 1, got {num_layers}")
    n = min(num_layers, max(2, round(num_layers * ratio)))
    if n == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def halo_importance(rt: Sequence[float], cs: Sequence[float], clip: float = HALO_CLIP) -> list[float]:
    """Spec section 6: importance_l = (max RT - RT_l) / (max CS - CS_l + 1e-10), clipped at `clip`.
    RT_l / CS_l are the recall and general scores (higher = better) with layer l made linear."""
    max_rt, max_cs = max(rt), max(cs)
    return [min((max_rt - r) / (max_cs - c + 1e-10), clip) for r, c in zip(rt, cs)]


def synthetic_recall_score(model, vocab_size: int, batch: int = 4, length: int = 64, seed: int = 0) -> float:
    """A cheap retrieval probe (RT): random tokens repeated twice; the score is the mean log-probability
    of the second copy (the model must look the next token up in the first copy)."""
    g = torch.Generator().manual_seed(seed)
    lo = min(4, vocab_size - 1)
    x = torch.randint(lo, vocab_size, (batch, length), generator=g)
    ids = torch.cat([x, x], dim=1).to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, length - 1: -1], dim=-1)
    return logp.gather(-1, ids[:, length:, None]).mean().item()


def lm_score(model, input_ids: torch.Tensor) -> float:
    """General-task score (CS): minus the mean next-token cross-entropy on `input_ids` [B, T] (int64 or int32)."""
    ids = input_ids.to(model.device, torch.long)  # cross_entropy takes int64 targets only
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return -nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def halo_scores(model, evaluate: Callable, candidates: Sequence[int], o_norm_rms=None):
    """Replace one layer at a time by its lightning version (converted weights, not trained) and run
    `evaluate(model) -> (RT, CS)` (with the model's use_cache off: see below). Returns ({layer: (RT, CS)},
    {layer: importance})."""
    layers = _decoder_layers(model)
    config = model.config
    results = {}
    # The model being scored mixes source attention layers with one lightning layer: no cache class serves both
    # (HF would hand the lightning layer a DynamicCache, which it refuses), so the evaluation runs with the cache
    # off by default (model(x) and generate() recompute instead); the settings are restored afterwards.
    gen_cfg = getattr(model, "generation_config", None)
    saved = (config.use_cache, getattr(gen_cfg, "use_cache", None))
    config.use_cache = False
    if gen_cfg is not None:
        gen_cfg.use_cache = False
    try:
        for i in candidates:
            attn = layers[i].self_attn
            lin = _new_mixer(attn, MIXER_LIGHTNING, config, i, None)
            _transfer(lin, attn, None if o_norm_rms is None else o_norm_rms[i], _input_norm_weight(layers[i]))
            layers[i].self_attn = lin
            try:
                rt, cs = evaluate(model)
            finally:
                layers[i].self_attn = attn
            results[i] = (float(rt), float(cs))
    finally:
        config.use_cache = saved[0]
        if gen_cfg is not None:
            gen_cfg.use_cache = saved[1]
    imp = halo_importance([results[i][0] for i in candidates], [results[i][1] for i in candidates])
    return results, dict(zip(candidates, imp))


def _halo_select(model, n_sparse, halo_eval, halo_text_ids, o_norm_rms, verbose):
    L = len(_decoder_layers(model))
    fixed = sorted({0, L - 1})
    candidates = [i for i in range(L) if i not in fixed]
    if not candidates:
        # one or two layers: first and last are every layer, nothing to score (halo_importance would take the
        # max of an empty list)
        return fixed, {}, {}
    if halo_eval is None:
        if halo_text_ids is None:
            raise ValueError("sala_ops.convert_to_sala: sparse_layers='halo' needs a general-task score: pass "
                             "halo_text_ids (token ids of ordinary text, [B, T]) for the built-in evaluation "
                             "(synthetic recall + LM loss), or halo_eval=callable(model) -> (RT, CS)")
        vocab = model.config.vocab_size
        halo_eval = lambda m: (synthetic_recall_score(m, vocab), lm_score(m, halo_text_ids))  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        results, imp = halo_scores(model, halo_eval, candidates, o_norm_rms)
    finally:
        model.train(was_training)
    ranked = sorted(candidates, key=lambda i: (-imp[i], i))
    chosen = sorted(fixed + ranked[: max(0, n_sparse - len(fixed))])
    if verbose:
        for i in candidates:
            print(f"[sala halo] layer {i:3d}: RT={results[i][0]:.4f} CS={results[i][1]:.4f} importance={imp[i]:.3f}")
        print(f"[sala halo] sparse layers: {chosen}")
    return chosen, results, imp


# ---------------------------------------------------------------------------------------------------
# Runtime guards and the cache
# ---------------------------------------------------------------------------------------------------

def _sala_pre_forward(module, args, kwargs):
    """Before the inner (decoder) model runs: refuse padding / packing it cannot honour, and make
    sure the cache is a SalaCache."""
    sig = getattr(module, "_sala_forward_params", None)
    if sig is None:
        sig = module._sala_forward_params = list(inspect.signature(module.forward).parameters)
    if args:
        names = [p for p in sig if p not in ("self", "args", "kwargs")]
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
    cache_key = "cache" if "cache" in sig else "past_key_values"
    for alias in ("cache", "past_key_values"):
        if alias != cache_key and alias in kwargs:
            kwargs[cache_key] = kwargs.pop(alias)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("sala_ops: a converted SALA model takes a 2-D attention_mask [batch, seq] of ones (or "
                             f"none); got {getattr(mask, 'shape', type(mask).__name__)}. Custom 4-D masks are not "
                             "supported: causality is built into the SALA mixers.")
        prev = kwargs.get(cache_key)
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        decoding = isinstance(prev, SalaCache) and prev.get_seq_length() > 0 and ids is not None and ids.shape[1] == 1
        # a decode step's mask only adds a column for the new token: the rest was checked with the prompt,
        # so generate() pays no host sync per token here
        if not decoding and not bool(mask.bool().all()):
            raise ValueError("sala_ops: padded batches are not supported by the SALA mixers (the lightning "
                             "recurrence and the sparse block selection would read the padding). Use equal-length "
                             "prompts (batch size 1 always works) or pack sequences and call the mixers with "
                             "cu_seqlens.")
        kwargs["attention_mask"] = None
    cfg = module.config
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(cfg, "use_cache", False)
    cache = kwargs.get(cache_key)
    if cache is not None and not isinstance(cache, SalaCache):
        if cache.get_seq_length() != 0:
            raise TypeError(f"sala_ops: a converted SALA model needs a sala_ops.cache.SalaCache, got a filled "
                            f"{type(cache).__name__}")
        cache = None
    if cache is not None and list(cache.mixer_types) != list(cfg.mixer_types):
        # checked before any layer runs: the first layer that did not fit used to raise (an IndexError for too few
        # entries) after the layers before it had appended the input, leaving the cache half updated
        raise ValueError(f"sala_ops: the SalaCache was built for mixer_types {cache.mixer_types}, but the model's "
                         f"layers are {list(cfg.mixer_types)}; build it with SalaCache(model.config)")
    if cache is None and kwargs.get("cu_seq_lens_q") is not None and kwargs.get("use_cache") is None:
        # packed sequences (HF's packing collator passes cu_seq_lens_q and no use_cache): the mixers cannot
        # combine them with a cache, so config.use_cache (True by default) must not create one, here or in
        # the HF model (it would build a DynamicCache from the config). An explicit use_cache=True still
        # reaches the mixers' clear error.
        use_cache = False
        kwargs["use_cache"] = False
    if cache is None and use_cache:
        cache = SalaCache(cfg)
    kwargs[cache_key] = cache
    pos = kwargs.get("position_ids")
    if pos is not None and kwargs.get("cu_seq_lens_q") is None and pos.shape[-1] > 1:
        past = cache.get_seq_length() if cache is not None else 0
        expect = torch.arange(past, past + pos.shape[-1], device=pos.device)
        if not bool((pos == expect).all()):
            starts = sorted({int(x) for x in pos.reshape(-1, pos.shape[-1])[:, 0].tolist()})
            if past and starts[0] < past:
                # e.g. generate(prompt, cache=model(prompt).cache): the input repeats tokens the cache already holds
                # (the message blamed packing / padding, which the caller had not used)
                hint = (f"the input repeats positions the cache already holds ({past} tokens): pass only the tokens "
                        f"after the cached ones (for generate(): a cache without the prompt's last token), or a "
                        f"fresh cache")
            else:
                hint = ("restarting positions (packed sequences) or padding offsets are not supported by the SALA "
                        "mixers through the HF model (use the mixers with cu_seqlens)")
            raise ValueError(f"sala_ops: position_ids must count up from the cache length ({past}) in every row, got "
                             f"rows starting at {starts[:8]}; {hint}")
    x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        kwargs["attention_mask"] = _unread_mask(x)
    return args, kwargs


def _unread_mask(x):
    """What the inner model gets as its attention_mask: an empty 4-D tensor [B, 1, T, 0]. No SALA mixer reads a mask
    (causality is built in), but with None the HF model built its causal mask for the source's attention
    implementation anyway (create_causal_mask): [B, 1, T, past + T] for every forward with 'eager' (32 GiB per
    sequence at 128K tokens in bf16) and for every cached chunk of a chunked prefill with 'sdpa'. A 4-D mask is passed
    through as it is, so none is built."""
    return torch.empty((x.shape[0], 1, x.shape[1], 0), dtype=torch.bool, device=x.device)


def _install_hooks(model):
    inner = model.model
    if getattr(inner, "_sala_hooked", False):
        return
    inner.register_forward_pre_hook(_sala_pre_forward, with_kwargs=True)
    inner._sala_hooked = True


# ---------------------------------------------------------------------------------------------------
# convert_to_sala
# ---------------------------------------------------------------------------------------------------

def _check_token_ids(op, name, x, model):
    """Token ids [B, T] (B, T >= 1, an integer tensor, every id inside the model's vocabulary): they run through
    the model, where a bad one failed deep inside (an AttributeError, a RoPE shape mismatch, an embedding IndexError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sala_ops.{op}: {name} must be a torch.Tensor of token ids [batch, seq], got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sala_ops.{op}: {name} must hold integer token ids (int64 or int32), got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"sala_ops.{op}: {name} must be token ids [batch, seq] with at least one token, "
                         f"got shape {tuple(x.shape)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"sala_ops.{op}: {name} must hold ids in [0, {vocab}) (the model's vocabulary), "
                         f"got ids from {lo} to {hi}")


def convert_to_sala(model, sparse_layers=None, sparse_config: Optional[SparseConfig] = None, *,
                    sparse_ratio: float = 0.25, calibration_ids: Optional[torch.Tensor] = None,
                    halo_eval: Optional[Callable] = None, halo_text_ids: Optional[torch.Tensor] = None,
                    verbose: bool = False):
    """Convert a Hugging Face causal LM (Llama, Qwen2, Qwen3, Mistral) to SALA, in place.

    sparse_layers: None (default: first, last and evenly spread layers, `sparse_ratio` of them),
        a list of layer indices to make sparse, or "halo" (data-driven, spec section 6: scored with
        `halo_eval(model) -> (RT, CS)` (higher = better) or the built-in synthetic recall + LM
        score on `halo_text_ids`; first and last layer always sparse).
    sparse_config: SparseConfig for the sparse layers (default: the 9B model's, dense below 8192 keys).
    calibration_ids: token ids [B, T]; if given, the lightning layers' o_norm starts at the source's
        per-channel attention-output RMS on them (default for HALO: halo_text_ids); else at the
        data-free `value_rms` estimate.
    Returns the model (same object, class now Sala<Base>ForCausalLM); `model.sala_halo_scores` holds
    the HALO measurements when used.
    """
    op = "convert_to_sala"
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"sala_ops.{op}: model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    mtype = getattr(model.config, "model_type", None)
    if isinstance(mtype, str) and mtype.startswith("sala_"):
        raise ValueError(f"sala_ops.{op}: the model is already a SALA model ({mtype})")
    if mtype not in SUPPORTED:
        raise ValueError(f"sala_ops.{op}: model_type {mtype!r} ({type(model).__name__}) is not supported; "
                         f"supported: {_supported_msg()}")
    src_cls, cfg_cls, sala_cls = SUPPORTED[mtype]
    if not isinstance(model, src_cls):
        raise ValueError(f"sala_ops.{op}: pass the causal LM ({src_cls.__name__}), got {type(model).__name__}")
    if sparse_config is not None and not isinstance(sparse_config, SparseConfig):
        raise TypeError(f"sala_ops.{op}: sparse_config must be a sala_ops.SparseConfig or None, "
                        f"got {type(sparse_config).__name__}")
    sparse_cfg = (sparse_config or SparseConfig()).check(op)
    # a bool is an int to isinstance: True would silently mean "every layer sparse"
    if isinstance(sparse_ratio, bool) or not (isinstance(sparse_ratio, (int, float)) and 0 < sparse_ratio <= 1):
        raise ValueError(f"sala_ops.{op}: sparse_ratio must be in (0, 1], got {sparse_ratio!r}")
    layers = _decoder_layers(model)
    L = len(layers)
    config = model.config
    theta, rotary_dim, rope_type = _rope_settings(config, getattr(config, "head_dim", None)
                                                  or config.hidden_size // config.num_attention_heads)
    if rope_type not in (None, "default"):
        warnings.warn(f"sala_ops.{op}: the source uses RoPE type {rope_type!r}; the lightning layers use plain "
                      f"RoPE with theta {theta} (they are retrained in stage 1)")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"sala_ops.{op}: layer {i} has no standard self_attn with q/k/v/o projections")

    for name, x in (("calibration_ids", calibration_ids), ("halo_text_ids", halo_text_ids)):
        if x is not None:
            _check_token_ids(op, name, x, model)

    halo_results = None
    if calibration_ids is None and isinstance(sparse_layers, str) and sparse_layers == "halo":
        calibration_ids = halo_text_ids
    o_norm_rms = attention_output_rms(model, calibration_ids) if calibration_ids is not None else None

    n_sparse = min(L, max(2, round(L * sparse_ratio)))
    if sparse_layers is None:
        chosen = default_sparse_layers(L, sparse_ratio)
    elif isinstance(sparse_layers, str):
        if sparse_layers != "halo":
            raise ValueError(f"sala_ops.{op}: sparse_layers must be None, a list of layer indices or 'halo', "
                             f"got {sparse_layers!r}")
        chosen, results, imp = _halo_select(model, n_sparse, halo_eval, halo_text_ids, o_norm_rms, verbose)
        halo_results = {"scores": results, "importance": imp, "sparse_layers": chosen}
    else:
        try:
            entries = list(sparse_layers)
        except TypeError:
            raise TypeError(f"sala_ops.{op}: sparse_layers must be None, a list of layer indices or 'halo', "
                            f"got {type(sparse_layers).__name__}") from None
        # operator.index, not int(): int() truncated floats and parsed strings, so [0, 2.7] silently became
        # [0, 2] and [0, "2"] passed; index() takes ints, numpy integers and integer 0-d tensors only
        try:
            chosen = [operator.index(i) for i in entries]
        except TypeError:
            chosen = None
        if chosen is None or any(isinstance(i, (bool, np.bool_)) for i in entries):
            raise TypeError(f"sala_ops.{op}: sparse_layers must hold integer layer indices, got {entries}")
        bad = [i for i in chosen if not 0 <= i < L]
        if bad or len(set(chosen)) != len(chosen):
            raise ValueError(f"sala_ops.{op}: sparse_layers must be distinct indices in [0, {L}), got {list(sparse_layers)}")
        chosen = sorted(chosen)
    mixer_types = [MIXER_SPARSE if i in set(chosen) else MIXER_LIGHTNING for i in range(L)]

    # the new config: the source's fields plus the SALA ones
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        d.pop(key, None)
    d.update(mixer_types=mixer_types, sparse_config=asdict(sparse_cfg), sala_base_model_type=mtype)
    new_cfg = cfg_cls(**d)
    new_cfg.architectures = [sala_cls.__name__]
    try:
        new_cfg._attn_implementation = config._attn_implementation
    except Exception:  # noqa: BLE001  (older releases: attribute not settable; the default is fine)
        pass

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        mixer = _new_mixer(attn, mixer_types[i], new_cfg, i, sparse_cfg)
        _transfer(mixer, attn, None if o_norm_rms is None else o_norm_rms[i], _input_norm_weight(layer))
        layer.self_attn = mixer
    for m in model.modules():
        if getattr(m, "config", None) is config:
            m.config = new_cfg
    model.__class__ = sala_cls
    _install_hooks(model)
    if halo_results is not None:
        model.sala_halo_scores = halo_results
    return model


def sala_layers(model, mixer_type: Optional[str] = None) -> list[int]:
    """Indices of the layers of a converted model whose mixer is `mixer_type` (all mixers if None)."""
    return [i for i, layer in enumerate(_decoder_layers(model))
            if isinstance(layer.self_attn, (SparseMixer, LightningMixer))
            and (mixer_type is None or layer.self_attn.mixer_type == mixer_type)]


__all__ = ["convert_to_sala", "default_sparse_layers", "halo_importance", "halo_scores", "synthetic_recall_score",
           "lm_score", "attention_output_rms", "expand_kv_rows", "sparse_config_from", "sala_layers", "SUPPORTED",
           "SalaLlamaConfig", "SalaQwen2Config", "SalaQwen3Config", "SalaMistralConfig", "SalaLlamaForCausalLM",
           "SalaQwen2ForCausalLM", "SalaQwen3ForCausalLM", "SalaMistralForCausalLM"]
