"""Command line: ``evopress search | baseline | pareto | import-config | export-config | eval | build-db | export |
run | report``.

Space-specific options come from the registered spaces (``SpacePlugin.options``); this module names none.

Every user mistake ends as one line on stderr and exit code 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from .distributed import RankFailed, is_main, main_only, session
from .errors import UserError
from .evolution import SearchConfig
from .fitness import AGGREGATES, METRICS, FitnessConfig
from .data import BOS_POLICIES, DEFAULT_CALIBRATION, DEFAULT_EVAL, MIN_POOL_TOKENS, STAGE_SHARE
from .interchange import OWN, all_formats
from .io import atomic_write
from .models import Hardware
from .recipe import AUTO, IMPORTED, NO_INIT, Recipe, make_recipe
from .spaces import DEFAULT_SPACE, PLUGINS, SpacePlugin, baselines, get_plugin
from .spaces.plugin import CliOption

Log = Callable[[str], None]


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


def _hardware_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: CUDA when present); with "
                   "--device-map, where the embeddings and LM head live")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device-map", default=None, help="spread the decoder blocks: auto, balanced, or JSON "
                   "{module: device} (devices: GPU index, cpu, disk); see docs/scaling.md")
    p.add_argument("--max-memory", default=None, help="memory per device for --device-map, e.g. "
                   "'0=70GiB,1=70GiB,cpu=200GiB'; blocks past it are offloaded to CPU RAM or disk")


POOL_HELP = (f"size of the calibration pool in tokens (default: the largest of {MIN_POOL_TOKENS}, {STAGE_SHARE} x "
             "the largest --stages sample and any other sample, or the whole text if shorter); windows are "
             "drawn at random (fixed seed) across the whole text. A sample larger than the pool is refused; "
             f"a stage sample over 1/{STAGE_SHARE} of it is warned about")


def _bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=BOS_POLICIES, help="start every window with the BOS token: "
                   "auto (if the tokenizer adds it by default, as Llama-3 and Gemma do), always, never")


def _model_args(p: argparse.ArgumentParser, calib_tokens: int | None = None, calib_help: str = POOL_HELP) -> None:
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: "
                   "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=DEFAULT_CALIBRATION, help="calibration text: wiki, ptb, a .txt/.jsonl "
                   f"file, or a+b (equal-token mix; default {DEFAULT_CALIBRATION})")
    _hardware_args(p)
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length in tokens")
    _bos_arg(p)
    p.add_argument("--calib-tokens", type=int, default=calib_tokens, help=calib_help)


def _space_options(p: argparse.ArgumentParser, options: list[CliOption]) -> None:
    """One argument per flag, shared by the spaces that declare it; unset values stay None."""
    merged: dict[str, list[CliOption]] = {}
    for option in options:
        merged.setdefault(option.dest, []).append(option)
    for same in merged.values():
        first = same[0]
        help_text = "; ".join(dict.fromkeys(o.help for o in same))
        if first.is_flag:
            p.add_argument(*first.flags, action="store_true", default=None, help=help_text)
        else:
            p.add_argument(*first.flags, type=first.type, default=None, help=help_text)


def _target_help() -> str:
    return "; ".join(plugin.target_help for plugin in PLUGINS.values())


def _common(p: argparse.ArgumentParser, target: str = "required") -> None:
    """The options of every command that makes a result; ``target``: required, optional or none (pareto)."""
    f = FitnessConfig()
    p.add_argument("--space", default=DEFAULT_SPACE, help=f"compression space ({', '.join(PLUGINS)})")
    if target != "none":
        p.add_argument("--target", type=float, required=target == "required", help=_target_help()
                       + ("" if target == "required" else " (default: the one the file meets)"))
    _space_options(p, [o for plugin in PLUGINS.values() for o in plugin.options])
    p.add_argument("--rules", type=Path, default=None, help="YAML list of constraints: {match: 're:...', "
                   "pin | min | max: level, tie: true} (see docs/constraints.md)")
    _model_args(p)
    p.add_argument("--fitness", default=f.metric, choices=METRICS)
    p.add_argument("--fitness-aggregate", default=f.aggregate, choices=AGGREGATES,
                   help="one number from a mix of calibration sources: tokens (mean over all tokens), sources "
                   "(mean over sources of each one's ratio to the initial parent's), worst (the largest ratio)")
    p.add_argument("--batch-size", type=int, default=f.batch_size)
    p.add_argument("--final-tokens", type=int, default=4096,
                   help="calibration tokens on which every method's final fitness is reported")
    p.add_argument("--seed", type=int, default=SearchConfig().seed)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--restart", action="store_true", help="start over: ignore (and replace) a checkpoint or "
                   "result made with other settings in --out")
    _output(p)


def _output(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON to stdout when done")


def _add_search(sub: Any) -> None:
    s = sub.add_parser("search", help="EvoPress evolutionary search")
    _common(s)
    _search_args(s)
    _baseline_args(s)


def _search_args(s: argparse.ArgumentParser) -> None:
    d, f = SearchConfig(), FitnessConfig()
    s.add_argument("--generations", type=int, default=d.generations)
    s.add_argument("--offspring", type=int, default=d.offspring, help="children per generation (lambda)")
    s.add_argument("--stages", default=",".join(f"{a}:{b}" for a, b in d.stages),
                   help="multi-step selection, survivors:tokens per stage (paper depth: 2:2048,1:32768)")
    s.add_argument("--max-switches", type=int, default=d.max_switches)
    s.add_argument("--accept-sigmas", type=float, default=d.accept_sigmas, help="a child replaces its parent only "
                   "when better by more than this many standard errors of their paired difference over the "
                   "last stage's windows (0: by any margin, the paper's rule)")
    s.add_argument("--initial-candidates", type=int, default=d.initial_candidates)
    s.add_argument("--initial-tokens", type=int, default=d.initial_tokens)
    s.add_argument("--init-from", default=AUTO, help="comma-separated baselines whose configurations join "
                   f"the initial population (a warm start); {AUTO} (default): the space's own ("
                   + "; ".join(f"{name}: {','.join(p.default_init) or NO_INIT}" for name, p in PLUGINS.items())
                   + f"; under --rules only those that take rules); {NO_INIT}: random only, the paper's start")
    s.add_argument("--no-prefix-reuse", action="store_true", help="run every candidate from the embeddings")
    s.add_argument("--prefix-cache-gb", type=float, default=f.cache_bytes / 2**30,
                   help="memory for block-boundary activations reused between candidates (on the model's "
                   "device); less keeps fewer boundaries, never changes results")
    s.add_argument("--track-every", type=int, default=5, help="every N generations and at the end, the parent's "
                   "fitness on --track-tokens calibration tokens held aside from the pool (the report's main "
                   "curve; 0: off)")
    s.add_argument("--track-tokens", type=int, default=2048, help="size of the fixed held-aside sample")
    s.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward batch, in whole windows "
                   "(instead of --batch-size windows): the same activation memory whatever --seq-len")


def _add_baseline(sub: Any) -> None:
    b = sub.add_parser("baseline", help="baseline configurations at the same budget")
    _common(b)
    b.add_argument("--method", required=True, help="; ".join(
        f"{name}: {', '.join(baselines(name))}" for name in PLUGINS))
    _baseline_args(b)


def _baseline_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--tokens", type=int, default=4096, help="calibration tokens a baseline looks at (in a "
                   "search: the --init-from baselines)")
    b.add_argument("--candidates", type=int, default=32, help="random: N of best-of-N")


def _add_pareto(sub: Any) -> None:
    p = sub.add_parser("pareto", help="search several budgets in one run and write the front with the baselines'")
    _common(p, target="none")
    p.add_argument("--targets", required=True, help="comma-separated ascending targets, e.g. 2.5,3,4 (" +
                   _target_help() + ")")
    p.add_argument("--baselines", default=None, help="comma-separated baselines run at every target (default: "
                   "the space's own; " + "; ".join(f"{name}: {', '.join(PLUGINS[name].baselines)}"
                                                   for name in PLUGINS) + "; '' for none)")
    _search_args(p)
    _baseline_args(p)
    _eval_args(p)


def _format_help(what: str) -> str:
    return f"{what}; " + "; ".join(f"{name}: {form.help}" for name, form in all_formats().items())


def _add_import_config(sub: Any) -> None:
    im = sub.add_parser("import-config", help="turn a text config (ours or the reference's) into a result")
    im.add_argument("config", type=Path)
    im.add_argument("--format", default=None, choices=list(all_formats()),
                    help=_format_help("layout of the file (default: recognised from the text)"))
    _common(im, target="optional")


def _add_export_config(sub: Any) -> None:
    x = sub.add_parser("export-config", help="write a result's configuration as a text config")
    x.add_argument("dir", type=Path, help="result directory")
    x.add_argument("--format", default=OWN, choices=list(all_formats()), help=_format_help(f"layout (default {OWN})"))
    x.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    _hardware_args(x)
    _output(x, json_flag=False)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="held-out perplexity and KL of a saved result")
    e.add_argument("dirs", type=Path, nargs="+", help="result directories (one model's share its teacher)")
    _eval_args(e)
    _bos_arg(e)
    _hardware_args(e)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--lm-eval", default=None, help="comma-separated lm-evaluation-harness tasks (zero-shot), "
                   "e.g. arc_easy,arc_challenge,hellaswag,piqa,winogrande; needs lm-eval and local task data")
    e.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    e.add_argument("--lm-eval-include", default=None, help="directory of extra lm-eval task YAMLs (e.g. tasks "
                   "over local data files: dataset_path: json, dataset_kwargs.data_files)")
    _output(e)


def _eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--eval-data", default=",".join(DEFAULT_EVAL), help="held-out evaluation, comma-separated: wiki, ptb, or files")
    e.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation set")
    e.add_argument("--eval-seq-len", type=int, default=512)


def _add_build_db(sub: Any) -> None:
    buildable = [name for name, plugin in PLUGINS.items() if plugin.build is not None]
    db = sub.add_parser("build-db", help=f"build a level database ({', '.join(buildable)})")
    db.add_argument("--space", required=True, help=" or ".join(buildable))
    _model_args(db, 16384, "size of the calibration pool in tokens, drawn at random (fixed seed) across the whole "
                "text (default: %(default)s)")
    db.add_argument("--batch-size", type=int, default=8)
    _space_options(db, [o for plugin in PLUGINS.values() for o in plugin.build_options])
    db.add_argument("--out", type=Path, required=True)
    _output(db)


def _add_export(sub: Any) -> None:
    x = sub.add_parser("export", help="write a compressed checkpoint (which loader reads it: README, Export)")
    x.add_argument("dir", type=Path)
    formats = sorted({f for plugin in PLUGINS.values() for f in plugin.export_formats})
    x.add_argument("--format", default=None, choices=formats or None,
                   help="checkpoint layout (default: the space's plain transformers checkpoint); "
                   + "; ".join(f"{name}: {', '.join(f for f in p.export_formats)}"
                               for name, p in PLUGINS.items() if p.export_formats))
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--finalize", action="store_true", help="re-solve the result's levels first (evopress finalize "
                   "DIR --out DIR-finalized, kept for eval and report; resumed or reused when already there) and "
                   "export that")
    x.add_argument("--calib-tokens", type=int, default=None, help="with --finalize: as finalize's")
    _hardware_args(x)
    _output(x)


def _add_finalize(sub: Any) -> None:
    f = sub.add_parser("finalize", help="re-solve a result's chosen levels on the finalized model's own inputs "
                       "(quant, sparsity, joint): a new result for eval, report and export")
    f.add_argument("dir", type=Path, help="a saved result")
    f.add_argument("--out", type=Path, required=True, help="the finalized result (rerun to resume after a kill)")
    f.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens of the result's text and "
                   "windows to solve on (default: 16384, as build-db)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--true-sequential", action="store_true", help="within a block too, solve each group of "
                   "layers that reads one input (q/k/v, o, gate/up, down) on the inputs left by the ones before")
    _hardware_args(f)
    _output(f)


def _add_run(sub: Any) -> None:
    rr = sub.add_parser("run", help="run a recipe file (YAML) describing a whole run")
    rr.add_argument("recipe", type=Path)
    rr.add_argument("--out", type=Path, default=None, help="output directory (default: the recipe's 'out')")
    rr.add_argument("--restart", action="store_true")
    _output(rr)


def _add_report(sub: Any) -> None:
    r = sub.add_parser("report", help="compare runs: markdown table and PNG plots")
    r.add_argument("dirs", type=Path, nargs="+")
    r.add_argument("--out", type=Path, required=True)
    _output(r, json_flag=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evopress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_search, _add_baseline, _add_pareto, _add_import_config, _add_export_config, _add_eval,
                _add_build_db, _add_export, _add_finalize, _add_run, _add_report):
        add(sub)
    return parser


def _hardware(args: argparse.Namespace) -> Hardware:
    return Hardware(args.device, args.dtype, args.device_map, args.max_memory)


def _declared(args: argparse.Namespace, plugin: SpacePlugin, options: tuple[CliOption, ...],
              everything: list[CliOption]) -> dict[str, Any]:
    """Values of ``plugin``'s options; an option set on the command line that this space lacks is a mistake."""
    own = {o.dest for o in options}
    for o in everything:
        if o.dest not in own and getattr(args, o.dest, None) not in (None, False):
            raise UserError(f"{o.flags[0]} is not an option of space '{plugin.name}'")
    return {o.dest: getattr(args, o.dest, None) for o in options}


def recipe_from_args(args: argparse.Namespace, method: str, target: float | None = None) -> Recipe:
    """The recipe of the command line; ``target`` replaces ``--target`` (pareto has none)."""
    plugin = get_plugin(args.space)
    given = _declared(args, plugin, plugin.options, [o for p in PLUGINS.values() for o in p.options])
    options = plugin.space_options(given)
    if args.rules is not None:
        from .api import load_yaml

        options["rules"] = load_yaml(args.rules, "rules")
    settings: dict[str, Any] = dict(
        space=args.space, target=args.target if target is None else target, method=method, model=args.model,
        data=args.data, device=args.device, dtype=args.dtype, device_map=args.device_map, max_memory=args.max_memory,
        bos=args.bos, seq_len=args.seq_len, calib_tokens=args.calib_tokens, space_options=options,
        final_tokens=args.final_tokens, seed=args.seed, metric=args.fitness, aggregate=args.fitness_aggregate,
        batch_size=args.batch_size)
    if args.command in ("search", "pareto"):
        settings.update(generations=args.generations, offspring=args.offspring, stages=parse_stages(args.stages),
                        max_switches=args.max_switches, accept_sigmas=args.accept_sigmas,
                        initial_candidates=args.initial_candidates,
                        initial_tokens=args.initial_tokens, prefix_reuse=not args.no_prefix_reuse,
                        cache_bytes=int(args.prefix_cache_gb * 2**30), batch_tokens=args.batch_tokens,
                        track_every=args.track_every, track_tokens=args.track_tokens,
                        init_from=args.init_from)
    if args.command in ("search", "baseline", "pareto"):
        settings.update(baseline_tokens=args.tokens, random_candidates=args.candidates)
    return make_recipe(settings)


def _search_or_baseline(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .api import run as run_recipe
    from .pipeline import RESULT

    recipe = recipe_from_args(args, "evopress" if args.command == "search" else args.method)  # checks the method
    result = run_recipe(recipe, args.out, restart=args.restart, progress=not args.quiet, log=log).data
    fitness = result["fitness"]
    log(f"{result['method']}: calibration {fitness['metric']} "
        f"{fitness['kl' if fitness['metric'] == 'kl' else 'nll']:.4f}; wrote {args.out / RESULT}")
    return result


def _pareto(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .front import ParetoSettings, parse_targets, run_pareto

    targets = parse_targets(args.targets, args.space)
    recipe = recipe_from_args(args, "evopress", target=targets[0])
    methods = None if args.baselines is None else [m for m in args.baselines.split(",") if m]
    settings = ParetoSettings(targets, methods, _eval_settings(args))
    return run_pareto(recipe, settings, args.out, restart=args.restart, progress=not args.quiet, log=log)


def _import_config(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from . import pipeline

    recipe = recipe_from_args(args, IMPORTED)
    return pipeline.import_config(args.config, recipe, args.out, log, args.format, args.restart)


def _export_config(args: argparse.Namespace, log: Log) -> None:
    from .pipeline import export_config

    text = export_config(args.dir, args.format, _hardware(args))
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        log(f"wrote {args.format} config to {args.out}")


def _run_recipe(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .api import run as run_recipe

    result = run_recipe(args.recipe, args.out, restart=args.restart, progress=not args.quiet, log=log).data
    if "eval" in result:  # the shape `evopress run` has always printed
        result = {"result": {k: v for k, v in result.items() if k != "eval"}, "eval": result["eval"]}
    return result


def _build_db(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .pipeline import DatabaseRequest, build_database

    plugin = get_plugin(args.space)
    if plugin.build is None:
        raise UserError(f"space '{args.space}' needs no database")
    given = _declared(args, plugin, plugin.build_options, [o for p in PLUGINS.values() for o in p.build_options])
    request = DatabaseRequest(args.space, args.out, plugin.builder_options(given), args.model, args.data,
                              args.device, args.dtype, args.seq_len, args.calib_tokens, args.batch_size, args.bos,
                              args.device_map, args.max_memory)
    return build_database(request, progress=not args.quiet, log=log)


def _export(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .pipeline import export_result
    from .pipeline.finalize import finalize_result, finalized_dir

    result = args.dir
    if args.finalize:
        result = finalized_dir(args.dir)
        finalize_result(args.dir, result, _hardware(args), args.calib_tokens, log=log, progress=not args.quiet)
    elif args.calib_tokens is not None:
        raise UserError("--calib-tokens is for --finalize")
    return export_result(result, args.out, _hardware(args), log, args.format)


def _finalize(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .pipeline.finalize import finalize_result

    return finalize_result(args.dir, args.out, _hardware(args), args.calib_tokens, args.batch_size, log,
                           progress=not args.quiet, true_sequential=args.true_sequential)


def _eval_settings(args: argparse.Namespace) -> Any:
    """Held-out evaluation settings; ``evopress eval`` adds its batch size and lm-eval tasks."""
    from .evaluate import EvalSettings

    extra = {} if args.command != "eval" else dict(
        batch_size=args.batch_size, lm_eval=[t for t in args.lm_eval.split(",") if t] if args.lm_eval else None,
        lm_eval_limit=args.lm_eval_limit, lm_eval_include=args.lm_eval_include)
    return EvalSettings([d for d in args.eval_data.split(",") if d], args.eval_tokens, args.eval_seq_len,
                        bos=args.bos, **extra)


def _eval(args: argparse.Namespace, log: Log) -> Any:
    from .pipeline import evaluate_results

    settings = _eval_settings(args)
    reports = evaluate_results(args.dirs, settings, _hardware(args), log, progress=not args.quiet)
    return reports[0] if len(reports) == 1 else reports


def _report(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from .report import write_report

    result = write_report(args.dirs, args.out)
    log(result["markdown"])
    return result


COMMANDS: dict[str, Callable[[argparse.Namespace, Log], Any]] = {
    "search": _search_or_baseline, "baseline": _search_or_baseline, "pareto": _pareto,
    "import-config": _import_config,
    "export-config": _export_config,
    "run": _run_recipe, "build-db": _build_db, "export": _export, "finalize": _finalize, "eval": _eval,
    "report": _report,
}
DISTRIBUTED = {"search", "baseline", "run"}  # the commands that evaluate candidates: one run under torchrun


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log: Log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    with session() if args.command in DISTRIBUTED else nullcontext():
        log = main_only(log)
        result = COMMANDS[args.command](args, log)
        if getattr(args, "json", False) and is_main():
            print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        return run(argv)
    except UserError as e:
        print(f"evopress: error: {e}", file=sys.stderr)
        return 2
    except RankFailed as e:  # a peer died or a collective timed out
        print(f"evopress: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nevopress: interrupted", file=sys.stderr)  # on a fresh line, not after a progress bar
        return 130
