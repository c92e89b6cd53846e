"""Reference RoPE numbers from HuggingFace transformers' Llama (an independent implementation).

Writes model/tests/fixtures/rope.json, which model/tests/suite/model.rs checks `rope_tables` and
`apply_rope` against. `LlamaRotaryEmbedding` (built from a `LlamaConfig`, no weights) makes
the cos/sin tables; `apply_rotary_pos_emb` rotates q and k in the half-split (`rotate_half`)
layout of Llama checkpoints, the layout model/src/rope.rs documents, so no permutation is
applied. HF computes inverse frequencies and angles in float32 (as we do); the rotation
itself runs in float64 on float32-exact inputs. Cases: two head dims and thetas, two packed
sequences (positions restarting at 0, and non-zero offsets up to 1000), GQA-shaped k.

Run: /work/venv-ref/bin/python scripts/rope_reference.py   (needs torch, transformers)
"""
import json
import math
import os

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

POSITIONS = [[0, 1, 2, 3, 4], [0, 1, 37, 38, 1000]]  # [b, s]


def values(shape, f):
    """Deterministic float32-exact values f(flat index), as float64."""
    n = math.prod(shape)
    return torch.tensor([f(i) for i in range(n)], dtype=torch.float32).reshape(shape).double()


cases = []
for head_dim, theta in [(8, 10000.0), (16, 500000.0)]:
    h, h_kv = 2, 1
    cfg = LlamaConfig(hidden_size=h * head_dim, num_attention_heads=h, num_key_value_heads=h_kv,
                      head_dim=head_dim, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    rope = LlamaRotaryEmbedding(cfg)
    b, s = len(POSITIONS), len(POSITIONS[0])
    q = values([b, h, s, head_dim], lambda i: math.sin(0.37 * i + 0.11) * (1 + 0.05 * (i % 7)))
    k = values([b, h_kv, s, head_dim], lambda i: math.cos(0.23 * i - 0.4))
    cos, sin = rope(q, torch.tensor(POSITIONS))  # [b, s, hd], float32 math cast to float64
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    cases.append({
        "head_dim": head_dim, "theta": theta, "heads": h, "kv_heads": h_kv,
        "positions": POSITIONS,
        "inv_freq": rope.inv_freq.double().tolist(),
        "q": q.flatten().tolist(), "k": k.flatten().tolist(),
        "q_rot": q_rot.flatten().tolist(), "k_rot": k_rot.flatten().tolist(),
    })

path = os.path.join(os.path.dirname(__file__), "..", "model", "tests", "fixtures", "rope.json")
with open(path, "w") as fh:
    json.dump({"source": "transformers LlamaRotaryEmbedding + apply_rotary_pos_emb", "cases": cases}, fh, indent=1)
print("wrote", os.path.normpath(path))
