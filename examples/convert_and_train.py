"""Convert a Hugging Face causal LM to SALA and run stage-1 continual training (spec section 6).

Stage 1 trains only the converted mixers (every layer's attention, now SparseMixer or
LightningMixer); embeddings, norms, MLPs and the head stay frozen. The loss is hidden-state
alignment with the original model, teacher-forced layer by layer: every student decoder layer gets
the *teacher's* input to that layer, and its output is compared with the teacher's output,

    loss = mean over layers l of  ||out_s(l) - out_t(l)||^2 / ||out_t(l) - in_t(l)||^2

i.e. the error of each layer's contribution relative to the contribution itself (1.0 = no better
than leaving the residual stream unchanged). Teacher forcing keeps the layers independent, so an
early layer's error does not pollute the later layers' targets.

    # CPU, a tiny random model, seconds:
    python examples/convert_and_train.py --tiny
    # real sizes, one node of 8 GPUs, PyTorch FSDP2 (fully_shard) over decoder layers, bf16:
    torchrun --nproc_per_node 8 examples/convert_and_train.py --model /path/to/Qwen3-8B \
        --data tokens.pt --seq-len 512 --batch-size 8 --steps 2000 --lr 1e-4 --fsdp --output sala-stage1/

`--data` is a 1-D tensor of token ids (.pt / .npy), or a text file tokenized with the model's
tokenizer; without it the script trains on random tokens (a smoke test only). The FSDP path needs
CUDA GPUs and NCCL; it is written for torch >= 2.6 (`torch.distributed.fsdp.fully_shard`).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sala_ops.convert import _decoder_layers, convert_to_sala  # noqa: E402
from sala_ops.sparse import SparseConfig  # noqa: E402

# A sparse configuration small enough that short CPU sequences cross dense_len (the sparse path runs).
TINY_SPARSE = SparseConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, window_size=16, topk=2,
                           dense_len=32)


def tiny_model(base: str = "llama", layers: int = 4, seed: int = 0):
    """A tiny random causal LM of the given family (no download)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    fam = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if base not in fam:
        raise ValueError(f"tiny_model: base must be one of {sorted(fam)}, got {base!r}")
    cfg_cls, model_cls = fam[base]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    return model_cls(cfg).float().eval()


# ---------------------------------------------------------------------------------------------------
# Teacher-forced hidden-state alignment
# ---------------------------------------------------------------------------------------------------

def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class LayerAlignment:
    """Hooks that record the teacher's per-layer inputs/outputs, feed those inputs to the student's
    layers and record the student's outputs. `loss()` after one teacher and one student forward."""

    def __init__(self, teacher, student):
        self.t_layers, self.s_layers = _decoder_layers(teacher), _decoder_layers(student)
        if len(self.t_layers) != len(self.s_layers):
            raise ValueError("teacher and student must have the same number of layers")
        n = len(self.t_layers)
        self.t_in, self.t_out, self.s_out = [None] * n, [None] * n, [None] * n
        self.handles = []
        for i, (tl, sl) in enumerate(zip(self.t_layers, self.s_layers)):
            self.handles.append(tl.register_forward_pre_hook(self._t_pre(i), with_kwargs=True))
            self.handles.append(tl.register_forward_hook(self._t_post(i)))
            self.handles.append(sl.register_forward_pre_hook(self._s_pre(i), with_kwargs=True))
            self.handles.append(sl.register_forward_hook(self._s_post(i)))

    def _t_pre(self, i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.t_in[i] = h.detach()
        return hook

    def _t_post(self, i):
        def hook(mod, args, out):
            self.t_out[i] = _first(out).detach()
        return hook

    def _s_pre(self, i):
        def hook(mod, args, kwargs):
            h = self.t_in[i]
            if h is None:
                raise RuntimeError("run the teacher before the student")
            if args:
                args = (h,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": h}
            return args, kwargs
        return hook

    def _s_post(self, i):
        def hook(mod, args, out):
            self.s_out[i] = _first(out)
        return hook

    def loss(self):
        terms = []
        for t_in, t_out, s_out in zip(self.t_in, self.t_out, self.s_out):
            num = (s_out.float() - t_out.float()).pow(2).mean()
            den = (t_out.float() - t_in.float()).pow(2).mean().clamp_min(1e-12)
            terms.append(num / den)
        self.t_in = [None] * len(self.t_in)
        return torch.stack(terms).mean()

    def remove(self):
        for h in self.handles:
            h.remove()


def freeze_all_but_mixers(student, train_sparse: bool = True):
    """Stage 1: only the converted mixers train. Returns the trainable parameters."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for layer in _decoder_layers(student):
        mixer = layer.self_attn
        if not train_sparse and getattr(mixer, "mixer_type", "") == "minicpm4":
            continue
        for p in mixer.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def batches(data, seq_len, batch_size, vocab, seed, device):
    """Endless random windows of `data` (1-D token ids), or random tokens when data is None."""
    g = torch.Generator().manual_seed(seed)
    while True:
        if data is None:
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        else:
            start = torch.randint(0, max(1, data.numel() - seq_len), (batch_size,), generator=g)
            ids = torch.stack([data[s: s + seq_len] for s in start.tolist()])
        yield ids.to(device)


def stage1_step(teacher, student, align, opt, params, ids, grad_clip):
    """One stage-1 step on a batch of token ids: teacher and student forward (the alignment hooks
    record both), the alignment loss, its backward (optionally clipped) and the optimizer step."""
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
    student(input_ids=ids, use_cache=False)
    loss = align.loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss


def stage1_train(teacher, student, data_iter, steps, lr=1e-3, log_every=1, log=print, train_sparse=True,
                 grad_clip=1.0):
    """Stage-1 training loop; returns the per-step alignment losses."""
    params = freeze_all_but_mixers(student, train_sparse)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    teacher.eval()
    student.train()
    align = LayerAlignment(teacher, student)
    losses = []
    try:
        for step in range(steps):
            loss = stage1_step(teacher, student, align, opt, params, next(data_iter), grad_clip)
            losses.append(loss.item())
            if log and (step % log_every == 0 or step == steps - 1):
                log(f"step {step:5d}  alignment loss {losses[-1]:.5f}")
    finally:
        align.remove()
    return losses


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------

def _load_data(path, model_path):
    if path is None:
        return None
    if path.endswith(".pt"):
        return torch.load(path).long().flatten()
    if path.endswith(".npy"):
        import numpy as np
        return torch.from_numpy(np.load(path)).long().flatten()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    with open(path) as f:
        return torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)


def _load_tiny_data(path, vocab):
    """--data for the tiny model: token ids (.pt / .npy) below its vocabulary size (a text file needs the
    tokenizer of a --model)."""
    if path is None:
        return None
    if not path.endswith((".pt", ".npy")):
        raise SystemExit(f"--tiny: --data must hold token ids (.pt or .npy); a text file ({path}) is tokenized with "
                         f"the tokenizer of --model, which the tiny model does not have")
    data = _load_data(path, None)
    if data.numel() == 0 or int(data.min()) < 0 or int(data.max()) >= vocab:
        raise SystemExit(f"--tiny: --data must hold at least one token id, all in [0, {vocab}) (the tiny model's "
                         f"vocabulary); {path} holds {data.numel()} ids"
                         + (f" in [{int(data.min())}, {int(data.max())}]" if data.numel() else ""))
    return data


def run_tiny(args):
    teacher = tiny_model(args.tiny_base, layers=args.layers)
    student = copy.deepcopy(teacher)
    vocab = teacher.config.vocab_size
    data_all = _load_tiny_data(args.data, vocab)
    if args.no_calibrate:
        calib = None
    elif data_all is None:
        calib = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    else:
        calib = next(batches(data_all, 32, 2, vocab, args.seed + 1, "cpu"))
    convert_to_sala(student, sparse_config=TINY_SPARSE, calibration_ids=calib)
    print(f"converted {args.tiny_base}: mixer_types = {student.config.mixer_types}")
    data = batches(data_all, args.seq_len, args.batch_size, vocab, args.seed, "cpu")
    t0 = time.time()
    log_every = max(1, args.log_every or args.steps // 10)
    losses = stage1_train(teacher, student, data, args.steps, lr=args.lr, log_every=log_every,
                          train_sparse=not args.freeze_sparse)
    print(f"{args.steps} steps in {time.time() - t0:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if args.output:
        student.save_pretrained(args.output)
        print(f"saved to {args.output}")
    return losses


def run_fsdp(args):
    """Multi-GPU stage 1 with FSDP2. Launch with torchrun."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    log = print if rank == 0 else (lambda *a, **k: None)

    dtype = torch.bfloat16
    if args.model:
        teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        teacher = tiny_model(args.tiny_base, layers=args.layers).to(dtype)
    teacher.to(device)  # every rank converts its own full copy on its GPU, then both models are sharded
    student = copy.deepcopy(teacher)
    data_all = _load_data(args.data, args.model)
    # o_norm of the lightning layers starts at the source's attention-output scale measured on one batch
    calib = None if args.no_calibrate else \
        next(batches(data_all, args.seq_len, 2, teacher.config.vocab_size, args.seed, "cpu"))
    sparse_cfg = SparseConfig() if args.model else TINY_SPARSE
    convert_to_sala(student, sparse_config=sparse_cfg, calibration_ids=calib)
    log(f"converted: mixer_types = {student.config.mixer_types}")
    freeze_all_but_mixers(student, not args.freeze_sparse)

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for model in (teacher, student):
        model.to(device)
        for layer in _decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    for p in teacher.parameters():
        p.requires_grad_(False)

    data = batches(data_all, args.seq_len, args.batch_size, teacher.config.vocab_size, args.seed + rank, device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps)))))
    align = LayerAlignment(teacher, student)
    teacher.eval()
    student.train()
    log_every = max(1, args.log_every or 10)
    t0 = time.time()
    for step in range(args.steps):
        loss = stage1_step(teacher, student, align, opt, params, next(data), grad_clip=1.0)
        sched.step()
        if step % log_every == 0 or step == args.steps - 1:
            l = loss.detach()
            dist.all_reduce(l, op=dist.ReduceOp.AVG)
            log(f"step {step:6d}  alignment loss {l.item():.5f}  {time.time() - t0:.1f}s")
    align.remove()
    if args.output:
        sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            student.save_pretrained(args.output, state_dict=sd)
            log(f"saved to {args.output}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (seconds)")
    ap.add_argument("--tiny-base", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    ap.add_argument("--layers", type=int, default=4, help="layers of the tiny model")
    ap.add_argument("--model", help="path of a Hugging Face causal LM (Llama, Qwen2, Qwen3, Mistral)")
    ap.add_argument("--data", help="token ids (.pt/.npy, 1-D) or a text file")
    ap.add_argument("--fsdp", action="store_true", help="multi-GPU with FSDP2 (launch with torchrun)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100, help="linear warmup steps of the cosine schedule (--fsdp; the "
                    "tiny CPU run keeps --lr constant)")
    ap.add_argument("--log-every", type=int, help="log every N steps (default: 10; the tiny run: steps // 10)")
    ap.add_argument("--freeze-sparse", action="store_true", help="train only the lightning layers")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="start o_norm at the data-free value-RMS estimate instead of measuring one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="save the converted, trained model here")
    args = ap.parse_args(argv)
    if args.fsdp:
        return run_fsdp(args)
    if args.tiny or not args.model:
        if not args.tiny:
            print("no --model given: running the tiny CPU demo (--tiny)")
        return run_tiny(args)
    raise SystemExit("single-process training of a real model: use --fsdp under torchrun (one GPU works too)")


if __name__ == "__main__":
    main()
