"""Dense perplexity of the default model under the evaluation protocol (docs/protocol.md).

    python benchmarks/dense_ppl.py [--windows 40 --seq-len 512 --data wiki,ptb]

For each evaluation set: the first ``--windows`` non-overlapping windows of the held-out text, exactly
as ``evopress eval`` builds them (``evopress.data.load_pool``), and for comparison the stream the
result tables in README.md and docs/ were measured on before the protocol was fixed (each document
tokenized on its own with a trailing blank line, the ids concatenated).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

from evopress.data import SEPARATOR, documents, load_pool
from evopress.models import load_model


def per_document_windows(tokenizer, source: str, seq_len: int, windows: int) -> torch.Tensor:
    """The earlier stream: documents tokenized one by one, until enough windows."""
    ids: list[int] = []
    for doc in documents(source, "evaluation"):
        ids.extend(tokenizer(doc + SEPARATOR, add_special_tokens=False)["input_ids"])
        if len(ids) >= windows * seq_len:
            break
    return torch.tensor(ids[: windows * seq_len]).view(windows, seq_len)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean NLL over the predicted positions of every window), no BOS, windows independent."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(windows), batch_size):
            ids = windows[s: s + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--data", default="wiki,ptb")
    args = p.parse_args()
    loaded = load_model(None, torch.device("cpu"), torch.float32)
    for source in args.data.split(","):
        joined = load_pool(loaded.tokenizer, source, "evaluation", args.seq_len, args.windows * args.seq_len).windows
        old = per_document_windows(loaded.tokenizer, source, args.seq_len, args.windows)
        print(f"{source}: dense PPL {perplexity(loaded.model, joined):.2f} (joined text, the protocol), "
              f"{perplexity(loaded.model, old):.2f} (documents tokenized one by one, before); "
              f"first {args.windows} windows of {args.seq_len}, {np.prod(joined[:, 1:].shape)} predicted positions",
              flush=True)


if __name__ == "__main__":
    main()
