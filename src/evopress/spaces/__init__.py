"""Compression spaces: the registry of space plugins, and building a space (with rules) by name.

Adding a space: write a package under ``spaces/`` whose ``PLUGIN`` describes it (``SpacePlugin``),
and add it to ``_BUILTIN`` below. Nothing outside ``spaces/`` names a space.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import UserError
from ..models import Decoder
from . import drop, gguf, joint, quant, sparsity, width
from .plugin import Baseline, SpacePlugin
from .problem import Config, Problem
from .space import Space
from .constraints import ConstrainedSpace, parse_rules
from .random_search import best_of_random

_BUILTIN = (drop.PLUGIN, sparsity.PLUGIN, quant.PLUGIN, joint.PLUGIN, gguf.PLUGIN, width.PLUGIN)  # the registry: one line per space
PLUGINS: dict[str, SpacePlugin] = {p.name: p for p in _BUILTIN}
DEFAULT_SPACE = drop.PLUGIN.name


def register(plugin: SpacePlugin) -> None:
    """Make a space available to the CLI, the pipeline and recipes (a third-party space calls this)."""
    PLUGINS[plugin.name] = plugin


def get_plugin(name: str) -> SpacePlugin:
    if name not in PLUGINS:
        raise UserError(f"unknown space '{name}' (choose from {', '.join(PLUGINS)})")
    return PLUGINS[name]


def baselines(name: str) -> dict[str, Baseline]:
    """The space's own baselines plus best-of-N random, which works in any space."""
    return {**get_plugin(name).baselines, "random": best_of_random}


def baseline(name: str, method: str, flag: str = "") -> Baseline:
    """Baseline ``method`` of space ``name``; refused with the choices if the space has none by that name.
    ``flag``: the option that named it, for the message (e.g. ``--init-from``)."""
    methods = baselines(name)
    if method not in methods:
        raise UserError(f"{flag + ': ' if flag else ''}unknown method '{method}' for space '{name}' "
                        f"(choose from {', '.join(methods)})")
    return methods[method]


def default_init(name: str, options: dict[str, Any]) -> list[str]:
    """The baselines that warm-start a search of space ``name`` unless told otherwise (``--init-from auto``)."""
    plugin = get_plugin(name)
    if options.get("rules") and plugin.default_init_with_rules is not None:
        return list(plugin.default_init_with_rules)
    return list(plugin.default_init)


def check_space_settings(name: str, target: float | None, options: dict[str, Any]) -> None:
    """Refuse an unknown space, a target outside its range or an option it lacks, before any model loads.

    ``target`` None: an imported configuration's own, found once the file is read.
    """
    plugin = get_plugin(name)
    if plugin.check_target is not None and target is not None:
        plugin.check_target(target)
    accepted = inspect.signature(plugin.space).parameters
    unknown = sorted(set(options) - set(accepted) - {"rules"})
    if unknown:  # e.g. a recipe's space_options meant for another space
        known = [k for k in accepted if k not in ("decoder", "target")]
        raise UserError(f"space '{name}' has no option {', '.join(map(repr, unknown))} "
                        f"(its options: {', '.join(known) or 'none'}, rules)")
    if options.get("rules") is not None:
        parse_rules(options["rules"])


def make_space(name: str, decoder: Decoder, target: float, options: dict[str, Any],
               reuse: Space | None = None) -> Space:
    """The space ``name`` at ``target``; ``reuse``: one this function made with the same name, decoder and
    options, the model dense, which the new space may share its opened database and caches with
    (``Space.retarget``); it is not used again."""
    check_space_settings(name, target, options)
    if reuse is not None:
        if reuse.name != name:
            raise ValueError(f"cannot make space '{name}' from a '{reuse.name}' space")
        shared = reuse.retarget(target)
        if shared is not None:
            return shared
    options = dict(options)
    rules = options.pop("rules", None)
    space = get_plugin(name).space(decoder, target, **options)
    return ConstrainedSpace(space, parse_rules(rules)) if rules else space


__all__ = ["Config", "Problem", "Space", "SpacePlugin", "PLUGINS", "DEFAULT_SPACE", "register", "get_plugin",
           "baselines", "check_space_settings", "default_init", "make_space"]
