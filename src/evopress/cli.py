"""Command line: ``evopress search | baseline | eval | report``.

Every user mistake ends as one line on stderr and exit code 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .baselines import baseline_methods
from .errors import UserError
from .fitness import METRICS, FitnessConfig
from .evolution import SearchConfig
from .spaces import SPACES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UserError(message)


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``"2:2048,1:32768"`` -> [(2, 2048), (1, 32768)]: survivors and tokens per stage."""
    try:
        stages = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        stages = []
    if not stages or any(len(s) != 2 for s in stages):
        raise UserError(f"--stages '{text}' must look like '2:2048,1:32768' (survivors:tokens, ...)")
    return stages  # type: ignore[return-value]


def _model_args(p: argparse.ArgumentParser, calib_tokens: int = 32768) -> None:
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: "
                   "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="wiki", help="calibration text: wiki, ptb, or a .txt/.jsonl file")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length in tokens")
    p.add_argument("--calib-tokens", type=int, default=calib_tokens, help="size of the calibration pool")


def _common(p: argparse.ArgumentParser) -> None:
    d = SearchConfig()
    f = FitnessConfig()
    p.add_argument("--space", default="drop", help=f"compression space ({', '.join(SPACES)})")
    p.add_argument("--target", type=float, required=True,
                   help="drop: fraction of sub-blocks of each kind to remove, e.g. 0.25; sparsity: average "
                   "fraction of zeros in the blocks' linear weights, e.g. 0.5; quant: average bits per weight, e.g. 3 or 2.5")
    p.add_argument("--granularity", default="sublayer", help="drop space: sublayer (attention and MLP "
                   "separately, as in the paper) or block (whole blocks)")
    p.add_argument("--db", default=None, help="sparsity/quant: level database built by build-db")
    p.add_argument("--rules", type=Path, default=None, help="YAML list of constraints: {match: 're:...', "
                   "pin | min | max: level, tie: true} (see docs/constraints.md)")
    p.add_argument("--group-rule", default=None, help="sparsity/quant: which layers may trade levels: "
                   "global, size (equal-size layers) or name (same projection)")
    p.add_argument("--count-overhead", action="store_true", help="quant: the budget counts each group's fp16 "
                   "scale and zero point too (true bytes); default: weight bits only, as the paper")
    _model_args(p)
    p.add_argument("--fitness", default=f.metric, choices=METRICS)
    p.add_argument("--batch-size", type=int, default=f.batch_size)
    p.add_argument("--final-tokens", type=int, default=4096,
                   help="calibration tokens on which every method's final fitness is reported")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="print result.json to stdout when done")


def build_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    parser = _Parser(prog="evopress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="EvoPress evolutionary search")
    _common(s)
    s.add_argument("--generations", type=int, default=d.generations)
    s.add_argument("--offspring", type=int, default=d.offspring, help="children per generation (lambda)")
    s.add_argument("--stages", default=",".join(f"{a}:{b}" for a, b in d.stages),
                   help="multi-step selection, survivors:tokens per stage (paper depth: 2:2048,1:32768)")
    s.add_argument("--max-switches", type=int, default=d.max_switches)
    s.add_argument("--initial-candidates", type=int, default=d.initial_candidates)
    s.add_argument("--initial-tokens", type=int, default=d.initial_tokens)
    s.add_argument("--init-from", default="", help="comma-separated baselines whose configurations join "
                   "the random initial population (e.g. shortgpt,angular); default: random only, as the paper")
    s.add_argument("--no-prefix-reuse", action="store_true", help="run every candidate from the embeddings")
    s.add_argument("--prefix-cache-gb", type=float, default=FitnessConfig().cache_bytes / 2**30,
                   help="memory for block-boundary activations reused between candidates (on the model's "
                   "device); less keeps fewer boundaries, never changes results")
    s.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")

    b = sub.add_parser("baseline", help="baseline configurations at the same budget")
    _common(b)
    b.add_argument("--method", required=True, help="drop: shortgpt, angular, random; sparsity: uniform, owl, "
                   "random; quant: uniform, dp, random")
    b.add_argument("--tokens", type=int, default=4096, help="calibration tokens the baseline looks at")
    b.add_argument("--candidates", type=int, default=32, help="random: N of best-of-N")

    im = sub.add_parser("import-config", help="turn a text config ('module: level' lines) into a result")
    im.add_argument("config", type=Path)
    _common(im)

    e = sub.add_parser("eval", help="held-out perplexity and KL of a saved result")
    e.add_argument("dirs", type=Path, nargs="+", help="result directories (one model's share its teacher)")
    e.add_argument("--eval-data", default="wiki,ptb", help="comma-separated: wiki, ptb, or files")
    e.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation set")
    e.add_argument("--eval-seq-len", type=int, default=512)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--lm-eval", default=None, help="comma-separated lm-evaluation-harness tasks (zero-shot), "
                   "e.g. arc_easy,arc_challenge,hellaswag,piqa,winogrande; needs lm-eval and local task data")
    e.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    e.add_argument("--lm-eval-include", default=None, help="directory of extra lm-eval task YAMLs (e.g. tasks "
                   "over local data files: dataset_path: json, dataset_kwargs.data_files)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")

    db = sub.add_parser("build-db", help="build a level database (sparsity, quant)")
    db.add_argument("--space", required=True, help="sparsity or quant")
    _model_args(db, calib_tokens=16384)
    db.add_argument("--batch-size", type=int, default=8)
    db.add_argument("--target", type=float, default=None, help="sparsity: the average sparsity the levels centre "
                    "on (default 0.5); the database serves any search target inside its level range")
    db.add_argument("--levels", type=int, default=None, help="sparsity: levels on each side of the target (default 8)")
    db.add_argument("--step", type=int, default=None, help="sparsity: weights pruned per level step, the same for "
                    "every layer (default: min(largest layer / 50, smallest layer / 4))")
    db.add_argument("--method", default=None, help="sparsity: sparsegpt (default), wanda, magnitude")
    db.add_argument("--bits", default=None, help="quant: comma-separated bitwidths, e.g. 2,3,4,5,6,8")
    db.add_argument("--group-size", type=int, default=None, help="quant: columns per scale/zero group")
    db.add_argument("--calib-bits", type=int, default=None, help="quant: bitwidth installed between blocks")
    db.add_argument("--out", type=Path, required=True)
    db.add_argument("--quiet", action="store_true")
    db.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="write a compressed checkpoint that transformers loads")
    x.add_argument("dir", type=Path)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--device", default=None)
    x.add_argument("--dtype", default=None)
    x.add_argument("--quiet", action="store_true")
    x.add_argument("--json", action="store_true")

    rr = sub.add_parser("run", help="run a recipe file (YAML) describing a whole run")
    rr.add_argument("recipe", type=Path)
    rr.add_argument("--out", type=Path, default=None, help="output directory (default: the recipe's 'out')")
    rr.add_argument("--restart", action="store_true")
    rr.add_argument("--quiet", action="store_true")
    rr.add_argument("--json", action="store_true")

    r = sub.add_parser("report", help="compare runs: markdown table and PNG plots")
    r.add_argument("dirs", type=Path, nargs="+")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--quiet", action="store_true")
    return parser


def recipe_from_args(args: argparse.Namespace, method: str):
    from .pipeline import Recipe

    search = SearchConfig(seed=args.seed)
    if args.command == "search":
        search = SearchConfig(generations=args.generations, offspring=args.offspring,
                              stages=parse_stages(args.stages), max_switches=args.max_switches,
                              initial_candidates=args.initial_candidates,
                              initial_tokens=args.initial_tokens, seed=args.seed)
        search.validate()
    fitness = FitnessConfig(metric=args.fitness, batch_size=args.batch_size,
                            prefix_reuse=not getattr(args, "no_prefix_reuse", False))
    if args.command == "search":
        if args.prefix_cache_gb < 0:
            raise UserError("--prefix-cache-gb must be >= 0")
        fitness.cache_bytes = int(args.prefix_cache_gb * 2**30)
    options = SPACES[args.space].options_from_args(args)
    if args.rules is not None:
        from .api import load_yaml

        options["rules"] = load_yaml(args.rules, "rules")
    recipe = Recipe(space=args.space, target=args.target, method=method, model=args.model, data=args.data,
                    device=args.device, dtype=args.dtype, seq_len=args.seq_len,
                    calib_tokens=args.calib_tokens, space_options=options, search=search, fitness=fitness,
                    final_tokens=args.final_tokens)
    if args.command == "search":
        recipe.init_from = [m for m in args.init_from.split(",") if m]
    if args.command == "baseline":
        recipe.baseline_tokens, recipe.random_candidates = args.tokens, args.candidates
    return recipe


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    from . import pipeline

    if args.command == "search":
        from .distributed import init_from_env

        args.device = init_from_env() or args.device
        from .distributed import is_main

        if not is_main():
            log = lambda msg: None  # noqa: E731  (one voice per run: rank 0's)
    if args.command == "import-config":
        result = pipeline.import_config(args.config, recipe_from_args(args, "imported"), args.out, log)
    elif args.command in ("search", "baseline"):
        if args.space not in SPACES:
            raise UserError(f"unknown space '{args.space}' (choose from {', '.join(SPACES)})")
        if args.command == "baseline" and args.method not in baseline_methods(args.space):
            raise UserError(f"unknown method '{args.method}' for space '{args.space}' "
                            f"(choose from {', '.join(baseline_methods(args.space))})")
        recipe = recipe_from_args(args, "evopress" if args.command == "search" else args.method)
        ctx = pipeline.prepare(recipe, log)
        if args.command == "search":
            result = pipeline.run_search(ctx, args.out, restart=args.restart, progress=not args.quiet, log=log)
        else:
            result = pipeline.run_baseline(ctx, args.out, log)
        log(f"{result['method']}: calibration {result['fitness']['metric']} "
            f"{result['fitness']['kl' if result['fitness']['metric'] == 'kl' else 'nll']:.4f}; "
            f"wrote {args.out / pipeline.RESULT}")
    elif args.command == "run":
        from .api import load_recipe_file, run as run_recipe

        data = load_recipe_file(args.recipe)
        out = args.out or data.pop("out", None)
        data.pop("out", None)
        evaluation = data.pop("eval", None)
        if out is None:
            raise UserError(f"recipe {args.recipe} has no 'out' and no --out was given")
        result = run_recipe(data, out, restart=args.restart, progress=not args.quiet, log=log).data
        if evaluation is not None:
            from .evaluate import EvalSettings

            try:
                settings = EvalSettings(**{"data": ["wiki"], **evaluation})
            except TypeError as e:
                raise UserError(f"recipe {args.recipe}: bad 'eval' section ({e})") from e
            result = {"result": result, "eval": pipeline.evaluate_results([Path(out)], settings, log=log)[0]}
    elif args.command == "build-db":
        result = pipeline.build_database(args, progress=not args.quiet, log=log)
    elif args.command == "export":
        result = pipeline.export_result(args.dir, args.out, args.device, args.dtype, log)
    elif args.command == "eval":
        from .evaluate import EvalSettings

        settings = EvalSettings([d for d in args.eval_data.split(",") if d], args.eval_tokens,
                                args.eval_seq_len, args.batch_size,
                                [t for t in args.lm_eval.split(",") if t] if args.lm_eval else None,
                                args.lm_eval_limit, args.lm_eval_include)
        reports = pipeline.evaluate_results(args.dirs, settings, args.device, args.dtype, log,
                                            progress=not args.quiet)
        result = reports[0] if len(reports) == 1 else reports
    else:
        from .report import write_report

        result = write_report(args.dirs, args.out)
        log(result["markdown"])
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        return run(argv)
    except UserError as e:
        print(f"evopress: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        from .distributed import world_size

        if world_size() <= 1:
            raise
        # a peer died or a collective timed out: one clear line instead of a wall of gloo/nccl traces
        print(f"evopress: error: distributed run failed on this rank: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evopress: interrupted", file=sys.stderr)
        return 130
