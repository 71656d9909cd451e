"""``evopress pareto``: several budgets in one run, the front file, resume after a kill, bad --targets."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evopress
from evopress.pipeline import search as pipeline_search
from evopress.cli import main
from evopress.database import Database
from evopress.front import project
from evopress.spaces import make_space
from evopress.spaces.problem import Problem
from evopress.spaces.space import RetargetableSpace
from evopress.spaces.layerwise import LayerwiseSpace

from .conftest import tiny_model
from .test_joint import TOL

TARGETS = "0.17,0.34,0.5"


def pareto_args(model, text, out, targets=TARGETS, generations=4):
    return ["pareto", "--targets", targets, "--model", str(model), "--data", str(text), "--seq-len", "32",
            "--calib-tokens", "1024", "--final-tokens", "128", "--generations", str(generations),
            "--offspring", "4", "--stages", "2:32,1:64", "--initial-candidates", "4", "--initial-tokens", "64",
            "--tokens", "128", "--track-every", "0", "--eval-data", str(text), "--eval-tokens", "128",
            "--eval-seq-len", "32", "--out", str(out), "--quiet"]


def comparable(out):
    """front.json and every result, without wall times and paths."""
    front = json.loads((out / "front.json").read_text())
    for points in front["methods"].values():
        for p in points:
            p.pop("dir")
    results = {}
    for path in sorted(out.rglob("result.json")):
        r = json.loads(path.read_text())
        r.pop("seconds")
        for h in r["history"]:
            h.pop("seconds")
        results[str(path.relative_to(out))] = r
    return front, results


def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved from now on (still written), to read what it plots."""
    from matplotlib.figure import Figure

    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or real(fig, *a, **k))
    return figures


def assert_plots_the_front(figures: list, front: dict, png) -> None:
    """One figure whose KL and PPL panels draw exactly front.json's points, one line per method and the dense
    star, saved as a PNG of about 10 x 4 inches at 110 dpi (the tight box trims the margins) that shows them."""
    from matplotlib.image import imread

    (fig,) = figures
    source = front["eval"]["data"][0]
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert set(panels) == {f"held-out {key.upper()} ({source})" for key in ("kl", "ppl")}
    for key in ("kl", "ppl"):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                 for line in panels[f"held-out {key.upper()} ({source})"].get_lines()}
        expected = {m: ([p["model_gb"] for p in points], [p["held_out"][source][key] for p in points])
                    for m, points in front["methods"].items()}
        expected["dense"] = ([front["dense"]["model_gb"]], [front["dense"]["held_out"][source][key]])
        assert drawn == expected, key
    image = imread(png)
    height, width, _ = image.shape
    assert 900 <= width <= 1150 and 380 <= height <= 480, image.shape
    rgb = image[..., :3]
    ink, colour = (rgb < 0.9).any(axis=-1).mean(), (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).mean()
    assert 0.02 < ink < 0.5 and colour > 0.003, (ink, colour)  # axes and text, and the methods' coloured lines


def test_pareto_writes_one_result_per_budget_and_the_front(tiny_checkpoint, tmp_path, monkeypatch):
    model, text = tiny_checkpoint
    out = tmp_path / "front"
    figures = saved_figures(monkeypatch)
    assert main(pareto_args(model, text, out)) == 0
    front = json.loads((out / "front.json").read_text())
    assert_plots_the_front(figures, front, out / "front.png")
    assert front["targets"] == [0.17, 0.34, 0.5]
    assert set(front["methods"]) == {"evopress", "shortgpt", "angular"}
    for method, points in front["methods"].items():
        assert [p["target"] for p in points] == front["targets"], method
        sizes = [p["size_bytes"] for p in points]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # more dropped, fewer bytes
        for p in points:
            assert {"model_bytes", "model_gb", "bits_per_param", "kl", "ppl", "calibration_kl", "held_out"} <= set(p)
            assert p["model_bytes"] < front["model_bytes_dense"] and p["kl"] > 0
            assert p["bits_per_param"] < front["dense"]["bits_per_param"]
    # the search's points equal what each budget's own files say
    for t, p in zip(front["targets"], front["methods"]["evopress"]):
        d = out / f"target-{t:g}"
        result, held = (json.loads((d / f).read_text()) for f in ("result.json", "eval.json"))
        assert result["target"] == t and held["kl"] == p["kl"] and (d / "config.txt").is_file()
        assert result["budget"]["dropped_attention"] == result["budget"]["dropped_mlp"]
        neighbour = front["targets"].index(t) - 1
        assert result["warm_start"]["from_target"] == (front["targets"][neighbour] if neighbour >= 0 else None)
        assert (out / "baselines" / "shortgpt" / f"target-{t:g}" / "eval.json").is_file()
    assert all(r["warm_start"]["projected"] for r in
               (json.loads((out / f"target-{t:g}" / "result.json").read_text()) for t in (0.34, 0.5)))
    # a finished run rerun with the same command changes nothing
    before = comparable(out)
    assert main(pareto_args(model, text, out)) == 0
    assert comparable(out) == before


def no_plot(monkeypatch):
    """front.png is checked once (above); elsewhere matplotlib would take most of a test's time."""
    from evopress import report

    monkeypatch.setattr(report, "plot_front", lambda front, path: None)


def test_killed_pareto_resumes_to_the_uninterrupted_front(tiny_checkpoint, tmp_path, monkeypatch):
    model, text = tiny_checkpoint
    no_plot(monkeypatch)
    args = lambda out: pareto_args(model, text, out, "0.17,0.34") + ["--baselines", "shortgpt"]  # noqa: E731
    assert main(args(tmp_path / "straight")) == 0
    real_evolve, calls = pipeline_search.evolve, []

    def evolve_then_die(problem, evaluator, initial, config, state, on_generation, on_start=None):
        calls.append(1)

        def die_after_two(s):
            on_generation(s)  # the checkpoint is written first, as a kill between generations leaves it
            if len(calls) == 2 and s.generation == 2:
                raise KeyboardInterrupt

        return real_evolve(problem, evaluator, initial, config, state, die_after_two, on_start=on_start)

    monkeypatch.setattr(pipeline_search, "evolve", evolve_then_die)
    killed = tmp_path / "killed"
    assert main(args(killed)) == 130  # as the CLI ends on Ctrl-C
    assert (killed / "target-0.17" / "result.json").is_file()
    checkpoint = json.loads((killed / "target-0.34" / "checkpoint.json").read_text())
    assert checkpoint["state"]["generation"] == 2 and not (killed / "target-0.34" / "result.json").exists()
    assert not (killed / "front.json").exists()
    monkeypatch.setattr(pipeline_search, "evolve", real_evolve)
    assert main(args(killed)) == 0
    assert comparable(killed) == comparable(tmp_path / "straight")


def test_python_api_and_a_budget_begun_from_another_neighbour(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    model, text = tiny_checkpoint
    no_plot(monkeypatch)
    out = tmp_path / "front"
    front = evopress.pareto(out, targets=[0.17, 0.5], baselines=[], model=str(model), data=str(text), seq_len=32,
                            calib_tokens=1024, final_tokens=128, baseline_tokens=128, generations=1, offspring=4,
                            stages=[(2, 32), (1, 64)], initial_candidates=4, initial_tokens=64, track_every=0,
                            eval_data=[str(text)], eval_tokens=128, eval_seq_len=32, progress=False,
                            log=lambda msg: None)
    assert [p["target"] for p in front["methods"]["evopress"]] == [0.17, 0.5] and front["skipped"] == {}
    recipe = json.loads((out / "target-0.5" / "result.json").read_text())["recipe"]
    assert recipe["init_from"] == ["shortgpt", "angular"]  # the API's default is the CLI's: the space's warm start
    assert main(pareto_args(model, text, out, "0.17,0.34,0.5", generations=1) + ["--baselines", ""]) == 2
    assert "started from another neighbour" in capsys.readouterr().err


@pytest.fixture(scope="module")
def databases(tiny_checkpoint, tmp_path_factory):
    """A quant (2, 3, 4 bits) and a sparsity (50% +- 2 levels) database of the tiny checkpoint, with targets."""
    model, text = tiny_checkpoint
    root = tmp_path_factory.mktemp("dbs")
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--out", str(root / "quant"), *common]) == 0
    assert main(["build-db", "--space", "sparsity", "--target", "0.5", "--levels", "2", "--out", str(root / "sparsity"),
                 *common]) == 0
    return {"quant": (root / "quant", "2.5,3,3.5"), "sparsity": (root / "sparsity", "0.45,0.5,0.55")}


def count_opens(monkeypatch) -> tuple[list, list]:
    """Every database opened, and every check of a space's layer files, from now on."""
    opened, checked, real_open, real_check = [], [], Database.open, LayerwiseSpace.check_layer_files
    monkeypatch.setattr(Database, "open", staticmethod(lambda *a: opened.append(a[0]) or real_open(*a)))
    monkeypatch.setattr(LayerwiseSpace, "check_layer_files",
                        lambda self, *a, **k: checked.append(self.db.root) or real_check(self, *a, **k))
    return opened, checked


@pytest.mark.parametrize("space", ["quant", "sparsity"])
def test_pareto_opens_and_checks_each_database_once(space, databases, tiny_checkpoint, tmp_path, monkeypatch):
    """Three budgets share one opened database and its caches, and find the front of a space built per budget."""
    model, text = tiny_checkpoint
    no_plot(monkeypatch)
    monkeypatch.setenv("EVOPRESS_DECODED_CACHE_GB", "1")  # decoded levels kept across budgets too
    db, targets = databases[space]
    opened, checked = count_opens(monkeypatch)
    args = lambda out: pareto_args(model, text, out, targets, generations=1) + [  # noqa: E731
        "--space", space, "--db", str(db), "--baselines", "uniform"]
    assert main(args(tmp_path / "shared")) == 0
    assert len(opened) == len(checked) == 1
    monkeypatch.setattr(RetargetableSpace, "retarget", lambda self, target: None)  # a space afresh per budget
    assert main(args(tmp_path / "fresh")) == 0
    assert len(opened) == len(checked) == 4
    assert comparable(tmp_path / "shared") == comparable(tmp_path / "fresh")


@pytest.mark.parametrize("targets, message", [
    ("0.5,0.25", "must be ascending"),
    ("0.25,0.25", "repeats 0.25"),
    ("0.25,1.5", "--targets 1.5: --target 1.5 out of range"),
    ("0.25,x", "comma-separated numbers"),
])
def test_bad_targets_are_one_line_exit_2(targets, message, tmp_path, capsys):
    assert main(["pareto", "--targets", targets, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def checkpoint_decoder(tiny_checkpoint):
    """The tiny checkpoint as the CLI loads it: the model the ``databases`` were built for."""
    from evopress.models import load_model

    return load_model(str(tiny_checkpoint[0]), torch.device("cpu"), torch.float32).decoder


def moves_against_the_budget(x, y, start, config) -> list[int]:
    """Units whose cost moved away from ``y``'s budget on the way from ``x``'s: none on a fewest-moves walk."""
    gap, costs = y.problem.budget - x.problem.budget, y.problem.costs
    return [u for u, (a, b) in enumerate(zip(start, config)) if (costs[u][b] - costs[u][a]) * gap < 0]


def moved(start, config) -> int:
    return sum(abs(a - b) for a, b in zip(start, config))


def check_drop(x, y, start, config) -> None:
    """Depth: as many attention as MLP sub-blocks, each walked one way only (two per block of difference)."""
    report = y.budget_report(config)
    assert report["dropped_attention"] == report["dropped_mlp"] == y.k
    assert not moves_against_the_budget(x, y, start, config) and moved(start, config) == 2 * abs(y.k - x.k)


def check_sparsity(x, y, start, config) -> None:
    """Sparsity: every level step is ``step`` weights, so the fewest moves are the budgets' difference in steps."""
    assert not moves_against_the_budget(x, y, start, config)
    assert moved(start, config) == abs(y.problem.budget - x.problem.budget) // y.step == 138


def check_quant(x, y, start, config) -> None:
    """Quant: steps differ between size groups; each unit moves towards the new budget only."""
    assert not moves_against_the_budget(x, y, start, config)


def check_joint(x, y, start, config) -> None:
    """Joint (the repair): up, bits suffice and the dropped sub-blocks stay; down, 2 bits are above 2.5 with
    scales, so a sub-block must go."""
    if y.target > x.target:
        assert y.dropped(config) == x.dropped(start)
    else:
        assert any(a or m for a, m in y.dropped(config))


@pytest.mark.parametrize("name, db, low, high, check", [
    ("drop", None, 0.34, 0.67, check_drop),
    ("sparsity", "sparsity", 0.45, 0.55, check_sparsity),
    ("quant", "quant", 2.5, 3.5, check_quant),
    ("joint", "quant", 2.5, 3.5, check_joint),
])
def test_projection_reaches_the_new_budget(name, db, low, high, check, databases, checkpoint_decoder):
    """Both ways between two budgets, from random configurations of the other (the joint ones drop sub-blocks)."""
    options = {} if db is None else {"db": str(databases[db][0]), **({"tolerance": TOL} if name == "joint" else {})}
    a, b = (make_space(name, checkpoint_decoder, t, options) for t in (low, high))
    for x, y in ((a, b), (b, a)):
        for seed in range(3):
            start = x.random_config(np.random.default_rng(seed))
            config = project(start, y, np.random.default_rng(seed))
            assert config is not None and y.problem.feasible(config), (x.target, seed)
            check(x, y, start, config)


def test_projection_refuses_what_it_cannot_place():
    """Unequal costs that no single-level walk can close, and a configuration of another space: None."""
    space = SimpleNamespace(problem=Problem((2, 2), ((0, 3), (0, 3)), 4, ((0, 1),)))
    for config in ((0, 0), (0, 0, 0), (0, 2)):
        assert project(config, space, np.random.default_rng(0)) is None


def test_space_sizes_in_bytes():
    from evopress.models import Decoder

    decoder = Decoder(tiny_model())
    space = make_space("drop", decoder, 0.34, {})
    attn = sum(p.numel() * p.element_size() for p in decoder.attn(0).parameters())
    mlp = sum(p.numel() * p.element_size() for p in decoder.mlp(0).parameters())
    assert space.dense_bytes() == 6 * (attn + mlp)
    config = space.random_config(np.random.default_rng(0))
    assert space.size_bytes(config) == 4 * (attn + mlp)
    space.apply(config)  # dropped modules are gone from the model; the sizes do not change
    assert space.dense_bytes() == 6 * (attn + mlp) and space.size_bytes(config) == 4 * (attn + mlp)


def test_each_baseline_runs_once_per_budget(tiny_checkpoint, tmp_path, monkeypatch):
    """The warm start (--init-from) and the front ask for the same baselines: they are made once per budget,
    and the front's baseline results are those of a fresh ``evopress baseline`` run."""
    from evopress.spaces import get_plugin

    model, text = tiny_checkpoint
    no_plot(monkeypatch)
    calls = []
    plugin = get_plugin("drop")
    for method, fn in list(plugin.baselines.items()):
        monkeypatch.setitem(plugin.baselines, method, lambda inputs, m=method, f=fn: calls.append(m) or f(inputs))
    out = tmp_path / "front"
    assert main(pareto_args(model, text, out, targets="0.17,0.34", generations=2)) == 0
    assert sorted(calls) == ["angular", "angular", "shortgpt", "shortgpt"]
    alone = tmp_path / "alone"
    assert main(["baseline", "--method", "angular", "--target", "0.34", "--model", str(model), "--data", str(text),
                 "--seq-len", "32", "--calib-tokens", "1024", "--tokens", "128", "--final-tokens", "128",
                 "--out", str(alone), "--quiet"]) == 0
    from_front = json.loads((out / "baselines" / "angular" / "target-0.34" / "result.json").read_text())
    assert json.loads((alone / "result.json").read_text())["levels"] == from_front["levels"]


def test_joint_pareto_warm_starts_every_budget_inside_its_byte_window(databases, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """The first budget must drop sub-blocks (2 bits cost 2.66 with this database's scales); each later one starts
    from its neighbour's result moved into its byte window, where a dropped sub-block's layers cost nothing."""
    model, text = tiny_checkpoint
    no_plot(monkeypatch)
    out, targets = tmp_path / "front", [2.5, 3.0, 3.5]
    assert main(pareto_args(model, text, out, "2.5,3,3.5", generations=0) + [
        "--space", "joint", "--db", str(databases["quant"][0]), "--byte-tolerance", str(TOL), "--baselines", "",
        "--init-from", "none"]) == 0
    results = [json.loads((out / f"target-{t:g}" / "result.json").read_text()) for t in targets]
    assert results[0]["budget"]["dropped_attention"] or results[0]["budget"]["dropped_mlp"]
    for previous, result in zip([None, *targets], results):
        budget = result["budget"]
        assert budget["lowest_bytes"] <= budget["bytes"] <= budget["budget_bytes"]
        assert result["warm_start"]["from_target"] == previous
        assert result["warm_start"]["projected"] is (previous is not None)
