"""Commands on saved results: import a configuration as a result, export one as text or as a checkpoint,
and evaluate results on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..data import check_source
from ..errors import UserError
from ..evaluate import EvalSettings, HeldOut, lm_eval_tasks, write_eval
from ..interchange import choose_format, format_config, get_format, implied_target, parse_config, read_text
from ..io import owned_dir, read_json
from ..models import Hardware, LoadedModel
from ..recipe import Recipe, check_inputs, make_recipe
from ..spaces import get_plugin
from ..version import __version__
from .context import prepare
from .outputs import EXPORTED, RESULT, claim_output, load_result, result_record, save_result


def import_config(path: Path, recipe: Recipe, out: Path, log: Callable[[str], None] = print,
                  fmt: str | None = None, restart: bool = False) -> dict[str, Any]:
    """A configuration found elsewhere (a text file in any format of the space, see interchange) as a result.

    ``fmt`` None: recognised from the text. ``recipe.target`` None: the file's own, so the model is
    loaded first to find it and ``out`` is claimed after; with a target it is claimed before. The
    model's summary is said once the file has parsed: a bad file is one line, alone.
    """
    text = read_text(path)
    name, form = choose_format(recipe.space, text, fmt, str(path))  # a file of another space says so first
    check_inputs(recipe)
    loaded = None
    if recipe.target is None:
        loaded = recipe.hardware.load(recipe.model, log)
        target = implied_target(text, form, recipe.space, loaded.decoder, recipe.space_options, str(path))
        recipe = make_recipe({**recipe.to_json(), "target": target})
    with claim_output(out, recipe, restart):
        said: list[str] = []
        ctx = prepare(recipe, log, loaded, summary=said.append)
        config = parse_config(text, ctx.space, str(path), form)
        for line in [f"read {path} as {name} (target {recipe.target:g})", *said]:
            log(line)
        result = result_record(ctx, config, [], 0.0)
        save_result(ctx.space, Path(out), result)
    return result


def export_config(out: Path, fmt: str, hardware: Hardware = Hardware()) -> str:
    """A saved result's configuration as text in format ``fmt`` of its space (the format checked first)."""
    form = get_format(read_json(Path(out) / RESULT)["space"], fmt)
    _, _, space, config = load_result(out, hardware)
    return format_config(space, config, form)


def export_result(out: Path, target: Path, hardware: Hardware = Hardware(),
                  log: Callable[[str], None] = print, fmt: str | None = None) -> dict[str, Any]:
    """Write a saved result as a checkpoint: the space's default layout, or its export format ``fmt``.

    ``target`` is claimed before the model loads (``io.owned_dir``): new, empty, or an earlier export
    (``EXPORTED`` lists its files, which this one replaces), never the model or a database the result
    reads; the files appear there only once all are written.
    """
    saved = read_json(Path(out) / RESULT)
    plugin = get_plugin(saved["space"])
    exporter = plugin.export if fmt is None else plugin.export_formats.get(fmt)
    if exporter is None:
        if plugin.export is None:
            raise UserError(f"export is not supported for space '{plugin.name}'")
        raise UserError(f"space '{plugin.name}' has no export format '{fmt}' "
                        f"(its formats: {', '.join(plugin.export_formats) or 'only the default'})")
    record = {"evopress_version": __version__, "result": str(Path(out).resolve()), "format": fmt}
    with owned_dir(target, EXPORTED, read_dirs(saved), record=record) as stage:
        result, loaded, space, config = load_result(out, hardware)
        summary = exporter(space.model_space, space.to_model_levels(config), stage, loaded.tokenizer)
    log(f"exported {result['method']} {result['space']} {result['target']:g} to {target}"
        + (f" as {fmt}" if fmt else ""))
    return {k: v.replace(str(stage), str(target)) if isinstance(v, str) else v for k, v in summary.items()}


def read_dirs(result: dict[str, Any]) -> dict[Path, str]:
    """The directories exporting ``result`` reads, which its --out must not be: the model it was searched
    on and its databases (the space options stored by absolute path)."""
    options = result.get("space_options") or {}
    reads = {Path(v): "a level database this result reads" for v in options.values()
             if isinstance(v, str) and Path(v).is_absolute()}
    model = (result.get("recipe") or {}).get("model")
    if model:
        reads[Path(model)] = "the model this result was searched on"
    return reads


def evaluate_results(dirs: list[Path], settings: EvalSettings, hardware: Hardware = Hardware(),
                     log: Callable[[str], None] = print, progress: bool = False) -> list[dict[str, Any]]:
    """Held-out PPL and KL for each saved result; results of one model share the model and teachers."""
    from tqdm.auto import tqdm

    # every directory and text is checked before the first (long) evaluation: a typo fails at once
    models = [Recipe.from_json(read_json(Path(out) / RESULT)["recipe"]).model for out in dirs]
    for source in settings.data:
        check_source(source)
    reports = []
    loaded: LoadedModel | None = None
    held_out: HeldOut | None = None
    bar = None  # shown once the first result is done: a mistake found on the way to it is one line, alone
    for out, model in zip(dirs, models):
        if loaded is not None and model != loaded.name and not (model is None and loaded.name == "default"):
            loaded = held_out = None
        result, loaded, space, config = load_result(out, hardware, loaded)
        held_out = held_out or HeldOut(loaded, loaded.decoder, settings)
        extra = {"lm_eval": lm_eval_tasks(loaded, space, config, settings)} if settings.lm_eval else None
        log(f"evaluating {out} ({result['method']}, {result['space']} {result['target']:g})")
        reports.append(write_eval(Path(out), result, held_out.measure(space, config, log), log, extra))
        bar = bar or tqdm(total=len(dirs), desc="eval", unit="result", disable=not progress)
        bar.update()
    if bar is not None:
        bar.close()
    return reports
