"""Quick tour of sala_ops on whatever device is there (CPU: reference backend; CUDA: Triton).

    python examples/quickstart.py
"""
import argparse

import torch

import sala_ops
from sala_ops import reference as R

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
B, T, H, Hkv, D = 1, 256, 4, 2, 32

# Lightning layer: per-head RMSNorm + RoPE (HyPE), then constant-decay linear attention.
q, k, v = (torch.randn(B, T, h, D, device=device, dtype=dtype) for h in (H, H, H))
w = torch.ones(D, device=device, dtype=dtype)
q_rot, k_rot = sala_ops.hype_embed(q, k, layer_type="lightning", q_norm_weight=w, k_norm_weight=w)
decay = sala_ops.sala_decay_slopes(H).to(device)
out = sala_ops.lightning_attention(q_rot, k_rot, v, decay, output_final_state=True)
print(f"lightning_attention [{sala_ops.backend_for(q)}]: output {tuple(out.output.shape)}, "
      f"final_state {tuple(out.final_state.shape)} {out.final_state.dtype}")

# Decode one more token (position T) from the final state.
q1, k1, v1 = (torch.randn(B, 1, H, D, device=device, dtype=dtype) for _ in range(3))
q1, k1 = sala_ops.hype_embed(q1, k1, positions=torch.tensor([T], device=device), layer_type="lightning",
                             q_norm_weight=w, k_norm_weight=w)
o_step, state = sala_ops.lightning_attention_step(q1, k1, v1, out.final_state, decay)
print(f"lightning_attention_step: output {tuple(o_step.shape)}, state {tuple(state.shape)}")

# Sparse layer (NoPE): InfLLM-V2 with a small configuration so the sparse path runs at T = 256.
qs, ks, vs = (torch.randn(B, T, h, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv))
cfg = sala_ops.SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, dense_len=128)
o_sparse = sala_ops.sparse_attention(qs, ks, vs, config=cfg)
blocks = sala_ops.select_blocks(qs, ks, config=cfg)
print(f"sparse_attention [{sala_ops.backend_for(qs)}]: output {tuple(o_sparse.shape)}, "
      f"{blocks.shape[-1]} blocks per (query, KV head); last query reads blocks {blocks[0, -1, 0].tolist()}")

ref = R.sparse_attention(qs.float(), ks.float(), vs.float(), None, 8, 4, 16, 1, 32, 4, 128)
err = ((o_sparse.float() - ref).norm() / ref.norm()).item()
print(f"sparse_attention vs reference: relative error {err:.2e}")
assert err < 2e-2, err
print("quickstart OK")
