"""Text configurations: the reference implementation's files and ours, read (import-config) and written
(export-config) through the CLI, on tiny random Llama checkpoints of 32 and 30 blocks.

The reference files here are written by hand from the layout the reference writes: depth, one line per
block (``none``, ``attn``, ``mlp``, ``attn+mlp``), each ending in a newline; sparsity, ``<layer>: <offset>``
sorted by name as text, newline-separated with none after the last; quantization, ``<layer>: <bits>``
sorted by block and name parts, grouped by weight count in order of first appearance, likewise joined.
"""

import json

import pytest

from evopress.cli import main

from .conftest import write_tiny_checkpoint

DATA = ["--seq-len", "32", "--calib-tokens", "256", "--final-tokens", "64", "--quiet"]
# the tiny Llama's linear layers: name -> weight count (hidden 32, MLP 64, 2 of 4 heads for k/v)
SIZES = {"self_attn.q_proj": 1024, "self_attn.k_proj": 512, "self_attn.v_proj": 512, "self_attn.o_proj": 1024,
         "mlp.gate_proj": 2048, "mlp.up_proj": 2048, "mlp.down_proj": 2048}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {layers: write_tiny_checkpoint(root / str(layers), layers=layers) for layers in (32, 30)}


def run_args(checkpoints, layers):
    model, text = checkpoints[layers]
    return ["--model", str(model), "--data", str(text), *DATA]


def reference_drop(blocks, attn, mlp):
    words = {(False, False): "none", (True, False): "attn", (False, True): "mlp", (True, True): "attn+mlp"}
    return "".join(words[b in attn, b in mlp] + "\n" for b in range(blocks))


def result(out):
    return json.loads((out / "result.json").read_text())


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evopress: error:"), err
    return err[0]


# --- depth ---------------------------------------------------------------------------------------------

# (blocks, dropped attention, dropped MLP): mixed sub-block drops as in the released Mistral 25% config
DEPTH_FILES = {
    "32 blocks, 1/4": (32, {2, 3, 8, 18, 24, 25, 27, 31}, {6, 12, 14, 15, 20, 24, 25, 31}),
    "32 blocks, 1/16": (32, {5, 30}, {30, 31}),
    "30 blocks, 7 of each": (30, {1, 9, 17, 20, 21, 22, 29}, {4, 9, 17, 21, 22, 26, 28}),
}


@pytest.mark.parametrize("case", list(DEPTH_FILES))
def test_reference_depth_file_round_trips_through_import_eval_export(case, checkpoints, tmp_path, capsys):
    blocks, attn, mlp = DEPTH_FILES[case]
    path = tmp_path / "layer_drop_config.txt"
    path.write_text(reference_drop(blocks, attn, mlp))
    out = tmp_path / "imported"
    assert main(["import-config", str(path), *run_args(checkpoints, blocks), "--out", str(out)]) == 0
    imported = result(out)
    assert imported["target"] == len(attn) / blocks and imported["space_options"]["granularity"] == "sublayer"
    assert imported["levels"] == [int(b in attn) for b in range(blocks)] + [int(b in mlp) for b in range(blocks)]
    _, text = checkpoints[blocks]
    assert main(["eval", str(out), "--eval-data", str(text), "--eval-tokens", "128", "--eval-seq-len", "32",
                 "--quiet"]) == 0
    assert (out / "eval.json").is_file()
    back = tmp_path / "back.txt"
    assert main(["export-config", str(out), "--format", "reference-drop", "--out", str(back), "--quiet"]) == 0
    assert back.read_bytes() == path.read_bytes()
    capsys.readouterr()
    assert main(["export-config", str(out), "--format", "reference-drop"]) == 0  # default: stdout
    assert capsys.readouterr().out == path.read_text()


def test_reference_depth_file_meets_an_explicit_target(checkpoints, tmp_path):
    blocks, attn, mlp = DEPTH_FILES["30 blocks, 7 of each"]
    path = tmp_path / "layer_drop_config.txt"
    path.write_text(reference_drop(blocks, attn, mlp))
    out = tmp_path / "imported"  # the reference's sparsity 0.25 on 30 blocks: int(0.25 * 30) = 7 of each
    assert main(["import-config", str(path), "--format", "reference-drop", "--target", "0.25",
                 *run_args(checkpoints, blocks), "--out", str(out)]) == 0
    assert result(out)["target"] == 0.25 and result(out)["budget"]["dropped_attention"] == 7


def test_whole_block_file_reads_as_either_granularity(checkpoints, tmp_path, capsys):
    """A --drop_entire_block file: the sub-block space by default, whole blocks on request; same model."""
    blocks, dropped = 32, {10, 11, 20, 21}
    path = tmp_path / "layer_drop_config.txt"
    path.write_text(reference_drop(blocks, dropped, dropped))
    runs = {}
    for granularity in ("sublayer", "block"):
        out = tmp_path / granularity
        assert main(["import-config", str(path), "--granularity", granularity, *run_args(checkpoints, blocks),
                     "--out", str(out)]) == 0
        runs[granularity] = result(out)
        assert main(["export-config", str(out), "--format", "reference-drop", "--out", str(out / "back.txt"),
                     "--quiet"]) == 0
        assert (out / "back.txt").read_bytes() == path.read_bytes()
    assert runs["block"]["levels"] == [int(b in dropped) for b in range(blocks)]
    assert runs["block"]["target"] == runs["sublayer"]["target"] == 0.125
    assert runs["block"]["fitness"] == runs["sublayer"]["fitness"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(reference_drop(blocks, {3, 10}, {4, 10}))
    assert main(["import-config", str(mixed), "--granularity", "block", *run_args(checkpoints, blocks),
                 "--out", str(tmp_path / "bad")]) == 2
    assert f"{mixed}:4: 'attn' drops part of block 3" in one_error_line(capsys)


def _depth_lines(edit):
    blocks, attn, mlp = DEPTH_FILES["32 blocks, 1/4"]
    lines = reference_drop(blocks, attn, mlp).splitlines(keepends=True)
    return "".join(edit(lines))


BAD_DEPTH = {  # name: (file text, extra arguments, expected fragment; {f} is the file)
    "a line too many": (_depth_lines(lambda ls: ls + ["none\n"]), [],
                        "{f}:33: a line for block 32, but the model has 32 blocks"),
    "a line short": (_depth_lines(lambda ls: ls[:31]), [],
                     "{f}:31: the file ends after 31 blocks, but the model has 32"),
    "unknown word": (_depth_lines(lambda ls: ls[:4] + ["atn\n"] + ls[5:]), [],
                     "{f}:5: expected what block 4 drops (none, attn, mlp or attn+mlp), got 'atn'"),
    "unequal kinds": (_depth_lines(lambda ls: ls[:2] + ["none\n"] + ls[3:]), [],
                      "{f}: the configuration drops 7 attention and 8 MLP sub-blocks"),
    "other target": (_depth_lines(lambda ls: ls), ["--target", "0.5"], "does not meet the budget of target 0.5"),
    "other space's format": (_depth_lines(lambda ls: ls), ["--format", "reference-quant"],
                             "space 'drop' has no config format 'reference-quant'"),
    "other space": (_depth_lines(lambda ls: ls), ["--space", "quant"],
                    "looks like reference-drop, a format of space 'drop', not of 'quant' (--space drop)"),
}


@pytest.mark.parametrize("case", list(BAD_DEPTH))
def test_depth_file_that_does_not_fit_is_one_line_naming_it(case, checkpoints, tmp_path, capsys):
    text, extra, expected = BAD_DEPTH[case]
    path = tmp_path / "layer_drop_config.txt"
    path.write_text(text)
    capsys.readouterr()
    assert main(["import-config", str(path), *extra, *run_args(checkpoints, 32), "--out", str(tmp_path / "o")]) == 2
    assert expected.format(f=path) in one_error_line(capsys)
    assert not (tmp_path / "o" / "result.json").exists()


def test_our_own_format_round_trips_without_a_target(checkpoints, tmp_path):
    blocks, attn, mlp = DEPTH_FILES["30 blocks, 7 of each"]
    path = tmp_path / "layer_drop_config.txt"
    path.write_text(reference_drop(blocks, attn, mlp))
    assert main(["import-config", str(path), *run_args(checkpoints, blocks), "--out", str(tmp_path / "a")]) == 0
    ours = tmp_path / "a" / "config.txt"
    assert ours.read_text().startswith("model.layers.0.self_attn: 0\nmodel.layers.1.self_attn: 1\n")
    assert main(["import-config", str(ours), *run_args(checkpoints, blocks), "--out", str(tmp_path / "b")]) == 0
    assert result(tmp_path / "b")["levels"] == result(tmp_path / "a")["levels"]
    assert result(tmp_path / "b")["target"] == 7 / 30
    back = tmp_path / "back.txt"
    assert main(["export-config", str(tmp_path / "b"), "--out", str(back), "--quiet"]) == 0  # default: ours
    assert back.read_bytes() == ours.read_bytes()


# --- quantization and sparsity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def databases(checkpoints, tmp_path_factory):
    """Quantization (2, 3, 4 bits) and sparsity (magnitude, 50% +- 2 steps) databases of the 32-block model."""
    model, text = checkpoints[32]
    root = tmp_path_factory.mktemp("dbs")
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "64", "--quiet"]
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--out", str(root / "quant"), *common]) == 0
    assert main(["build-db", "--space", "sparsity", "--levels", "2", "--method", "magnitude",
                 "--out", str(root / "sparsity"), *common]) == 0
    return root


def reference_quant(blocks, bits):
    """Sorted by block then dotted name parts; grouped by size: MLP (2048), k/v (512), q/o (1024)."""
    ordered = sorted(SIZES, key=lambda name: tuple(name.split(".")))
    groups = {}
    for name in ordered:
        groups.setdefault(SIZES[name], []).append(name)
    lines = [f"model.layers.{b}.{name}: {bits(b, name)}" for members in groups.values() for b in range(blocks)
             for name in members]
    return "\n".join(lines)


def quant_bits(b, name):  # half of every size group at 2 bits, half at 3: 2.5 bits on average
    return 2 + (b + name.endswith(("up_proj", "v_proj", "q_proj"))) % 2


def test_reference_quant_file_round_trips(checkpoints, databases, tmp_path, capsys):
    path = tmp_path / "evo-kl-configuration-2.5.txt"
    path.write_text(reference_quant(32, quant_bits))
    assert path.read_text().splitlines()[:4] == ["model.layers.0.mlp.down_proj: 2", "model.layers.0.mlp.gate_proj: 2",
                                                 "model.layers.0.mlp.up_proj: 3", "model.layers.1.mlp.down_proj: 3"]
    run = ["--space", "quant", "--db", str(databases / "quant"), *run_args(checkpoints, 32)]
    assert main(["import-config", str(path), *run, "--out", str(tmp_path / "q")]) == 0
    imported = result(tmp_path / "q")
    assert imported["target"] == 2.5 and imported["budget"]["exact"]
    assert dict(zip(imported["units"], imported["levels"])) == {
        f"model.layers.{b}.{name}": quant_bits(b, name) - 2 for b in range(32) for name in SIZES}
    back = tmp_path / "back.txt"
    assert main(["export-config", str(tmp_path / "q"), "--format", "reference-quant", "--out", str(back),
                 "--quiet"]) == 0
    assert back.read_bytes() == path.read_bytes()
    assert main(["export-config", str(tmp_path / "q"), "--out", str(back), "--quiet"]) == 0
    assert back.read_bytes() == (tmp_path / "q" / "config.txt").read_bytes()
    # fused projections sharing one bitwidth (--merge_groups): one line for several layers
    lines = [f"model.layers.{b}.self_attn.q_proj,model.layers.{b}.self_attn.o_proj: 3" for b in range(32)]
    merged = tmp_path / "merged.txt"
    merged.write_text("\n".join([line for line in path.read_text().splitlines() if "_attn.q_" not in line
                                 and "_attn.o_" not in line] + lines))
    assert main(["import-config", str(merged), "--format", "reference-quant", *run, "--out", str(tmp_path / "m")]) == 0
    assert result(tmp_path / "m")["budget"]["layers_per_bitwidth"] == {"2": 80, "3": 144}
    capsys.readouterr()
    broken = tmp_path / "broken.txt"
    broken.write_text(path.read_text().replace("model.layers.0.mlp.down_proj: 2", "model.layers.0.mlp.down_proj: 6"))
    assert main(["import-config", str(broken), *run, "--out", str(tmp_path / "b")]) == 2
    assert f"{broken}:1: level '6' of model.layers.0.mlp.down_proj is not one of 2, 3, 4" in one_error_line(capsys)
    broken.write_text(path.read_text().replace("model.layers.31.mlp.up_proj", "model.layers.32.mlp.up_proj"))
    assert main(["import-config", str(broken), *run, "--out", str(tmp_path / "b")]) == 2
    assert f"{broken}:96: expected '<module>: <level>' with a module of this model's 'quant' space" in \
        one_error_line(capsys)


def reference_sparsity(blocks, offset):
    """One line per layer, names sorted as text (model.layers.10 before model.layers.2), no final newline."""
    names = sorted(f"model.layers.{b}.{name}" for b in range(blocks) for name in SIZES)
    return "\n".join(f"{name}: {offset(name)}" for name in names)


def test_reference_sparsity_file_round_trips(checkpoints, databases, tmp_path, capsys):
    offsets = {"model.layers.3.mlp.up_proj": 2, "model.layers.17.self_attn.k_proj": -1,
               "model.layers.29.mlp.down_proj": -2, "model.layers.30.self_attn.q_proj": 1}
    path = tmp_path / "final_configuration.txt"
    path.write_text(reference_sparsity(32, lambda name: offsets.get(name, 0)))
    assert path.read_text().splitlines()[:2] == ["model.layers.0.mlp.down_proj: 0", "model.layers.0.mlp.gate_proj: 0"]
    assert path.read_text().splitlines()[7] == "model.layers.1.mlp.down_proj: 0"
    assert path.read_text().splitlines()[14] == "model.layers.10.mlp.down_proj: 0"
    run = ["--space", "sparsity", "--db", str(databases / "sparsity"), *run_args(checkpoints, 32)]
    assert main(["import-config", str(path), "--format", "reference-sparsity", *run, "--out", str(tmp_path / "s")]) == 0
    imported = result(tmp_path / "s")
    assert imported["target"] == 0.5 and imported["budget"]["exact"]  # offsets sum to 0: the centre
    back = tmp_path / "back.txt"
    assert main(["export-config", str(tmp_path / "s"), "--format", "reference-sparsity", "--out", str(back),
                 "--quiet"]) == 0
    assert back.read_bytes() == path.read_bytes()
    assert main(["export-config", str(tmp_path / "s"), "--out", str(back), "--quiet"]) == 0
    assert back.read_bytes() == (tmp_path / "s" / "config.txt").read_bytes()
    # offsets summing to +2 steps of 40 weights: target = the shortest decimal giving that total
    offsets["model.layers.0.mlp.gate_proj"] = 2
    path.write_text(reference_sparsity(32, lambda name: offsets.get(name, 0)))
    assert main(["import-config", str(path), *run, "--out", str(tmp_path / "s2")]) == 0  # recognised from the text
    weights = 32 * sum(SIZES.values())
    assert result(tmp_path / "s2")["target"] == 0.5003 and result(tmp_path / "s2")["budget"]["zeros"] == \
        weights // 2 + 2 * 40
    path.write_text(path.read_text().replace("model.layers.3.mlp.up_proj: 2", "model.layers.3.mlp.up_proj: 3"))
    capsys.readouterr()
    assert main(["import-config", str(path), *run, "--out", str(tmp_path / "b")]) == 2
    line = path.read_text().splitlines().index("model.layers.3.mlp.up_proj: 3") + 1
    assert f"{path}:{line}: level '3' of model.layers.3.mlp.up_proj is not one of -2, -1, 0, 1, 2" in \
        one_error_line(capsys)
