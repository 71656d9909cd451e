"""Resume after SIGKILL, determinism, recipes, the Python API, and bad input on a tiny checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from evopress import fitness
from evopress.cli import main

from .conftest import write_tiny_checkpoint
from evopress.data import PROTOCOL


def search_args(model, text, out, generations=12):
    return ["search", "--target", "0.34", "--model", str(model), "--data", str(text), "--seq-len", "32",
            "--calib-tokens", "1024", "--final-tokens", "128", "--generations", str(generations),
            "--offspring", "4", "--stages", "2:32,1:64", "--initial-candidates", "4", "--initial-tokens", "64",
            "--init-from", "none", "--out", str(out), "--quiet"]


def comparable(path):
    r = json.loads((path / "result.json").read_text())
    r.pop("seconds")
    for h in r["history"]:
        h.pop("seconds")
    return r


def test_killed_search_resumes_to_the_uninterrupted_result(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "straight")) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "evopress", *search_args(model, text, tmp_path / "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if checkpoint.is_file() and json.loads(checkpoint.read_text())["state"]["generation"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(checkpoint.read_text())["state"]["generation"]
    assert 3 <= killed_at < 12, "the search must be killed mid-way for this test to mean anything"
    assert not (tmp_path / "killed" / "result.json").exists()
    assert main(search_args(model, text, tmp_path / "killed")) == 0
    assert comparable(tmp_path / "killed") == comparable(tmp_path / "straight")


def test_same_seed_same_result_and_changed_settings_are_refused(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "a", 3)) == 0
    assert main(search_args(model, text, tmp_path / "b", 3)) == 0
    assert comparable(tmp_path / "a") == comparable(tmp_path / "b")
    changed = search_args(model, text, tmp_path / "a", 3)
    changed[changed.index("--offspring") + 1] = "5"
    assert main(changed) == 2
    assert "different settings (search differs)" in capsys.readouterr().err
    # a search begun before the warm-start default, rerun without --init-from none: the refusal says why
    assert main(search_args(model, text, tmp_path / "a", 3) + ["--init-from", "auto"]) == 2
    assert "different settings (init_from differs)" in capsys.readouterr().err
    assert main(changed + ["--restart"]) == 0


def test_recipe_file_and_python_api(tiny_checkpoint, tmp_path):
    import evopress

    model, text = tiny_checkpoint
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
space: drop
target: 0.34
model: {model}
data: {text}
seq_len: 32
calib_tokens: 1024
final_tokens: 128
search: {{generations: 2, offspring: 4, stages: [[1, 64]], initial_candidates: 2, initial_tokens: 64}}
init_from: none
out: {tmp_path / 'from-recipe'}
eval: {{data: [{text}], tokens: 256, seq_len: 32}}
""")
    assert main(["run", str(recipe), "--quiet"]) == 0
    protocol = json.loads((tmp_path / "from-recipe" / "eval.json").read_text())["protocol"]
    assert protocol.startswith(PROTOCOL + "; ")  # eval.json names how its perplexity was measured
    resolved = tmp_path / "from-recipe" / "recipe.json"
    assert main(["run", str(resolved), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0
    assert comparable(tmp_path / "rerun") == comparable(tmp_path / "from-recipe")
    api = evopress.search(tmp_path / "api", space="drop", target=0.34, model=str(model), data=str(text),
                          seq_len=32, calib_tokens=1024, final_tokens=128, generations=2, offspring=4,
                          stages=[(1, 64)], initial_candidates=2, initial_tokens=64, init_from="none", progress=False,
                          log=lambda m: None)
    assert api.levels == comparable(tmp_path / "from-recipe")["levels"]
    assert sum(api.profile.values()) == 4  # floor(0.34 * 6) = 2 attention + 2 MLP


@pytest.mark.parametrize("case", ["no_config", "corrupt_config", "empty_text", "short_text", "bad_recipe",
                                  "unsupported_gguf", "readonly_out"])
def test_bad_input_is_one_line_exit_2(case, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    args = search_args(model, text, tmp_path / "out", 1)
    if case == "no_config":
        (tmp_path / "m").mkdir()
        args[args.index("--model") + 1] = str(tmp_path / "m")
    elif case == "corrupt_config":
        bad = tmp_path / "m2"
        bad.mkdir()
        (bad / "config.json").write_text("{not json")
        args[args.index("--model") + 1] = str(bad)
    elif case == "empty_text":
        (tmp_path / "empty.txt").write_text("")
        args[args.index("--data") + 1] = str(tmp_path / "empty.txt")
    elif case == "short_text":
        (tmp_path / "short.txt").write_text("the city of the river")
        args[args.index("--data") + 1] = str(tmp_path / "short.txt")
    elif case == "bad_recipe":
        (tmp_path / "r.yaml").write_text("space: drop\ntarget: 0.3\nsurprise: 1\nout: x\n")
        args = ["run", str(tmp_path / "r.yaml")]
    elif case == "unsupported_gguf":
        import gguf

        path = tmp_path / "odd.gguf"
        writer = gguf.GGUFWriter(str(path), "no-such-arch")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        args[args.index("--model") + 1] = str(path)
    elif case == "readonly_out":
        if os.geteuid() == 0:
            blocker = tmp_path / "file"
            blocker.write_text("x")  # even root cannot create a directory below a regular file
            args[args.index("--out") + 1] = str(blocker / "out")
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            args[args.index("--out") + 1] = str(ro / "out")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evopress: error:"), err
    print(case, err[0])


def test_lm_eval_without_the_harness_is_a_clear_error(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import builtins

    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "s", 1)) == 0
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", str(tmp_path / "s"), "--eval-data", str(text), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--lm-eval", "arc_easy", "--quiet"]) == 2
    assert "lm-evaluation-harness" in capsys.readouterr().err


LOCAL_TASK = """task: evopress_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_the_compressed_model_on_a_local_task(tiny_checkpoint, tmp_path):
    """The real harness, offline, on a task whose data is a local file: the in-memory handoff works."""
    import lm_eval  # noqa: F401  the [lmeval] extra, installed by make test
    model, text = tiny_checkpoint
    rows = [{"question": "the city is on the", "choices": ["river", "of", "and"], "label": 0},
            {"question": "the first world", "choices": ["war", "the", "by"], "label": 0},
            {"question": "music and", "choices": ["film", "of", "an"], "label": 1}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tasks / "local.yaml").write_text(LOCAL_TASK.format(data=tasks / "data.jsonl"))
    assert main(search_args(model, text, tmp_path / "s", 1)) == 0
    assert main(["eval", str(tmp_path / "s"), "--eval-data", str(text), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--lm-eval", "evopress_local_mc", "--lm-eval-include", str(tasks),
                 "--quiet"]) == 0
    acc = json.loads((tmp_path / "s" / "eval.json").read_text())["lm_eval"]["evopress_local_mc"]
    assert 0.0 <= acc["acc,none"] <= 1.0 and "acc_stderr,none" in acc


def test_text_config_round_trip_and_errors(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "s", 2)) == 0
    config_txt = (tmp_path / "s" / "config.txt").read_text()
    assert "model.layers.0.self_attn: " in config_txt and len(config_txt.splitlines()) == 12
    common = ["--target", "0.34", "--model", str(model), "--data", str(text), "--seq-len", "32",
              "--calib-tokens", "1024", "--final-tokens", "128", "--quiet"]
    assert main(["import-config", str(tmp_path / "s" / "config.txt"), *common, "--out", str(tmp_path / "i")]) == 0
    imported, searched = comparable(tmp_path / "i"), comparable(tmp_path / "s")
    assert imported["levels"] == searched["levels"] and imported["fitness"] == searched["fitness"]
    assert imported["method"] == "imported"
    broken = tmp_path / "broken.txt"
    for bad, message in [(config_txt.replace("self_attn: ", "self_attn= ", 1), "expected"),
                         ("\n".join(config_txt.splitlines()[1:]), "no level"),
                         (config_txt.replace(": 0", ": 7", 1), "not one of"),
                         (config_txt.replace(": 0", ": 1", 1), "budget")]:
        broken.write_text(bad)
        assert main(["import-config", str(broken), *common, "--out", str(tmp_path / "b")]) == 2
        assert message in capsys.readouterr().err


def test_rules_file_through_the_cli(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {match: 're:model\\.layers\\.0\\..*', pin: 0}\n"
                     "- {match: 're:model\\.layers\\.(\\d+)\\.(self_attn|mlp)', tie: true}\n")
    assert main(search_args(model, text, tmp_path / "s", 3) + ["--rules", str(rules)]) == 0
    result = comparable(tmp_path / "s")
    attn, mlp = result["levels"][:6], result["levels"][6:]
    assert attn == mlp and attn[0] == 0 and sum(attn) == 2
    assert result["space_options"]["rules"][1]["tie"] is True
    assert main(["eval", str(tmp_path / "s"), "--eval-data", str(text), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--quiet"]) == 0


def test_atomic_writes_keep_the_old_file_and_normal_permissions(tmp_path):
    from evopress.io import atomic_write, write_json

    path = tmp_path / "result.json"
    write_json(path, {"a": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind


def test_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path):
    import errno

    from evopress.errors import UserError
    from evopress.io import atomic_write, write_json

    path = tmp_path / "result.json"
    write_json(path, {"a": 1})

    def disk_full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="No space left on device"):
        atomic_write(path, disk_full)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("space", ["sparsity", "quant"])
def test_killed_database_build_resumes_to_the_uninterrupted_database(space, tmp_path, monkeypatch):
    """Layers finished before a kill are reused (not solved again) and the result is the same database."""
    import importlib

    from safetensors.torch import load_file

    from evopress.data import TokenPool
    from evopress.database import MANIFEST, layer_file
    from evopress.errors import UserError
    from evopress.models import Decoder

    from .conftest import tiny_model

    module = importlib.import_module(f"evopress.spaces.{space}.build")
    layerwise = importlib.import_module("evopress.spaces.layerwise")
    pool = TokenPool(torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(1)), "random")

    def build(out, **kw):
        decoder = Decoder(tiny_model(layers=2))
        if space == "sparsity":
            return module.build_sparsity_database(decoder, pool, out, 0.5, 2, 24, batch_size=4, progress=False, **kw)
        return module.build_quant_database(decoder, pool, out, (2, 3, 4), 16, 3, batch_size=4, progress=False, **kw)

    reference = build(tmp_path / "ref")
    saved = []
    real_save = layerwise.save_layer

    def save_then_die(root, name, tensors):
        if len(saved) == 9:
            raise KeyboardInterrupt  # killed mid-build, in block 1
        real_save(root, name, tensors)
        saved.append(name)

    monkeypatch.setattr(layerwise, "save_layer", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "db")
    assert not (tmp_path / "db" / MANIFEST).exists()
    saved.clear()
    monkeypatch.setattr(layerwise, "save_layer", lambda root, name, tensors: saved.append(name) or real_save(root, name, tensors))
    resumed = build(tmp_path / "db")
    assert len(saved) == 14 - 9  # 2 blocks x 7 layers, 9 were finished
    drop = ("seconds",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}
    for name in reference["layers"]:
        a, b = load_file(str(layer_file(tmp_path / "ref", name))), load_file(str(layer_file(tmp_path / "db", name)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "db" / "build.json").exists()
    with pytest.raises(UserError, match="already holds a finished database"):
        build(tmp_path / "db")  # a finished database is never overwritten
    # an interrupted build resumed with other settings starts over instead of mixing two builds
    (tmp_path / "db" / MANIFEST).unlink()
    saved.clear()
    if space == "sparsity":
        module.build_sparsity_database(Decoder(tiny_model(layers=2)), pool, tmp_path / "db", 0.5, 1, 24,
                                       batch_size=4, progress=False)
    else:
        module.build_quant_database(Decoder(tiny_model(layers=2)), pool, tmp_path / "db", (2, 4), 16, 0,
                                    batch_size=4, progress=False)
    assert len(saved) == 14


def test_fixed_sample_track_is_recorded_reported_and_changes_nothing_else(tiny_checkpoint, tmp_path, monkeypatch):
    model, text = tiny_checkpoint
    tracked = search_args(model, text, tmp_path / "tracked", 5) + ["--track-every", "2", "--track-tokens", "128"]
    events = []
    ensure, measure = fitness.TeacherCache.ensure, fitness.Evaluator.measure

    def recording_ensure(self, *args, **kwargs):
        positions = ensure(self, *args, **kwargs)
        if positions:
            events.append("teacher")
        return positions

    monkeypatch.setattr(fitness.TeacherCache, "ensure", recording_ensure)
    monkeypatch.setattr(fitness.Evaluator, "measure",
                        lambda self, *a, **k: events.append("measure") or measure(self, *a, **k))
    assert main(tracked) == 0
    # both teacher passes (pool and held-aside track) run while the model is dense, before any candidate
    assert events.count("teacher") == 2 and "teacher" not in events[events.index("measure"):]
    assert main(search_args(model, text, tmp_path / "plain", 5) + ["--track-every", "0"]) == 0
    with_track, without = comparable(tmp_path / "tracked"), comparable(tmp_path / "plain")
    assert [h["generation"] for h in with_track["history"] if h["track"] is not None] == [0, 2, 4, 5]
    assert all(h["track"] is None for h in without["history"])
    # the same trajectory; the track only adds its best parent to the final choice
    assert [h["fitness"] for h in with_track["history"]] == [h["fitness"] for h in without["history"]]
    last = [c["fitness"] for r in (with_track, without) for c in r["final_choice"]["candidates"]
            if c["from"] == "last parent"]
    assert last[0] == last[1]
    best = min(c["fitness"] for c in with_track["final_choice"]["candidates"])
    assert with_track["fitness"]["kl"] == pytest.approx(best, rel=1e-12)
    assert main(["report", str(tmp_path / "tracked"), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert "fixed-sample kl" in (tmp_path / "report" / "report.md").read_text()


def test_a_search_never_returns_worse_than_where_it_started(tiny_checkpoint, tmp_path, monkeypatch):
    """A last parent that noise led below the initial winner is not the answer: the final choice scores
    it, the best tracked parent and the initial contenders on the final sample and returns the best."""
    from evopress.pipeline import search as pipeline_search

    real, worst = pipeline_search.evolve, []

    def evolve_to_worse(problem, evaluator, initial, config, state=None, on_generation=None, on_start=None):
        s = real(problem, evaluator, initial, config, state, on_generation, on_start=on_start)
        scores = [float(x) for x in evaluator.score(initial, evaluator.pool.first(128))]
        worst.append(max(scores))
        s.parent = initial[int(np.argmax(scores))]  # the worst start, as if noise had led there
        return s

    monkeypatch.setattr(pipeline_search, "evolve", evolve_to_worse)
    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "run", 3)) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    choice = result["final_choice"]
    assert choice["chosen"] != "last parent" and choice["tokens"] == 128
    assert {c["from"] for c in choice["candidates"]} >= {"last parent", "initial winner"}
    best = min(c["fitness"] for c in choice["candidates"])
    assert result["fitness"]["kl"] == pytest.approx(best, rel=1e-12) and best < worst[0]


def test_a_database_is_refused_for_a_text_that_changed_under_the_same_name(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    copy = tmp_path / "text.txt"
    copy.write_text(text.read_text())
    common = ["--model", str(model), "--data", str(copy), "--seq-len", "32", "--quiet"]
    assert main(["build-db", "--space", "quant", "--bits", "2,3", "--calib-tokens", "256", "--out",
                 str(tmp_path / "db"), *common]) == 0
    search = ["search", "--space", "quant", "--target", "2.5", "--db", str(tmp_path / "db"), "--generations", "1",
              "--offspring", "2", "--stages", "1:32", "--initial-tokens", "32", "--final-tokens", "64",
              "--calib-tokens", "512", "--init-from", "none", *common]
    assert main([*search, "--out", str(tmp_path / "same")]) == 0  # a larger pool of the same text starts with it
    copy.write_text(copy.read_text().replace("city", "river"))
    capsys.readouterr()
    assert main([*search, "--out", str(tmp_path / "edited")]) == 2
    assert "built on other text" in capsys.readouterr().err


def test_results_stay_labelled_eval_merges_report_groups_models_and_model_paths_are_absolute(
        tiny_checkpoint, tmp_path, monkeypatch):
    model, text = tiny_checkpoint
    monkeypatch.chdir(model.parent)  # the model given relative to the working directory
    out = tmp_path / "run"
    assert main(search_args(model.name, text, out, 1)) == 0
    assert json.loads((out / "result.json").read_text())["recipe"]["model"] == str(model.resolve())
    monkeypatch.chdir(tmp_path)  # evaluating from elsewhere still finds the model
    evaluate = ["eval", str(out), "--eval-tokens", "64", "--eval-seq-len", "32", "--quiet"]
    assert main([*evaluate, "--eval-data", str(text)]) == 0
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    assert main([*evaluate, "--eval-data", str(other)]) == 0
    assert set(json.loads((out / "eval.json").read_text())["datasets"]) == {str(text), str(other)}  # merged
    second = write_tiny_checkpoint(tmp_path / "second")[0]
    assert main(search_args(second, text, tmp_path / "run2", 1)) == 0
    assert main(["eval", str(tmp_path / "run2"), "--eval-tokens", "64", "--eval-seq-len", "32", "--eval-data",
                 str(text), "--quiet"]) == 0
    assert main(["report", str(out), str(tmp_path / "run2"), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert table.count("| dense |") == 2 and str(model.resolve()) in table and str(second.resolve()) in table
    assert main(["baseline", "--method", "shortgpt", "--target", "0.34", "--model", str(model), "--data", str(text),
                 "--seq-len", "32", "--calib-tokens", "1024", "--tokens", "64", "--final-tokens", "128",
                 "--out", str(out), "--restart", "--quiet"]) == 0
    assert not (out / "eval.json").exists()  # the old search's perplexity never sits beside the baseline
