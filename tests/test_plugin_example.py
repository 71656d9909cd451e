"""A space added from outside: one SpacePlugin, registered, and the whole tool works with it.

The example space rounds exactly k linear layers' weights to bfloat16 precision (k = floor(target x
layers)): small enough to read in a minute, real enough that the search, baselines, CLI options,
report and export all run on it without any other file knowing it exists.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evopress import spaces
from evopress.cli import main
from evopress.spaces.plugin import BaselineInputs, CliOption, SpacePlugin
from evopress.spaces.problem import Config, Problem
from evopress.spaces.space import Space


class RoundingSpace(Space):
    name = "bf16-rounding"

    def __init__(self, decoder, target: float, only: str = ".*"):
        layers = {n: m for n, m in decoder.linear_layers().items() if re.search(only, n)}
        self.decoder, self.target, self.only = decoder, target, only
        self.units = list(layers)
        self.layers = list(layers.values())
        self.unit_block = [int(re.search(r"\.(\d+)\.", n).group(1)) for n in self.units]
        self.num_blocks = decoder.num_blocks
        k = math.floor(target * len(self.units))
        self.problem = Problem((2,) * len(self.units), ((0, 1),) * len(self.units), k, (tuple(range(len(self.units))),))
        self._dense = [m.weight.data for m in self.layers]
        self._rounded = [w.to(torch.bfloat16).to(w.dtype) for w in self._dense]

    def apply(self, config: Config | None) -> None:
        for u, layer in enumerate(self.layers):
            layer.weight.data = self._rounded[u] if config is not None and config[u] else self._dense[u]

    def random_config(self, rng: np.random.Generator) -> Config:
        chosen = set(rng.choice(len(self.units), size=self.problem.budget, replace=False).tolist())
        return tuple(int(u in chosen) for u in range(len(self.units)))

    def options(self):
        return {"only": self.only}

    def budget_report(self, config: Config):
        return {"target": self.target, "achieved": sum(config) / len(config), "rounded_layers": sum(config)}


def first_layers(inputs: BaselineInputs) -> Config:
    k = inputs.space.problem.budget
    return tuple(int(u < k) for u in range(len(inputs.space.units)))


def export(space: RoundingSpace, config: Config, out: Path, tokenizer) -> dict:
    space.apply(config)
    space.decoder.model.save_pretrained(out)
    return {"out": str(out)}


PLUGIN = SpacePlugin(
    name="bf16-rounding", space=RoundingSpace, target_help="bf16-rounding: fraction of layers rounded",
    options=(CliOption(("--only",), "only", "bf16-rounding: regex of the layers that may be rounded", default=".*"),),
    baselines={"first": first_layers}, export=export,
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(spaces.PLUGINS, PLUGIN.name, PLUGIN)


def test_a_registered_space_runs_end_to_end(registered, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    common = ["--space", "bf16-rounding", "--target", "0.5", "--only", "mlp", "--model", str(model), "--data",
              str(text), "--seq-len", "32", "--calib-tokens", "512", "--final-tokens", "128", "--quiet"]
    assert main(["search", *common, "--generations", "3", "--offspring", "4", "--stages", "2:32,1:64",
                 "--initial-candidates", "3", "--initial-tokens", "64", "--out", str(tmp_path / "evo")]) == 0
    assert main(["baseline", *common, "--method", "first", "--tokens", "64", "--out", str(tmp_path / "first")]) == 0
    assert main(["baseline", *common, "--method", "random", "--tokens", "64", "--candidates", "3",
                 "--out", str(tmp_path / "random")]) == 0
    result = json.loads((tmp_path / "evo" / "result.json").read_text())
    assert all("mlp" in u for u in result["units"]) and sum(result["levels"]) == len(result["units"]) // 2
    assert result["space_options"] == {"only": "mlp"} and len(result["history"]) == 4
    assert result["recipe"]["init_from"] == []  # no default_init: the paper's random start
    assert result["fitness"]["kl"] > 0  # rounding changes the model
    assert main(["report", *(str(tmp_path / d) for d in ("evo", "first", "random")), "--out",
                 str(tmp_path / "report"), "--quiet"]) == 0
    assert "bf16-rounding" in (tmp_path / "report" / "report.md").read_text()
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "model"), "--quiet"]) == 0
    assert (tmp_path / "model" / "config.json").is_file()
    capsys.readouterr()
    assert main(["search", *common[:4], "--granularity", "block", "--out", str(tmp_path / "x")]) == 2
    assert "--granularity is not an option of space 'bf16-rounding'" in capsys.readouterr().err
