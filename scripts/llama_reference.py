"""Reference Llama models and their outputs from HuggingFace transformers (an independent
implementation), for `transfusion-train import-llm`.

Writes two tiny random Llama models in the Hugging Face layout under
train/tests/fixtures/llama/, each with the outputs the Rust import test
(train/tests/import_llm) must reproduce:

- `gqa_tied/`: grouped-query attention (4 query heads, 2 key/value heads), tied input and
  output embeddings, rope_theta 500000, RMSNorm eps 1e-6, float32 weights in one
  `model.safetensors`.
- `mha_untied_bf16/`: plain multi-head attention, separate `lm_head`, rope_theta 10000, eps 1e-5,
  bfloat16 weights split into shards with a `model.safetensors.index.json`.

Both share one byte-level BPE `tokenizer.json` trained here on assets/corpus with Llama's
`<s>` / `</s>`. Each folder's `reference.json` holds, for fixed prompts, the logits of every
position (computed in float32 from the stored weights: bf16 weights are widened exactly, as
the importer does) and the greedy continuation (argmax over the model's vocabulary, full
recomputation each step).

Run: /work/venv-ref/bin/python scripts/llama_reference.py   (needs torch, transformers, tokenizers)
"""
import glob
import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "train", "tests", "fixtures", "llama")
VOCAB = 300
NEW_TOKENS = 6


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = sorted(glob.glob(os.path.join(ROOT, "assets", "corpus", "*.txt")))
    tok.train(files, trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def build(name, seed, tok, torch_dtype, shard, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        max_position_embeddings=256,
        initializer_range=0.2,
        **kw,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Norm weights away from 1 so a missing or misplaced norm shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model = model.to(torch_dtype)
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "1GB")
    tok.save(os.path.join(path, "tokenizer.json"))
    # The reference reads the files back, as a user's transformers would, in float32 (bf16
    # weights widen exactly; RoPE's inverse frequencies are recomputed in float32 rather than
    # kept from the bf16 model, whose buffers were cast with it).
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [
        [cfg.bos_token_id] + tok.encode("a red circle in the top left").ids,
        [cfg.bos_token_id] + tok.encode("the painter mixes blue and yellow").ids[:9],
    ]
    cases = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0]
            greedy = list(ids)
            for _ in range(NEW_TOKENS):
                nxt = model(torch.tensor([greedy])).logits[0, -1].argmax().item()
                greedy.append(nxt)
            cases.append(
                {
                    "ids": ids,
                    "logits": logits.tolist(),
                    "greedy": greedy[len(ids):],
                }
            )
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump({"cases": cases}, f)
    files = sorted(os.listdir(path))
    print(name, files)


# The two checkpoints: (folder, seed, dtype, sharded weights, Llama config values).
CASES = [
    ("gqa_tied", 1, torch.float32, False, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-6)),
    ("mha_untied_bf16", 2, torch.bfloat16, True, dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_theta=10000.0, rms_norm_eps=1e-5)),
]


def main():
    tok = train_tokenizer()
    for name, seed, dtype, shard, kw in CASES:
        build(name, seed, tok, dtype, shard=shard, **kw)


if __name__ == "__main__":
    main()
