"""Held-out evaluation: perplexity and KL to the dense model, GPTQ-style windows.

Several results of the same model are evaluated in one process: the model is loaded once and the
dense model's hidden states on each evaluation set (the teacher) are computed once and shared.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import DEFAULT_EVAL, PROTOCOL, TokenPool, bos_token, load_pool
from .errors import UserError
from .fitness import Evaluator, FitnessConfig, TeacherCache
from .io import read_json, write_json
from .models import Decoder, LoadedModel
from .spaces.problem import Config
from .spaces.space import Space

EVAL = "eval.json"


@dataclass
class EvalSettings:
    data: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL))
    tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    lm_eval: list[str] | None = None  # lm-evaluation-harness tasks, zero-shot
    lm_eval_limit: int | None = None  # examples per task (None: all)
    lm_eval_include: str | None = None  # directory of extra task YAMLs, e.g. tasks over local data files
    bos: str = "auto"  # BOS at the start of every window: auto (as the tokenizer does), always, never

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("--eval-data names no evaluation text")
        if self.seq_len < 2 or self.batch_size < 1:
            raise UserError("--eval-seq-len must be >= 2 and --batch-size >= 1")
        if self.tokens < self.seq_len:
            raise UserError(f"--eval-tokens {self.tokens} is less than one window of --eval-seq-len {self.seq_len}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise UserError("--lm-eval-limit must be >= 1")


def protocol(source: str, pool: TokenPool, positions: int) -> str:
    """How a number in eval.json was measured, led by the protocol's name (``data.PROTOCOL``)."""
    bos = f" (BOS token {pool.bos} then {pool.seq_len - 1} of text)" if pool.bos is not None else ""
    return (f"{PROTOCOL}; '{source}' evaluation split: the first {len(pool.windows)} non-overlapping windows "
            f"of {pool.seq_len} tokens{bos}, remainder dropped; PPL = exp(mean NLL over {positions} predicted "
            "positions); KL = mean per-position KL(dense || compressed) over the full vocabulary")


class HeldOut:
    """Evaluation pools and their dense teachers for one loaded model."""

    def __init__(self, loaded: LoadedModel, decoder: Decoder, settings: EvalSettings):
        self.settings = settings
        bos = bos_token(loaded.tokenizer, settings.bos)
        self.pools = {s: load_pool(loaded.tokenizer, s, "evaluation", settings.seq_len, settings.tokens, bos)
                      for s in settings.data}
        self.teachers = {s: TeacherCache(decoder, pool, settings.batch_size) for s, pool in self.pools.items()}

    def measure(self, space: Space, config: Config,
                log: Callable[[str], None] = lambda msg: None) -> dict[str, dict[str, Any]]:
        out = {}
        try:
            for source, pool in self.pools.items():
                log(f"  held-out '{source}': {pool.tokens} tokens")
                fitness = FitnessConfig(batch_size=self.settings.batch_size, prefix_reuse=False)
                evaluator = Evaluator(space, pool, fitness, teacher=self.teachers[source])
                m = evaluator.measure([config], pool.first(pool.tokens))[0]
                out[source] = {"ppl": float(np.exp(m.nll)), "kl": m.kl, "dense_ppl": float(np.exp(m.dense_nll)),
                               "tokens": pool.tokens, "protocol": protocol(source, pool, m.positions)}
        finally:
            space.apply(None)  # the next result may build its space on the same model
        return out


def result_id(result: dict[str, Any]) -> str:
    """Which configuration of which model an evaluation belongs to."""
    key = [result["recipe"].get("model"), result["space"], result["units"], result["levels"]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def write_eval(out: Path, result: dict[str, Any], datasets: dict[str, dict[str, Any]],
               log: Callable[[str], None], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write eval.json, keeping what an earlier evaluation of the same result measured on other sets."""
    for source, d in datasets.items():
        log(f"{out} {source}: ppl {d['ppl']:.3f} (dense {d['dense_ppl']:.3f}), kl {d['kl']:.4f} "
            f"on {d['tokens']} tokens")
    path = Path(out) / EVAL
    rid = result_id(result)
    before = read_json(path) if path.is_file() else {}
    if not isinstance(before, dict) or before.get("result_id") != rid:
        before = {}
    datasets = {**before.get("datasets", {}), **datasets}
    extra = {k: {**before.get(k, {}), **v} if isinstance(v, dict) else v for k, v in (extra or {}).items()}
    report = {**before, **next(iter(datasets.values())), "datasets": datasets, "method": result["method"],
              "space": result["space"], "target": result["target"], "model": result.get("model"),
              "result_id": rid, **extra}
    write_json(path, report)
    return report


def lm_eval_tasks(loaded: LoadedModel, space: Space, config: Config, settings: EvalSettings) -> dict[str, Any]:
    """Zero-shot tasks with lm-evaluation-harness, on the compressed model held in memory.

    Works offline only when lm-eval is installed and the tasks' data sets are local (the HF cache, or
    data files named by task YAMLs in ``lm_eval_include``); otherwise one line says what is missing.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4'") from e
    include = settings.lm_eval_include
    if include is not None and not Path(include).is_dir():
        raise UserError(f"--lm-eval-include {include}: not a directory of task YAML files")
    space.apply(config)
    try:
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=settings.batch_size,
                  device=str(loaded.decoder.device))
        out = simple_evaluate(model=lm, tasks=settings.lm_eval, num_fewshot=0, limit=settings.lm_eval_limit,
                              log_samples=False, task_manager=TaskManager(include_path=include))
    except Exception as e:  # data sets missing offline surface as many exception types
        raise UserError(f"lm-eval could not run {','.join(settings.lm_eval)} offline: {str(e).splitlines()[0][:200]} "
                        "(are the task data sets in the local HF cache?)") from e
    finally:
        space.apply(None)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
