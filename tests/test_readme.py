"""The README's recipe and Python examples, run as written, on a tiny model and text.

Only what makes them fast changes: the model, the text and the search's size are swapped in through
the same keywords a user would pass; the examples' own keywords and files are used verbatim.
"""

import json
import re
from pathlib import Path

import yaml

import evopress
from evopress import api
from evopress.recipe import make_recipe

README = Path(__file__).parents[1] / "README.md"


def block(language: str, marker: str) -> str:
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S) if marker in b)


def test_the_readme_recipe_and_python_examples_run(tiny_checkpoint, tmp_path, monkeypatch):
    model, text = tiny_checkpoint
    recipe = yaml.safe_load(block("yaml", "# recipe.yaml"))
    make_recipe({k: v for k, v in recipe.items() if k not in ("out", "eval")})  # every key is a setting
    tiny = {"model": str(model), "data": str(text), "seq_len": 32, "calib_tokens": 512, "final_tokens": 64,
            "baseline_tokens": 64, "offspring": 2, "stages": [(1, 32)], "initial_candidates": 2,
            "initial_tokens": 32}
    small = {**recipe, **{k: v for k, v in tiny.items() if k in ("model", "data", "seq_len", "calib_tokens",
                                                                  "final_tokens", "baseline_tokens")},
             "search": {**recipe["search"], "generations": 1, "offspring": 2, "stages": [[1, 32]],
                        "initial_candidates": 2, "initial_tokens": 32},
             "eval": {**recipe["eval"], "data": [str(text)], "tokens": 64, "seq_len": 32}}
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(yaml.safe_dump(small))
    real_search, real_baseline = api.search, api.baseline
    monkeypatch.setattr(evopress, "search", lambda *a, **kw: real_search(*a, **{**kw, **tiny, "generations": 1},
                                                                          progress=False, log=lambda m: None))
    monkeypatch.setattr(evopress, "baseline", lambda *a, **kw: real_baseline(*a, **{**kw, **tiny}, log=lambda m: None))
    exec(block("python", "import evopress"), {})
    result = json.loads(Path("runs/from-recipe/result.json").read_text())
    assert result["recipe"]["init_from"] == ["shortgpt", "angular"]
    assert json.loads(Path("runs/from-recipe/eval.json").read_text())["datasets"]
    assert json.loads(Path("runs/api-shortgpt/result.json").read_text())["method"] == "shortgpt"
    assert len(json.loads(Path("runs/api/result.json").read_text())["history"]) == 2
