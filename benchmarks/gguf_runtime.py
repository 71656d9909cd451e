"""Run every result of benchmarks/gguf.sh in llama.cpp: greedy agreement with our torch model, and speed.

For each result directory under OUT (the pareto's searches and baselines, the presets without imatrix):
export it as a GGUF (``evopress export``), read that file back with transformers (gguf-py dequantizes the
very weights the search scored), and run it in llama.cpp through xllamacpp. Agreement: the fraction of
positions of a held-out Wikipedia window (teacher-forced) where llama.cpp's greedy next token equals the
torch model's argmax; llama.cpp also quantizes the activations (Q8_0/Q8_1/Q8_K), so 100% is not expected,
and the source GGUF against the dense torch model gives the floor of that mismatch. Speed: greedy tokens per
second after a 32-token prompt, one thread. Writes runtime.json beside each result.

    python benchmarks/gguf_runtime.py OUT [--positions 256] [--generate 64] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from evopress.data import load_pool
from evopress.io import write_json
from evopress.models import Hardware, gguf_source
from evopress.pipeline.saved import export_result
from evopress.spaces.gguf.runtime import generation_speed, server, teacher_forced_top1


def torch_top1(gguf: Path, ids: torch.Tensor) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        return model(ids[None]).logits[0, :-1].argmax(-1).numpy()


def measure(gguf: Path, ids: torch.Tensor, reference: np.ndarray, generate: int, threads: int) -> dict:
    srv = server(gguf, n_ctx=len(ids) + generate + 8, threads=threads)
    top1 = np.array(teacher_forced_top1(srv, ids.tolist()))
    _, speed = generation_speed(srv, ids[:32].tolist(), generate)
    return {"agreement": float(np.mean(top1 == reference)), "positions": len(top1), "tokens_per_s": speed,
            "file_bytes": gguf.stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    loaded = Hardware().load(None)
    ids = load_pool(loaded.tokenizer, "wiki", "evaluation", args.positions + 1, args.positions + 1).windows[0]
    source = gguf_source(loaded.path)
    with torch.no_grad():
        dense = loaded.model(ids[None]).logits[0, :-1].argmax(-1).numpy()
    floor = measure(source, ids, dense, args.generate, args.threads)
    write_json(args.out / "runtime-source.json", {"gguf": str(source), **floor})
    print(f"source {source.name}: agreement with the dense torch model {floor['agreement']:.3f}, "
          f"{floor['tokens_per_s']:.1f} tokens/s")
    for result in sorted(args.out.rglob("result.json")):
        d = result.parent
        if (d / "runtime.json").is_file():
            continue
        export = d / "export"
        if not (export / "model.gguf").is_file():
            export_result(d, export)
        gguf = export / "model.gguf"
        record = measure(gguf, ids, torch_top1(gguf, ids), args.generate, args.threads)
        write_json(d / "runtime.json", record)
        print(f"{d.relative_to(args.out)}: agreement {record['agreement']:.3f}, {record['tokens_per_s']:.1f} "
              f"tokens/s, {record['file_bytes']:,} bytes")


if __name__ == "__main__":
    main()
