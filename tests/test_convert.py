"""convert_to_sala on tiny random Llama, Qwen2, Qwen3 and Mistral models (CPU, reference backend):
layer placement, weight transfer, the converted model's start point, save/load round trips,
generate() with the hybrid cache, HALO selection, stage-1 training, clear errors."""
import copy
import os
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from sala_ops.cache import SalaCache
from sala_ops.convert import (convert_to_sala, default_sparse_layers, expand_kv_rows, halo_importance, sala_layers,
                              sparse_config_from)
from sala_ops.layers import MIXER_LIGHTNING, MIXER_SPARSE, LightningMixer, SparseMixer
from sala_ops.sparse import SparseConfig

from helpers import assert_close

SMALL = SparseConfig(kernel_size=4, kernel_stride=2, block_size=4, init_blocks=1, window_size=4, topk=2, dense_len=16)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny(family, layers=4, seed=0, **kw):
    cfg_cls, model_cls = FAMILIES[family]
    args = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=256,
                tie_word_embeddings=False, rope_theta=1000.0)
    args.update(kw)
    torch.manual_seed(seed)
    cfg = cfg_cls(**{k: v for k, v in args.items() if k != "rope_theta"})
    model = model_cls(cfg).eval()
    if family == "qwen3":  # make the source's QK-norm weights non-trivial so copying them is visible
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def ids(B, T, seed=0, vocab=97):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- placement

def test_default_layer_choice():
    assert default_sparse_layers(32) == [0, 4, 9, 13, 18, 22, 27, 31]  # 25%, first and last, spread
    assert default_sparse_layers(8) == [0, 7]
    assert default_sparse_layers(12) == [0, 6, 11]
    assert default_sparse_layers(4) == [0, 3]
    assert default_sparse_layers(1) == [0]
    for L in range(2, 64):
        chosen = default_sparse_layers(L)
        assert chosen[0] == 0 and chosen[-1] == L - 1 and len(chosen) == max(2, round(L / 4))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conversion_places_sparse_layers_where_asked(family):
    model = convert_to_sala(tiny(family, layers=6), sparse_layers=[0, 2, 5], sparse_config=SMALL)
    assert type(model).__name__ == f"Sala{type(model).__mro__[2].__name__}"
    assert model.config.model_type == f"sala_{family}"
    assert model.config.mixer_types == [MIXER_SPARSE, MIXER_LIGHTNING, MIXER_SPARSE, MIXER_LIGHTNING,
                                        MIXER_LIGHTNING, MIXER_SPARSE]
    assert sala_layers(model, MIXER_SPARSE) == [0, 2, 5]
    assert sala_layers(model, MIXER_LIGHTNING) == [1, 3, 4]
    assert sparse_config_from(model.config) == SMALL
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.self_attn, SparseMixer if i in (0, 2, 5) else LightningMixer)
        assert layer.self_attn.layer_idx == i
    default = convert_to_sala(tiny(family, layers=8))
    assert sala_layers(default, MIXER_SPARSE) == [0, 7]
    assert sparse_config_from(default.config) == SparseConfig()


# ---------------------------------------------------------------------------------- weight transfer

@pytest.mark.parametrize("family", list(FAMILIES))
def test_lightning_kv_expansion_reproduces_source_projections(family):
    src = tiny(family)
    model = convert_to_sala(copy.deepcopy(src), sparse_layers=[0], sparse_config=SMALL)
    u = torch.randn(2, 7, 32)
    for i in (1, 2, 3):
        a, m = src.model.layers[i].self_attn, model.model.layers[i].self_attn
        assert isinstance(m, LightningMixer) and m.num_heads == 4 and m.head_dim == 8
        G = 2  # 4 query heads over 2 K/V heads
        assert_close(m.q_proj(u), a.q_proj(u), 1e-6)
        for name in ("k_proj", "v_proj"):
            ref = getattr(a, name)(u).view(2, 7, 2, 8).repeat_interleave(G, dim=2).reshape(2, 7, 32)
            assert_close(getattr(m, name)(u), ref, 1e-6, what=name)
        assert_close(m.o_proj(u), 2 * a.o_proj(u) - (a.o_proj.bias if a.o_proj.bias is not None else 0), 1e-6)
        assert (m.z_proj.weight == 0).all()
        # o_norm starts at the RMS of the source's values for unit-variance normed inputs (no calibration data)
        wv = a.v_proj.weight * src.model.layers[i].input_layernorm.weight[None]
        ms = wv.pow(2).sum(1) + (a.v_proj.bias.pow(2) if a.v_proj.bias is not None else 0)
        assert_close(m.o_norm.weight, ms.sqrt().view(2, 8).repeat_interleave(G, dim=0).flatten(), 1e-6)
        if family == "qwen3":
            assert torch.equal(m.q_norm.weight, a.q_norm.weight) and torch.equal(m.k_norm.weight, a.k_norm.weight)
        else:
            assert (m.q_norm.weight == 1).all() and (m.k_norm.weight == 1).all()
        assert (m.q_proj.bias is not None) == (a.q_proj.bias is not None)  # Qwen2 keeps its q/k/v biases
    w = torch.arange(2 * 3 * 5.0).reshape(6, 5)  # 2 kv heads x head_dim 3
    assert torch.equal(expand_kv_rows(w, 2, 4), torch.cat([w[:3], w[:3], w[3:], w[3:]]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sparse_layer_starts_as_source_attention_without_rope(family):
    """Gate o_gate = 0 (sigmoid 0.5) and o_proj x 2: below dense_len the converted sparse layer equals
    the source attention module run with RoPE switched off (cos = 1, sin = 0), SALA sparse layers being NoPE."""
    src = tiny(family)
    src.config._attn_implementation = "eager"
    model = convert_to_sala(copy.deepcopy(src), sparse_layers=[0, 3], sparse_config=SMALL)
    u = torch.randn(1, 12, 32)
    a, m = src.model.layers[3].self_attn, model.model.layers[3].self_attn
    cos, sin = torch.ones(1, 12, 8), torch.zeros(1, 12, 8)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
    expect, _ = a(hidden_states=u, position_embeddings=(cos, sin), attention_mask=mask)
    got, _ = m(u)
    assert_close(got, expect, 1e-5)


def test_calibration_sets_o_norm_to_source_scale():
    src = tiny("llama")
    calib = ids(2, 24, seed=3)
    model = convert_to_sala(copy.deepcopy(src), sparse_config=SMALL, calibration_ids=calib)
    seen = []
    h = src.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        src(calib, use_cache=False)
    h.remove()
    rms = seen[0].float().pow(2).mean((0, 1)).sqrt()
    assert_close(model.model.layers[1].self_attn.o_norm.weight, rms, 1e-5)


def test_calibration_ignores_the_source_models_dropout():
    """A model built from its config is in training mode; with attention dropout the calibration measured the RMS of
    dropped-out (rescaled, random) attention outputs, so o_norm depended on the mode and the seed. It is measured in
    eval mode (as HALO scores are), and the model's mode is left as it was."""
    calib = ids(2, 24, seed=3)
    want = convert_to_sala(tiny("llama", attention_dropout=0.5), sparse_config=SMALL, calibration_ids=calib)
    src = tiny("llama", attention_dropout=0.5).train()
    got = convert_to_sala(src, sparse_config=SMALL, calibration_ids=calib)
    assert got.training
    for i in sala_layers(got, MIXER_LIGHTNING):
        assert torch.equal(got.model.layers[i].self_attn.o_norm.weight, want.model.layers[i].self_attn.o_norm.weight)


# ------------------------------------------------------------------------------- round trip, decode

@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_from_pretrained_round_trip(family, tmp_path):
    model = convert_to_sala(tiny(family, layers=5), sparse_layers=[0, 4], sparse_config=SMALL)
    x = ids(2, 24)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.mixer_types == model.config.mixer_types
    assert sparse_config_from(loaded.config) == SMALL
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert "model.layers.1.self_attn.z_proj.weight" in sd and "model.layers.0.self_attn.o_gate.weight" in sd


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_config_initialises_mixers_like_the_base_model(family):
    """AutoModelForCausalLM.from_config(sala_config) (a SALA model trained from scratch): the mixers are built
    after the base model's post_init, so they must still get its weight init (normal(0, initializer_range),
    zero biases, norms at one) like every other Linear, not PyTorch's default kaiming-uniform (std ~ 0.1 here)."""
    cfg = convert_to_sala(tiny(family), sparse_config=SMALL).config
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(cfg)
    assert type(fresh).__name__ == f"Sala{type(tiny(family)).__name__}"
    std = cfg.initializer_range
    for i, layer in enumerate(fresh.model.layers):
        m = layer.self_attn
        assert isinstance(m, SparseMixer if cfg.mixer_types[i] == MIXER_SPARSE else LightningMixer)
        for name, lin in m.named_children():
            if isinstance(lin, torch.nn.Linear):
                assert abs(lin.weight.std().item() - std) < 0.25 * std, (i, name, lin.weight.std().item())
                assert lin.bias is None or (lin.bias == 0).all(), (i, name)
        for norm in ("q_norm", "k_norm", "o_norm"):
            if hasattr(m, norm):
                assert (getattr(m, norm).weight == 1).all()


def test_sala_config_built_with_a_sparse_config_object_saves_and_loads(tmp_path):
    """A SALA config written by hand takes `sparse_config` as a SparseConfig (the model builds from it), but
    save_pretrained / to_json_string failed with 'Object of type SparseConfig is not JSON serializable'."""
    from sala_ops.convert import SalaLlamaConfig
    cfg = SalaLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=97,
                          mixer_types=[MIXER_SPARSE, MIXER_LIGHTNING], sparse_config=SMALL)
    assert '"sparse_config"' in cfg.to_json_string()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.model.layers[0].self_attn.sparse_config == SMALL
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sparse_config_from(loaded.config) == SMALL
    x = ids(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)


def _greedy_by_recompute(model, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("family,prompt_len", [("llama", 18), ("qwen2", 5), ("qwen3", 20), ("mistral", 17)])
def test_greedy_generate_with_cache_equals_recompute(family, prompt_len):
    """prompt_len >= dense_len: prefill and every decode step run InfLLM-V2 (cached K/V, one query);
    prompt_len 5 with 8 new tokens stays dense. Lightning layers decode from the cached fp32 state."""
    model = convert_to_sala(tiny(family), sparse_config=SMALL)
    prompt = ids(2, prompt_len, seed=7)
    n = 8
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    assert torch.equal(out, _greedy_by_recompute(model, prompt, n))
    with torch.no_grad():
        res = model(prompt, use_cache=True)
    cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
    assert isinstance(cache, SalaCache) and cache.get_seq_length() == prompt_len


def _cache_kwarg(model, cache):
    """generate()'s name for a user cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def test_generate_decodes_through_sparse_decode_and_grows(monkeypatch):
    """generate() with a user SalaCache preallocated below the final length: the prompt goes through
    sparse_prefill, every later token through sparse_decode_step (one query over the SparseLayerCache);
    the cache is reallocated during decode; tokens equal recomputation, and the incrementally built
    compressed keys equal compress_keys over the cached K/V from scratch."""
    import sala_ops.cache as cache_mod
    from sala_ops.sparse import compress_keys
    calls = {"sparse_decode_step": [], "sparse_prefill": []}
    for name, seen in calls.items():
        real = getattr(cache_mod, name)
        monkeypatch.setattr(cache_mod, name, lambda *a, _real=real, _seen=seen, **k: _seen.append(a[0].shape) or _real(*a, **k))
    model = convert_to_sala(tiny("qwen2"), sparse_config=SMALL)
    sparse = sala_layers(model, MIXER_SPARSE)
    prompt, n = ids(2, 18, seed=5), 8
    cache = SalaCache(model.config, max_length=20)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **_cache_kwarg(model, cache))
    assert torch.equal(out, _greedy_by_recompute(model, prompt, n))
    assert len(calls["sparse_prefill"]) == len(sparse)
    assert len(calls["sparse_decode_step"]) == (n - 1) * len(sparse)
    assert all(shape[:2] == (2, 1) for shape in calls["sparse_decode_step"])
    assert cache.get_seq_length() == 18 + n - 1  # the last token is never fed back
    for i in sparse:
        entry = cache.layers[i]
        assert entry.capacity == 40  # 20 -> doubled at token 21
        cfg = entry.cache.config
        assert_close(entry.compressed_k1, compress_keys(entry.keys, cfg.kernel_size, cfg.kernel_stride), 1e-6)
        assert_close(entry.compressed_k2, compress_keys(entry.keys, *cfg.c2), 1e-6)
        assert entry.compressed_k1.shape[1] == (entry.keys.shape[1] - cfg.kernel_size) // cfg.kernel_stride + 1


def test_beam_search_with_cache_equals_without(monkeypatch):
    """Beam search reorders the cache every step (reorder_cache on the SparseLayerCache rows and the
    lightning states); it must pick the same beams as beam search recomputing every step."""
    reorders = []
    real = SalaCache.reorder_cache
    monkeypatch.setattr(SalaCache, "reorder_cache", lambda self, idx: reorders.append(idx) or real(self, idx))
    model = convert_to_sala(tiny("llama"), sparse_config=SMALL)
    prompt = ids(1, 17, seed=9)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False,
              num_beams=3, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        recomputed = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    assert reorders and all(idx.shape == (3,) for idx in reorders)


def test_padded_batches_are_refused():
    model = convert_to_sala(tiny("llama"), sparse_config=SMALL)
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model(x, attention_mask=mask)
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model.generate(x, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), use_cache=False)
    model(x, attention_mask=torch.ones_like(x))  # a mask of ones is fine


def test_generate_with_a_cache_that_already_holds_the_prompt_says_so():
    """generate(prompt, cache=model(prompt).cache): HF feeds the whole prompt again at positions 0.. over a cache
    that holds it. The refusal blamed 'restarting positions (packed sequences) or padding offsets', neither of which
    the caller used; it now names the cache length, the positions that came and the repeated tokens."""
    model = convert_to_sala(tiny("llama"), sparse_config=SMALL)
    prompt = ids(1, 18)
    with torch.no_grad():
        res = model(prompt, use_cache=True)
        cache = getattr(res, "cache", None) or res.past_key_values
        with pytest.raises(ValueError, match=r"cache length \(18\).*starting at \[0\].*repeats positions the cache "
                                             r"already holds"):
            model.generate(prompt, max_new_tokens=2, pad_token_id=0, **_cache_kwarg(model, cache))
        with pytest.raises(ValueError, match=r"cache length \(0\).*starting at \[0, 3\].*packed sequences"):
            model(ids(2, 6), position_ids=torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]]), use_cache=False)


def test_a_cache_for_other_layers_is_refused_before_any_layer_runs():
    """A SalaCache built for another layout (fewer layers, or the mixer types in another order) used to be
    found out only by the first layer it did not fit: an IndexError (not the API's ValueError) or a ValueError
    after the layers before had already appended the input, leaving the cache half updated."""
    model = convert_to_sala(tiny("llama"), sparse_config=SMALL)
    mt = model.config.mixer_types
    assert mt == [MIXER_SPARSE, MIXER_LIGHTNING, MIXER_LIGHTNING, MIXER_SPARSE]
    x = ids(2, 6)
    for other in (mt[:3], mt + [MIXER_LIGHTNING], [MIXER_SPARSE, MIXER_LIGHTNING, MIXER_SPARSE, MIXER_SPARSE]):
        cache = SalaCache(mixer_types=other)
        with pytest.raises(ValueError, match="SalaCache.*mixer_types"):
            model(x, past_key_values=cache)
        assert [layer.seq_len for layer in cache.layers] == [0] * len(other)  # nothing appended
    model(x, past_key_values=SalaCache(mixer_types=list(mt)))  # the model's own layout is fine


@pytest.mark.parametrize("family,impl", [("llama", "eager"), ("llama", "sdpa"), ("mistral", "eager")])
def test_the_model_builds_no_attention_mask_nothing_reads(family, impl, monkeypatch):
    """No SALA mixer reads Hugging Face's attention mask (causality is built in), but the inner model still built it
    with the source's attention implementation: a [B, 1, T, past + T] tensor for every forward with 'eager' (at 128K
    tokens, 32 GiB per sequence in bf16: an OOM before any layer ran) and for every cached chunk of a chunked prefill
    with 'sdpa' (generate(prefill_chunk_size=...)). The logits stay those of one uncached pass."""
    import transformers.masking_utils as mu
    built = []
    for name in ("eager", "sdpa"):
        real = mu.ALL_MASK_ATTENTION_FUNCTIONS[name]
        monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name,
                            lambda *a, _real=real, _name=name, **k: built.append(_name) or _real(*a, **k))
    extra = {"sliding_window": 8} if family == "mistral" else {}
    src = tiny(family, **extra)
    src.config._attn_implementation = impl
    model = convert_to_sala(src, sparse_config=SMALL)
    x = ids(2, 40, seed=4)
    with torch.no_grad():
        full = model(x, attention_mask=torch.ones_like(x), use_cache=False).logits
        res = model(x[:, :24], use_cache=True)
        cache = getattr(res, "cache", None) or res.past_key_values
        parts = [res.logits]
        for a, b in ((24, 32), (32, 33), (33, 40)):
            parts.append(model(x[:, a:b], attention_mask=torch.ones_like(x[:, :b]), **_cache_kwarg(model, cache)).logits)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0,
                             prefill_chunk_size=16)
    assert built == []
    assert_close(torch.cat(parts, 1), full, 1e-5)
    assert out.shape == (2, 43)


def test_packed_sequences_through_the_model_with_default_use_cache():
    """HF's packing collator (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) passes restarting
    position_ids plus cu_seq_lens_q/k and no use_cache: config.use_cache (True by default) must not make the
    converted model build a cache, which the mixers cannot combine with packed sequences."""
    model = convert_to_sala(tiny("llama"), sparse_config=SMALL).train()
    assert model.config.use_cache
    a, b = ids(1, 18, seed=1), ids(1, 11, seed=2)
    x = torch.cat([a, b], 1)
    cu = torch.tensor([0, 18, 29], dtype=torch.int32)
    pos = torch.cat([torch.arange(18), torch.arange(11)])[None]
    packed = model(x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=18, max_length_k=18)
    separate = torch.cat([model(a, use_cache=False).logits, model(b, use_cache=False).logits], 1)
    assert_close(packed.logits, separate, 1e-5)
    packed.logits.float().pow(2).mean().backward()  # and it trains
    assert model.model.layers[1].self_attn.z_proj.weight.grad is not None
    with pytest.raises(ValueError, match="cannot be combined with a cache"):  # asking for one stays an error
        model(x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=18, max_length_k=18,
              use_cache=True)


# ---------------------------------------------------------------------------------------------- HALO

def test_halo_importance_formula():
    rt, cs = [0.9, 0.5, 0.7], [0.8, 0.6, 0.8]
    imp = halo_importance(rt, cs)
    assert imp[0] == 0.0
    assert imp[1] == pytest.approx((0.9 - 0.5) / (0.8 - 0.6 + 1e-10))
    assert imp[2] == 50.0  # (0.2) / (0 + 1e-10) clipped at 50


def test_halo_with_user_evaluation_keeps_the_important_layers():
    """A user evaluation that says replacing layer 3 or 5 by a linear layer hurts recall most."""
    model = tiny("llama", layers=8)
    calls = []

    def evaluate(m):
        lin = [i for i, layer in enumerate(m.model.layers) if isinstance(layer.self_attn, LightningMixer)]
        assert len(lin) == 1  # one layer replaced at a time
        calls.append(lin[0])
        rt = {3: 0.2, 5: 0.4}.get(lin[0], 0.9)
        return rt, 0.5 - 0.01 * lin[0]

    convert_to_sala(model, sparse_layers="halo", halo_eval=evaluate, sparse_ratio=0.5, sparse_config=SMALL)
    assert sorted(calls) == [1, 2, 3, 4, 5, 6]  # first and last are never candidates, always sparse
    # importance: layer 3 (0.9-0.2)/(0.49-0.47) = 35, layer 5 0.5/0.04 = 12.5, the others 0
    assert model.sala_halo_scores["importance"][3] == pytest.approx(35.0)
    assert sala_layers(model, MIXER_SPARSE) == [0, 3, 5, 7]  # 50% of 8 layers
    assert model.sala_halo_scores["sparse_layers"] == [0, 3, 5, 7]


def test_halo_user_evaluation_may_call_the_model_with_its_default_cache_settings():
    """A user evaluation written as for any HF model: model(x, labels=x) (use_cache from the config, True) and
    generate(). During scoring the model mixes source attention layers with one lightning layer, so HF handed the
    lightning layer a DynamicCache and every such evaluation failed with the mixer's TypeError."""
    model = tiny("llama", layers=6)
    x = ids(2, 12, seed=3)
    ref = {}

    def evaluate(m):
        with torch.no_grad():
            loss = m(x, labels=x).loss.item()
        out = m.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
        lin = [i for i, layer in enumerate(m.model.layers) if isinstance(layer.self_attn, LightningMixer)][0]
        with torch.no_grad():
            ref[lin] = m(x, labels=x, use_cache=False).loss.item()
        assert out.shape == (2, 15) and loss == pytest.approx(ref[lin], abs=1e-6)
        return -loss, -loss

    cfg_cache, gen_cache = model.config.use_cache, model.generation_config.use_cache
    convert_to_sala(model, sparse_layers="halo", halo_eval=evaluate, sparse_config=SMALL)
    assert sorted(ref) == [1, 2, 3, 4]
    assert (model.config.use_cache, model.generation_config.use_cache) == (cfg_cache, gen_cache)


def test_halo_builtin_evaluation_runs():
    model = convert_to_sala(tiny("qwen3", layers=8), sparse_layers="halo", halo_text_ids=ids(2, 24, seed=2),
                            sparse_ratio=0.5, sparse_config=SMALL)
    chosen = sala_layers(model, MIXER_SPARSE)
    assert len(chosen) == 4 and chosen[0] == 0 and chosen[-1] == 7
    assert set(model.sala_halo_scores["importance"]) == set(range(1, 7))
    with pytest.raises(ValueError, match="halo_text_ids"):
        convert_to_sala(tiny("llama"), sparse_layers="halo")


def test_halo_builtin_evaluation_takes_int32_text_ids():
    """halo_text_ids may be int32 (the argument check accepts int64 or int32, as calibration_ids), but the built-in
    general-task score fed them to cross_entropy as targets, which takes only int64: conversion failed with a bare
    'expected target dtype to be Long or Byte, but got Int'. The score (and the choice) is the int64 one."""
    text = ids(2, 24, seed=2)
    want = convert_to_sala(tiny("llama", layers=6), sparse_layers="halo", halo_text_ids=text, sparse_ratio=0.5,
                           sparse_config=SMALL)
    got = convert_to_sala(tiny("llama", layers=6), sparse_layers="halo", halo_text_ids=text.int(), sparse_ratio=0.5,
                          sparse_config=SMALL)
    assert got.sala_halo_scores["scores"] == want.sala_halo_scores["scores"]
    assert sala_layers(got, MIXER_SPARSE) == sala_layers(want, MIXER_SPARSE)


@pytest.mark.parametrize("layers", [1, 2])
def test_halo_without_candidate_layers(layers):
    """With one or two layers, first and last are all the layers: HALO has nothing to score and keeps them
    all sparse (it used to fail in halo_importance with a bare 'max() arg is an empty sequence')."""
    calls = []
    model = convert_to_sala(tiny("llama", layers=layers), sparse_layers="halo",
                            halo_eval=lambda m: calls.append(1) or (0.0, 0.0), sparse_config=SMALL)
    assert calls == []
    assert sala_layers(model, MIXER_SPARSE) == list(range(layers))
    assert model.sala_halo_scores["sparse_layers"] == list(range(layers))
    model = convert_to_sala(tiny("llama", layers=layers), sparse_layers="halo", halo_text_ids=ids(1, 12),
                            sparse_config=SMALL)
    assert sala_layers(model, MIXER_SPARSE) == list(range(layers))


# ------------------------------------------------------------------------------------------ training

def test_stage1_training_lowers_alignment_loss():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import convert_and_train as ex
    teacher = ex.tiny_model("llama", layers=3)
    student = convert_to_sala(copy.deepcopy(teacher), sparse_config=ex.TINY_SPARSE)
    data = ex.batches(None, 40, 2, teacher.config.vocab_size, 0, "cpu")
    frozen = {n: p.clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    losses = ex.stage1_train(teacher, student, data, steps=6, lr=3e-3, log=None)
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in student.named_parameters():  # only the converted mixers moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------------------------------- errors

def test_bad_calibration_or_halo_text_ids_name_the_argument():
    """calibration_ids / halo_text_ids are token ids [B, T]: a list, 1-D, float, empty or out-of-vocabulary input
    failed deep inside the model (AttributeError 'list' has no 'to', a RoPE shape mismatch, an embedding
    IndexError) instead of the op's error naming the argument; the model stays unconverted."""
    bad = [([[1, 2, 3]], TypeError), (ids(1, 6)[0], ValueError), (torch.rand(1, 6), TypeError),
           (torch.zeros(1, 0, dtype=torch.long), ValueError), (torch.zeros(0, 4, dtype=torch.long), ValueError),
           (torch.tensor([[1, 97]]), ValueError), (torch.tensor([[1, -1]]), ValueError),
           (torch.ones(1, 4, dtype=torch.bool), TypeError)]
    for name in ("calibration_ids", "halo_text_ids"):
        extra = {"sparse_layers": "halo"} if name == "halo_text_ids" else {}
        for value, err in bad:
            model = tiny("llama")
            with pytest.raises(err, match=f"convert_to_sala: {name}"):
                convert_to_sala(model, sparse_config=SMALL, **{name: value}, **extra)
            assert type(model) is LlamaForCausalLM
    good = convert_to_sala(tiny("llama"), sparse_config=SMALL, calibration_ids=ids(2, 6).int())
    assert sala_layers(good, MIXER_LIGHTNING) == [1, 2]


def test_unsupported_models_and_arguments_fail_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match=r"not supported; supported: llama .*qwen2.*qwen3.*mistral"):
        convert_to_sala(gpt2)
    base = tiny("llama")
    with pytest.raises(ValueError, match="pass the causal LM"):
        convert_to_sala(base.model)
    with pytest.raises(ValueError, match="distinct indices"):
        convert_to_sala(tiny("llama"), sparse_layers=[0, 4])
    with pytest.raises(ValueError, match="'halo'"):
        convert_to_sala(tiny("llama"), sparse_layers="all")
    # layer indices are integers: a float or a string used to be truncated / parsed silently ([0, 2.7] -> [0, 2])
    for bad in ([0, 2.7], [0, 3.0], [0, "2"], [0, None], torch.tensor([0.0, 3.0])):
        with pytest.raises(TypeError, match="convert_to_sala: sparse_layers must hold integer layer indices"):
            convert_to_sala(tiny("llama"), sparse_layers=bad)
    import numpy as np
    for good in ((0, 3), np.array([0, 3]), torch.tensor([0, 3]), [np.int64(0), 3]):
        assert sala_layers(convert_to_sala(tiny("llama"), sparse_layers=good, sparse_config=SMALL), MIXER_SPARSE) == [0, 3]
    with pytest.raises(ValueError, match="convert_to_sala: sparse_ratio"):
        convert_to_sala(tiny("llama"), sparse_ratio=True)  # a bool is not a ratio (it used to mean 100% sparse)
    with pytest.raises(TypeError, match="SparseConfig"):
        convert_to_sala(tiny("llama"), sparse_config={"topk": 4})
    with pytest.raises(TypeError, match="must be a Hugging Face"):
        convert_to_sala("llama")
    done = convert_to_sala(tiny("llama"))
    with pytest.raises(ValueError, match="already a SALA model"):
        convert_to_sala(done)
