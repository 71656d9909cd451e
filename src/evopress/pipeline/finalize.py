"""``finalize``: a saved result's profile re-solved layer by layer on the finalized model's own inputs,
written as a new result that ``eval``, ``report`` and ``export`` take (``spaces/finalize.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..data import bos_token, load_pool
from ..errors import UserError
from ..io import read_json
from ..models import Hardware
from ..recipe import Recipe, make_recipe
from ..spaces import get_plugin
from ..spaces.finalize import finalize_layers
from .context import prepare
from .outputs import RESULT, claim_output, load_result, result_record, save_result
from .saved import read_dirs

DEFAULT_TOKENS = 16384  # as build-db's default pool
OVERLAY_DIR = "db"  # the overlay database under the finalized result's directory


def finalized_dir(out: Path) -> Path:
    """Where ``export --finalize`` and a recipe's ``finalize`` section put the finalized result by default."""
    return Path(f"{Path(out)}-finalized")  # Path drops a trailing slash


def finalize_result(out: Path, target: Path, hardware: Hardware = Hardware(), calib_tokens: int | None = None,
                    batch_size: int = 8, log: Callable[[str], None] = print, progress: bool = True,
                    true_sequential: bool = False) -> dict[str, Any]:
    """Re-solve the result in ``out`` into ``target``: an overlay database and a result marked finalized.

    The calibration text and windows are the result's (``--data``, ``--seq-len``, BOS rule), the pool
    ``calib_tokens`` long (default as ``build-db``). The new result has the same profile and budget;
    its final fitness is measured again on the finalized levels, the stitched one kept beside it.
    Rerunning after a kill resumes: finished layers are read back, not solved again.
    """
    out, target = Path(out), Path(target)
    saved = read_json(out / RESULT)
    plugin = get_plugin(saved["space"])
    if plugin.finalize is None:
        raise UserError(f"a '{plugin.name}' result has nothing to re-solve (its levels are not solved per layer); "
                        f"export {out} as it is")
    if saved.get("finalized"):
        raise UserError(f"{out} is already finalized (from {saved['finalized']['from']})")
    for path, what in {out: "the result itself", **read_dirs(saved)}.items():
        if target.resolve() == path.resolve():
            raise UserError(f"--out {target} is {what}; finalize writes a new result in a new directory")
    recipe = Recipe.from_json(saved["recipe"])
    tokens = DEFAULT_TOKENS if calib_tokens is None else calib_tokens
    if tokens < recipe.seq_len:
        raise UserError(f"--calib-tokens {tokens}: finalize needs at least one window of {recipe.seq_len} tokens")
    start = time.perf_counter()
    overlay = target.resolve() / OVERLAY_DIR
    finalized = make_recipe({**recipe.to_json(), "space_options": {**recipe.space_options, "db": str(overlay)}})
    with claim_output(target, finalized):
        _, loaded, space, config = load_result(out, hardware)
        pool = load_pool(loaded.tokenizer, recipe.data, "calibration", recipe.seq_len, tokens,
                         bos_token(loaded.tokenizer, recipe.bos))
        model_space, levels = space.model_space, space.to_model_levels(config)
        model_space.apply(None)
        try:
            base, jobs = plugin.finalize(model_space, levels)
            log(f"finalizing {len(jobs)} layers of {out} ({saved['method']}, {saved['space']} "
                f"{saved['target']:g}) on {pool.tokens} tokens of '{recipe.data}'")
            finalize_layers(loaded.decoder, pool, base, jobs, overlay, batch_size, progress, true_sequential)
        finally:
            model_space.apply(None)
        ctx = prepare(finalized, log, loaded)
        result = result_record(ctx, ctx.space.from_model_levels(levels), saved["history"], saved["seconds"])
        result["finalized"] = {"from": str(out.resolve()), "base_db": str(base.root.resolve()),
                               "calibration": {"data": recipe.data, "tokens": pool.tokens, "seq_len": pool.seq_len},
                               "true_sequential": true_sequential,
                               "seconds": round(time.perf_counter() - start, 1),
                               "stitched_fitness": saved["fitness"]}
        save_result(ctx.space, target, result)
    log(f"finalized result written to {target}: calibration KL {saved['fitness']['kl']:.4f} stitched, "
        f"{result['fitness']['kl']:.4f} finalized")
    return result
