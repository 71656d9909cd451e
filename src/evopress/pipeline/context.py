"""The context of a run: its recipe, the loaded model, the calibration pool, the space and its evaluator.

Made once per process (``prepare``) and reused for other targets on the same model and pool
(``retarget``), so ``evopress pareto`` loads the model and runs the dense teacher once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..data import TokenPool, bos_token, check_samples, load_pool
from ..errors import UserError
from ..fitness import Evaluator
from ..hostmem import trim_heap
from ..models import Decoder, LoadedModel
from ..recipe import Recipe, check_inputs
from ..spaces import Space, make_space
from ..spaces.problem import Config


@dataclass
class Context:
    recipe: Recipe
    loaded: LoadedModel
    decoder: Decoder
    pool: TokenPool
    space: Space
    evaluator: Evaluator
    # baseline configurations made on this context, and their seconds: ``baseline_config``
    baseline_runs: dict[tuple, tuple[Config, float]] = field(default_factory=dict)


def prepare(recipe: Recipe, log: Callable[[str], None] = print, loaded: LoadedModel | None = None,
            summary: Callable[[str], None] | None = None) -> Context:
    """Model, space and calibration pool of a run; ``summary`` takes the line saying so (default: ``log``).

    The samples are checked against the pool before the model loads (the pool size is in the recipe),
    and so are the text and database named; a text too short for the pool is only known once
    tokenized, and is refused or warned about then.
    """
    check_inputs(recipe)
    check_samples(recipe.samples(), recipe.largest_stage(), recipe.pool_tokens(),
                  "the calibration pool", log)
    loaded = loaded or recipe.hardware.load(recipe.model, log)
    decoder = loaded.decoder
    # the pool before the space: tokenizing's temporaries (a few hundred MB of heap, handed back after)
    # then add to a model not yet fully paged in and no database cache (benchmarks/memory_phases.py)
    pool = _calibration_pool(recipe, loaded.tokenizer, log)
    trim_heap()
    space = make_space(recipe.space, decoder, recipe.target, recipe.space_options)
    space.check_calibration(pool)
    (summary or log)(
        f"model {loaded.name}: {decoder.num_blocks} blocks, head on {decoder.device} ({decoder.head.weight.dtype}); "
        f"calibration {pool.tokens} tokens of '{recipe.data}' in {len(pool.windows)} windows of {pool.seq_len}, "
        "drawn across the whole text" + ("" if pool.bos is None else f", each starting with BOS ({pool.bos})"))
    return Context(recipe, loaded, decoder, pool, space, Evaluator(space, pool, recipe.fitness))


def retarget(ctx: Context, recipe: Recipe) -> Context:
    """The context of another recipe on the same model and calibration pool (another target, method).

    The model is restored to dense first: a space reads the dense weights it will restore when built.
    The same space with the same options is retargeted (``make_space(reuse=...)``): a level database
    stays open and checked, its caches warm. The new evaluator shares the teacher cache, whose entries
    depend only on the model and the pool.
    """
    if recipe.pool_tokens() != ctx.recipe.pool_tokens() or recipe.data != ctx.recipe.data:
        raise ValueError("retarget keeps the calibration pool: the recipes must draw the same one")
    ctx.space.apply(None)
    same = (recipe.space, recipe.space_options) == (ctx.recipe.space, ctx.recipe.space_options)
    space = make_space(recipe.space, ctx.decoder, recipe.target, recipe.space_options,
                       reuse=ctx.space if same else None)
    space.check_calibration(ctx.pool)
    return Context(recipe, ctx.loaded, ctx.decoder, ctx.pool, space,
                   Evaluator(space, ctx.pool, recipe.fitness, teacher=ctx.evaluator.teacher))


def _calibration_pool(recipe: Recipe, tokenizer: Any, log: Callable[[str], None]) -> TokenPool:
    """The calibration pool; refused when ``--calib-tokens`` asked for more than the text holds.

    The default pool (``calib_tokens`` unset) shrinks to the whole text, as long as every sample
    still fits. It stays unset in the recipe: it is a function of the schedule and the text, so a
    rerun of recipe.json draws the same pool, and a resumed run's fingerprint matches its checkpoint.
    result.json records the pool's size.
    """
    want = recipe.pool_tokens()
    pool = load_pool(tokenizer, recipe.data, "calibration", recipe.seq_len, want, bos_token(tokenizer, recipe.bos))
    if pool.tokens < want:
        holder = f"all of data '{recipe.data}' in windows of {pool.seq_len}"
        if recipe.calib_tokens is not None:
            raise UserError(f"--calib-tokens {want} is more than {holder} ({pool.tokens} tokens); give "
                            f"--calib-tokens {pool.tokens} or less, or more text")
        check_samples(recipe.samples(), recipe.largest_stage(), pool.tokens, holder, log)
    return pool
