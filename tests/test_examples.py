"""The examples' model code on CPU: the assembled MiniCPM-SALA (tiny), its weight loading, and the
quickstart. The 9B numbers themselves (config, layer mix) are checked against the spec."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


sala9b = _load("minicpm_sala_9b")


def test_default_config_is_the_released_9b():
    cfg = sala9b.SalaConfig()
    spec = ROOT.parent / "shared" / "spec" / "minicpm_sala_9b.json"
    if spec.exists():  # beside the checkout in this workplace; the defaults must equal it
        raw = json.loads(spec.read_text())
        assert cfg.mixer_types == raw["mixer_types"]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "scale_emb", "scale_depth", "dim_model_base", "rope_theta"):
            assert getattr(cfg, key) == raw[key], key
        sc = cfg.sparse()
        for key, value in raw["sparse_config"].items():
            if hasattr(sc, key):
                assert getattr(sc, key) == value, key
    assert [i for i, t in enumerate(cfg.mixer_types) if t == "minicpm4"] == [0, 9, 16, 17, 22, 29, 30, 31]
    with torch.device("meta"):
        model = sala9b.MiniCPMSALA(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 9.4e9 < n < 9.6e9, n  # spec: about 9.48B parameters


def test_tiny_chunked_prefill_equals_one_pass_and_decode_continues():
    torch.manual_seed(0)
    cfg = sala9b.SalaConfig.tiny()
    model = sala9b.MiniCPMSALA(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 150))
    with torch.no_grad():
        full = model(ids, logits_to_keep=0)
        last, cache = model.prefill(ids[:, :110], chunk=37)  # chunks cross dense_len = 64
        steps = [last[:, -1]] + [model(ids[:, t:t + 1], cache)[:, -1] for t in range(110, 150)]
    assert cache.get_seq_length() == 150
    got = torch.stack(steps[:-1], 1)
    ref = full[:, 109:149]
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_released_weight_names_load_strictly(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    cfg = sala9b.SalaConfig.tiny()
    src = sala9b.MiniCPMSALA(cfg).eval()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    names = set(state)
    # the spec's names (section 5) for one sparse and one lightning layer
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.self_attn.o_gate.weight", "model.layers.1.self_attn.z_proj.weight",
            "model.layers.1.self_attn.o_norm.weight", "model.layers.1.mlp.gate_proj.weight"} <= names
    half = sorted(names)
    safetensors.save_file({k: state[k] for k in half[::2]}, str(tmp_path / "model-00001.safetensors"))
    safetensors.save_file({k: state[k] for k in half[1::2]}, str(tmp_path / "model-00002.safetensors"))
    dst = sala9b.load_released_weights(sala9b.MiniCPMSALA(cfg).eval(), str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(dst(ids), src(ids))
    os.remove(tmp_path / "model-00002.safetensors")
    with pytest.raises(ValueError, match="missing"):
        sala9b.load_released_weights(sala9b.MiniCPMSALA(cfg), str(tmp_path))


# bench/*.py modules without a command line of their own (imported by the scripts)
_NO_CLI = {"aot_common.py", "graph_capture.py"}
_SCRIPTS = sorted(f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py") if p.name not in _NO_CLI) + \
    sorted(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", _SCRIPTS)
def test_script_help_prints_usage_without_a_gpu(script):
    """`python <script> --help` prints the usage and exits 0 on a machine without a GPU. Four bench scripts took
    --help for their positional argument (diag_lightning.py then failed on CUDA, emulate_lightning_precision.py
    and aot_sparse_fingerprint.py ran their whole job, summary.py read a folder named --help) and
    examples/quickstart.py ran the tour."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:"), r.stdout[:500]


def test_convert_and_train_tiny_honours_its_flags(monkeypatch, tmp_path, capsys):
    """The --tiny run ignored --data (random tokens), --freeze-sparse (sparse mixers trained), --no-calibrate
    (o_norm calibrated anyway) and --log-every (steps // 10): each now does what its help says."""
    ex = _load("convert_and_train")
    ids = torch.arange(300) % 100 + 20  # token ids 20..119 of the tiny model's 128
    torch.save(ids, tmp_path / "ids.pt")
    seen = {}
    convert, batches = ex.convert_to_sala, ex.batches

    def spy_convert(model, **kw):
        seen["calibration_ids"] = kw.get("calibration_ids")
        seen["student"] = convert(model, **kw)
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return seen["student"]

    def spy_batches(data, *a, **kw):
        for b in batches(data, *a, **kw):
            seen.setdefault("tokens", set()).update(b.flatten().tolist())
            yield b

    monkeypatch.setattr(ex, "convert_to_sala", spy_convert)
    monkeypatch.setattr(ex, "batches", spy_batches)
    ex.main(["--tiny", "--layers", "3", "--steps", "4", "--log-every", "2", "--seq-len", "24", "--batch-size", "2",
             "--data", str(tmp_path / "ids.pt"), "--freeze-sparse", "--no-calibrate"])
    assert seen["calibration_ids"] is None
    assert seen["tokens"] <= set(range(20, 120))
    logged = [line.split()[1] for line in capsys.readouterr().out.splitlines() if "alignment loss" in line]
    assert logged == ["0", "2", "3"]
    moved = {n.split(".self_attn.")[0] for n, p in seen["student"].named_parameters()
             if not torch.equal(p, seen["before"][n])}
    sparse = {f"model.layers.{i}" for i, layer in enumerate(seen["student"].model.layers)
              if layer.self_attn.mixer_type == "minicpm4"}
    assert moved and not moved & sparse, (moved, sparse)
    torch.save(torch.tensor([1, 500]), tmp_path / "big.pt")
    with pytest.raises(SystemExit, match=r"in \[0, 128\)"):
        ex.main(["--tiny", "--data", str(tmp_path / "big.pt")])


def test_quickstart_runs_on_the_cpu():
    """README's second set-up command (`python examples/quickstart.py`) finishes with its own check."""
    r = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip().endswith("quickstart OK"), r.stdout[-1000:]
