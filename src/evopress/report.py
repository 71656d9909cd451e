"""Compare runs: a markdown table and PNG plots (profiles, search curves, held-out metrics)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .io import atomic_write, read_json

_UNIT = re.compile(r"\.(\d+)(?:\.(.+))?$")


def load_run(d: Path) -> dict[str, Any]:
    run = read_json(Path(d) / "result.json")
    run["dir"] = str(d)
    ev = Path(d) / "eval.json"
    run["eval"] = read_json(ev) if ev.is_file() else None
    return run


def profile_matrix(units: list[str], levels: list[int]) -> tuple[list[str], np.ndarray]:
    """Levels arranged as [kind x block]; kind is the unit name after the block index."""
    cells: dict[tuple[str, int], int] = {}
    for unit, level in zip(units, levels):
        m = _UNIT.search(unit)
        if not m:
            raise UserError(f"cannot place unit '{unit}' in a block")
        cells[(m.group(2) or "block", int(m.group(1)))] = level
    kinds = list(dict.fromkeys(k for k, _ in cells))
    blocks = 1 + max(b for _, b in cells)
    mat = np.full((len(kinds), blocks), np.nan)
    for (kind, b), level in cells.items():
        mat[kinds.index(kind), b] = level
    return kinds, mat


def label(run: dict[str, Any]) -> str:
    """Method name, marked when a search was warm-started from baselines and when the result is finalized."""
    init = run.get("recipe", {}).get("init_from") or []
    return (run["method"] + (f" (init {'+'.join(init)})" if init else "")
            + (", finalized" if run.get("finalized") else ""))


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One table; runs of different models are grouped, each group under its own dense row."""
    sets = list(dict.fromkeys(s for r in runs if r["eval"] for s in r["eval"]["datasets"]))
    head = ["model", "method", "space", "target", "achieved", "calib KL"]
    for s in sets:
        head += [f"{s} PPL", f"{s} KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in dict.fromkeys(r["model"] for r in runs):
        group = [r for r in runs if r["model"] == model]
        dense = {s: r["eval"]["datasets"][s]["dense_ppl"] for r in group if r["eval"] for s in r["eval"]["datasets"]}
        if dense:
            lines.append(f"| {model} | dense | | | | 0 | " + " | ".join(
                f"{dense[s]:.2f} | 0" if s in dense else "- | -" for s in sets) + " |")
        lines += [_row(r, sets) for r in group]
    return "\n".join(lines)


def _row(r: dict[str, Any], sets: list[str]) -> str:
    achieved = r["budget"].get("achieved")
    row = [r["model"], label(r), r["space"], f"{r['target']:g}",
           f"{achieved:.4f}" if isinstance(achieved, float) else str(achieved), f"{r['fitness']['kl']:.4f}"]
    for s in sets:
        e = (r["eval"] or {}).get("datasets", {}).get(s)
        row += [f"{e['ppl']:.2f}", f"{e['kl']:.4f}"] if e else ["-", "-"]
    return "| " + " | ".join(row) + " |"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_profiles(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 0.5 + 0.45 * sum(
        len(profile_matrix(r["units"], r["levels"])[0]) + 1.5 for r in runs)), squeeze=False)
    per_unit = [v for r in runs for v in r["budget"].get("unit_values") or []]  # e.g. per-layer sparsity
    for ax, r in zip(axes[:, 0], runs):
        values = r["budget"].get("level_values")  # e.g. bitwidths: plot what a level means, not its index
        if r["budget"].get("unit_values"):
            shown, values = r["budget"]["unit_values"], per_unit  # one colour scale across the panels
        else:
            shown = [values[lv] for lv in r["levels"]] if values else r["levels"]
        kinds, mat = profile_matrix(r["units"], shown)
        scale = {"vmin": min(values), "vmax": max(values)} if values else {}  # same colours in every panel
        image = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", **scale)
        if values:
            fig.colorbar(image, ax=ax, label=r["budget"].get("value_label", "bits"), pad=0.01)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_title(f"{label(r)} ({r['space']} {r['target']:g})", fontsize=9)
        ax.set_xticks(range(mat.shape[1]), [str(b) if b % 5 == 0 else "" for b in range(mat.shape[1])], fontsize=7)
    axes[-1, 0].set_xlabel("block")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _tracked(run: dict[str, Any]) -> list[tuple[int, float]]:
    """(generation, fitness on the fixed held-aside sample) of a search, where it was measured."""
    return [(h["generation"], h["track"]) for h in run["history"] if h.get("track") is not None]


def fitness_name(run: dict[str, Any]) -> str:
    """What a search's fitness values are: the metric, or with a per-source aggregate over a mix of
    sources, ratios of it to the initial winner's (fitness.aggregate)."""
    aggregate = run.get("recipe", {}).get("fitness", {}).get("aggregate", "tokens")
    if aggregate == "tokens" or not run.get("reference_sources"):
        return run["fitness"]["metric"]
    over = {"sources": "mean over sources", "worst": "worst source"}.get(aggregate, aggregate)
    return f"{run['fitness']['metric']} ratio to the initial winner ({over})"


def convergence(run: dict[str, Any], threshold: float = 0.01) -> str | None:
    """Whether the last quarter of a search still improved its fixed-sample fitness (users: run longer)."""
    points = _tracked(run)
    if len(points) < 2:
        return None
    last_gen, last = points[-1]
    mark, before = next(((g, v) for g, v in reversed(points) if g <= 0.75 * last_gen), points[0])
    gain = (before - last) / before if before else 0.0
    verdict = "still improving: a longer search should pay" if gain > threshold else "flat: more generations " \
        "are unlikely to help much"
    return (f"{label(run)} {run['target']:g}: fixed-sample {fitness_name(run)} {before:.4f} at generation "
            f"{mark} -> {last:.4f} at {last_gen} ({100 * gain:+.1f}% lower); {verdict}")


def plot_search(runs: list[dict[str, Any]], path: Path) -> bool:
    """The fixed-sample track as the main curve; the per-generation fitness (a fresh sample each time) faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searched = [r for r in runs if r["history"]]
    if not searched:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in searched:
        name = f"{label(r)} {r['target']:g}"
        gens = [h["generation"] for h in r["history"]]
        tracked = _tracked(r)
        line, = ax.plot(gens, [h["fitness"] for h in r["history"]], lw=1, alpha=0.35,
                        label=f"{name}, per-generation sample")
        if tracked:
            ax.plot(*zip(*tracked), marker="o", color=line.get_color(), label=f"{name}, fixed held-aside sample")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"parent {fitness_name(searched[0])}")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_metrics(runs: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in runs if r["eval"]]
    if not evaluated:
        return False
    sets = list(evaluated[0]["eval"]["datasets"])
    fig, axes = plt.subplots(1, 2 * len(sets), figsize=(4 * len(sets) * 2, 3.5), squeeze=False)
    one_model = len({r["model"] for r in evaluated}) == 1
    names = [f"{label(r)}\n{r['target']:g}" + ("" if one_model else f"\n{r['model']}") for r in evaluated]
    for i, s in enumerate(sets):
        for j, key in enumerate(("ppl", "kl")):
            ax = axes[0, 2 * i + j]
            vals = [r["eval"]["datasets"].get(s, {}).get(key, np.nan) for r in evaluated]
            ax.bar(range(len(vals)), vals, color="tab:blue")
            ax.set_xticks(range(len(vals)), names, fontsize=7)
            ax.set_title(f"{s} held-out {key.upper()}", fontsize=9)
            if key == "ppl" and one_model and s in evaluated[0]["eval"]["datasets"]:
                ax.axhline(evaluated[0]["eval"]["datasets"][s]["dense_ppl"], color="k", ls="--", lw=1,
                           label="dense")
                ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(dirs: list[Path], out: Path) -> dict[str, Any]:
    runs = [load_run(d) for d in dirs]
    out = Path(out)
    table = markdown_table(runs)
    files = {"profile": out / "profile.png"}
    plot_profiles(runs, files["profile"])
    if plot_search(runs, out / "search.png"):
        files["search"] = out / "search.png"
    if plot_metrics(runs, out / "metrics.png"):
        files["metrics"] = out / "metrics.png"
    protocol = next((r["eval"]["protocol"] for r in runs if r["eval"]), "not evaluated")
    verdicts = [v for v in map(convergence, runs) if v]
    text = (f"# evopress report\n\n{table}\n\nCalibration KL: mean per-token KL(dense || compressed) on the "
            f"same calibration sample for every method. Held-out protocol: {protocol}\n\n"
            + "".join(f"- {v}\n" for v in verdicts) + ("\n" if verdicts else "")
            + "".join(f"![{k}]({p.name})\n" for k, p in files.items()))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return {"markdown": table, "convergence": verdicts, "files": {k: str(p) for k, p in files.items()}}


def plot_front(front: dict[str, Any], path: Path) -> None:
    """Held-out KL and PPL (first evaluation set) against the whole model's size, one line per method.

    The top axis gives the same sizes as average bits per parameter of the compressible modules.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense, source = front["dense"], front["eval"]["data"][0]
    rest = front["model_bytes_dense"] - dense["size_bytes"]  # the modules no level touches
    per_gb = 8e9 / front["parameters"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("kl", "ppl")):
        for method, points in front["methods"].items():
            ax.plot([p["model_gb"] for p in points], [p["held_out"][source][key] for p in points], "o-",
                    label=method, lw=2 if method == "evopress" else 1)
        ax.plot([dense["model_gb"]], [dense["held_out"][source][key]], "k*", ms=10, label="dense")
        ax.set_xlabel("model size (GB)")
        ax.set_ylabel(f"held-out {key.upper()} ({source})")
        top = ax.secondary_xaxis("top", functions=(lambda gb: (gb - rest / 1e9) * per_gb,
                                                    lambda bits: bits / per_gb + rest / 1e9))
        top.set_xlabel("bits per parameter (compressible modules)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{front['space']} front, {front['model']}")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
