"""What a space declares besides the search interface, as data: ``SpacePlugin``.

Its command-line options, baselines, database builder, exporters, loader and text formats. The CLI,
pipeline and report only read this record, so adding a space adds one package under ``spaces/`` and
one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .problem import Config
from .space import Space

@dataclass(frozen=True)
class CliOption:
    """One command-line option of a space, described as data.

    The CLI offers the options of every registered space; spaces that declare the same flag share one
    argument (each keeps its own default and help). A value left unset takes the space's ``default``.
    """

    flags: tuple[str, ...]  # e.g. ("--group-rule",); the first names the argument
    key: str  # the keyword of the space's constructor (or builder) it becomes
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    is_flag: bool = False  # a switch without a value (store_true)
    convert: Callable[[Any], Any] | None = None  # e.g. make a path absolute

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    def value(self, given: Any) -> Any:
        """The option's value from what the user gave (None or False: not given)."""
        if given is None or (self.is_flag and given is False):
            given = self.default
        return self.convert(given) if self.convert is not None and given is not None else given


@dataclass
class BaselineInputs:
    """What a baseline may look at, explicitly: baselines depend on no pipeline object."""

    space: Space
    evaluator: Any  # ``sample(tokens, rng)`` and ``score(configs, sample)``, as the search uses it
    pool: Any  # the calibration TokenPool (scoring methods read dense activations from it)
    tokens: int  # calibration tokens a baseline looks at
    seed: int
    candidates: int = 32  # best-of-N random
    batch_size: int = 8


@dataclass(frozen=True)
class ConfigFormat:
    """A plain-text layout of configurations (ours or another tool's), as one space reads and writes it.

    ``read`` and ``write`` speak in levels of the model's own modules (``Space.model_space``), so rules
    never change a file; ``read`` raises ``UserError`` naming ``source`` and the line for a file that
    does not fit the model. ``fits_line`` lets ``import-config`` recognise a file without ``--format``
    (and, for a file with a bad line, pick the format whose reader names it).
    """

    help: str
    fits_line: Callable[[str], bool]  # one line, comment and surrounding blanks removed
    read: Callable[[str, Space, str], Config]  # (text, model space, source) -> levels
    write: Callable[[Space, Config], str]


def byte_tolerance_option(space: str, default: float) -> CliOption:
    """``--byte-tolerance`` of a space whose budget is a window of bytes (``Problem.slack``)."""
    return CliOption(("--byte-tolerance",), "tolerance", f"{space}: achieved bytes stay within this fraction below the "
                     f"target, never above (default {default:g})", default=default, type=float)


Baseline = Callable[[BaselineInputs], Config]
# (decoder, pool, builder options, out, batch size, progress) -> manifest
Builder = Callable[[Any, Any, dict[str, Any], Path, int, bool], dict[str, Any]]
# (space without rules, its configuration, out, tokenizer) -> summary
Exporter = Callable[[Space, Config, Path, Any], dict[str, Any]]
# (space without rules, its configuration) -> the database whose levels it re-solves (its ``--db``) and the
# layers to re-solve by module name (``spaces/finalize.py``); it may put the model in the state they are
# solved in (a joint profile's drops)
Finalizer = Callable[[Space, Config], tuple[Any, dict[str, Any]]]
# (checkpoint directory, its config.json, dtype) -> the model, or None: not a checkpoint this space reads
Loader = Callable[[Path, dict[str, Any], Any], Any]


@dataclass(frozen=True)
class SpacePlugin:
    """A space as the rest of evopress sees it: one record per package under ``spaces/``."""

    name: str
    space: Callable[..., Space]  # (decoder, target, **options) -> Space
    target_help: str  # what --target means in this space
    check_target: Callable[[float], None] | None = None  # raises UserError for a target out of range
    options: tuple[CliOption, ...] = ()  # search / baseline / import-config options -> space options
    baselines: Mapping[str, Baseline] = field(default_factory=dict)  # best-of-N random is added for all
    build: Builder | None = None  # level database builder, for spaces that need one
    build_options: tuple[CliOption, ...] = ()
    export: Exporter | None = None  # the default checkpoint layout of ``evopress export``
    export_formats: Mapping[str, Exporter] = field(default_factory=dict)  # others, by ``--format`` name
    finalize: Finalizer | None = None  # ``evopress finalize``; None: nothing to re-solve
    load: Loader | None = None  # reads exports plain ``from_pretrained`` cannot (``evopress.load_compressed``)
    config_formats: Mapping[str, ConfigFormat] = field(default_factory=dict)  # besides our own (interchange)
    # baselines whose configurations join a search's initial population by default (``--init-from auto``);
    # () is the paper's random start. Under ``--rules``, ``default_init_with_rules`` (None: the same), for
    # baselines that refuse rules.
    default_init: tuple[str, ...] = ()
    default_init_with_rules: tuple[str, ...] | None = None

    def space_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """This space's options from command-line values keyed by argument name."""
        return {o.key: o.value(given.get(o.dest)) for o in self.options}

    def builder_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return {o.key: o.value(given.get(o.dest)) for o in self.build_options}
