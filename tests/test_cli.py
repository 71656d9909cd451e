"""CLI contract: bad input is one clear line on stderr and exit code 2."""

import pytest

from evopress.cli import build_parser, main, parse_stages, recipe_from_args
from evopress.errors import UserError


@pytest.mark.parametrize("argv, message", [
    (["search", "--space", "nope", "--target", "0.25", "--out", "x"], "unknown space 'nope'"),
    (["search", "--target", "0.25", "--model", "/does/not/exist", "--out", "x"], "not found"),
    (["search", "--target", "0.25", "--stages", "2-2048", "--out", "x"], "--stages"),
    (["search", "--target", "0.25", "--stages", "2:256,2:512", "--out", "x"], "exactly 1 survivor"),
    (["search", "--target", "0.25", "--fitness", "mse", "--out", "x"], "invalid choice"),
    (["baseline", "--method", "magic", "--target", "0.25", "--out", "x"], "unknown method 'magic'"),
    (["search", "--out", "x"], "--target"),
    (["search", "--target", "0.25", "--prefix-cache-gb", "-1", "--out", "x"], "--prefix-cache-gb"),
    (["search", "--target", "0.25", "--batch-tokens", "0", "--out", "x"], "--batch-tokens"),
    (["eval", "/does/not/exist"], "not found"),
    (["frobnicate"], "invalid choice"),
    (["search", "--target", "inf", "--out", "x"], "finite number"),
    (["pareto", "--space", "joint", "--db", "db", "--targets", "2,inf", "--out", "x"], "--targets inf"),
    (["search", "--target", "0.25", "--max-memory", "cpu=-5GiB", "--out", "x"], "--max-memory cpu=-5GiB"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evopress: error:") and message in err
    assert len(err.splitlines()) == 1


def test_target_out_of_range_on_a_real_decoder(tmp_path, capsys):
    from evopress.models import Decoder
    from evopress.spaces import make_space

    from .conftest import tiny_model

    with pytest.raises(UserError, match="out of range"):
        make_space("drop", Decoder(tiny_model()), 1.5, {"granularity": "sublayer"})


def test_parse_stages():
    assert parse_stages("2:2048,1:32768") == [(2, 2048), (1, 32768)]
    with pytest.raises(UserError):
        parse_stages("2:2048:1")


def test_prefix_cache_flag_sets_the_bound_but_not_the_fingerprint():
    def recipe(*extra):
        args = build_parser().parse_args(["search", "--target", "0.25", "--out", "x", *extra])
        return recipe_from_args(args, "evopress")

    small = recipe("--prefix-cache-gb", "0.5")
    assert small.fitness.cache_bytes == 2**29
    assert small.fingerprint() == recipe().fingerprint()  # a speed knob: resuming with another value is fine


def test_batch_tokens_flag_and_other_speed_knobs_leave_the_fingerprint():
    from evopress.recipe import make_recipe

    def recipe(*extra):
        args = build_parser().parse_args(["search", "--target", "0.25", "--out", "x", *extra])
        return recipe_from_args(args, "evopress")

    by_tokens = recipe("--batch-tokens", "4096")
    assert by_tokens.fitness.batch_tokens == 4096 and recipe().fitness.batch_tokens is None
    assert by_tokens.fingerprint() == recipe().fingerprint()
    knobs = dict(batch_tokens=4096, block_bytes=1 << 20, teacher_device_bytes=0, profile=True)
    assert make_recipe(**knobs).fingerprint() == make_recipe().fingerprint()


def test_init_from_defaults_to_the_spaces_warm_start_and_none_is_the_papers_random_start():
    """'auto' resolves when the recipe is made, so recipe.json names the methods; none and [] are random only."""
    from evopress.recipe import make_recipe

    def recipe(*extra, command="search"):
        target = ["--target", "0.25"] if command == "search" else ["--targets", "0.25,0.5"]
        args = build_parser().parse_args([command, *target, "--out", "x", *extra])
        return recipe_from_args(args, "evopress", 0.25)

    assert recipe().init_from == make_recipe().init_from == ["shortgpt", "angular"]
    assert recipe("--init-from", "none").init_from == recipe("--init-from", "").init_from == []
    assert recipe("--init-from", "angular,random").init_from == ["angular", "random"]
    assert recipe(command="pareto").init_from == ["shortgpt", "angular"]
    assert make_recipe(space="quant", target=3.0, space_options={"db": "db"}).init_from == ["dp"]
    assert make_recipe(space="sparsity", target=0.5, space_options={"db": "db"}).init_from == ["owl"]
    assert make_recipe(space="joint", target=3.0, space_options={"db": "db"}).init_from == ["grid"]
    # the depth baselines rank whole blocks and take no rules: under rules the default is random only
    assert make_recipe(space_options={"rules": [{"match": "re:.*layers\\.0\\..*", "pin": 0}]}).init_from == []
    assert make_recipe(method="shortgpt", init_from=["angular"]).init_from == []  # a baseline's: none
    # a stored recipe.json always holds the list: an old one with [] still means random, fingerprint and all
    stored = make_recipe(init_from="none").to_json()
    assert stored["init_from"] == [] and make_recipe(stored).fingerprint() == make_recipe(init_from=[]).fingerprint()
    assert make_recipe(stored).fingerprint() != make_recipe().fingerprint()
    with pytest.raises(UserError, match="unknown method 'oracle'"):
        make_recipe(init_from="oracle")
