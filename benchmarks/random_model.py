"""Write a randomly initialised Llama checkpoint of a chosen shape, with the default model's tokenizer.

    python benchmarks/random_model.py --out runs/tinyllama-shape            # TinyLlama-1.1B's shape
    python benchmarks/random_model.py --out runs/m --hidden 1024 --layers 8 --intermediate 2816

Why: memory and speed do not depend on the weights' values, and this machine has no network and only
the 135M default model. A search's host memory is a fixed runtime plus what grows with the model, and
one small model cannot tell them apart; a larger checkpoint built here can. Quality numbers from such a
model mean nothing. The vocabulary is the default tokenizer's, so every evopress command runs on it
as on any local HF model directory (``--model DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from evopress.models import resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    _, default = resolve_model_path(None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default, local_files_only=True)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype=args.dtype)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e9:.2f}B parameters, {params * model.dtype.itemsize / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
