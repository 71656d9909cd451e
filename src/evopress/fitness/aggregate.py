"""One number per candidate from its per-window sums, and how much of a difference is noise.

Why per window: a selection stage scores every candidate on the same few windows, so two candidates'
difference is paired window by window. The spread of that difference over the windows is the noise of
the stage: a child better than its parent by less than it may only have met easier windows
(``Aggregate.noise``, a jackknife over windows: it holds for every aggregate, linear or not).

Why per source: with several calibration sources a token mean lets a candidate trade one domain for
another (better on Wikipedia, worse on news) and still win. The aggregates (``AGGREGATES``):

- ``tokens``: the mean over all predicted positions, the paper's fitness.
- ``sources``: the mean over sources of each source's mean, divided by the reference's (the search's
  initial parent): a 1% gain on one source then counts as much as a 1% loss on another.
- ``worst``: the largest of those ratios: a candidate is as good as its worst source.

With one source all three rank candidates alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGGREGATES = ("tokens", "sources", "worst")


class Score(float):
    """A candidate's fitness on one sample (lower is better) that keeps the per-window sums it came from.

    A float, so whatever ranks, prints or stores fitness values takes it as one; the sums are there
    for ``Aggregate.noise``.
    """

    sums: np.ndarray  # per window of the sample: the metric summed over its predicted positions
    positions: np.ndarray  # per window: predicted positions
    sources: np.ndarray  # per window: index of its calibration source

    def __new__(cls, value: float, sums: np.ndarray, positions: np.ndarray, sources: np.ndarray) -> "Score":
        score = super().__new__(cls, value)
        score.sums, score.positions, score.sources = sums, positions, sources
        return score

    def __reduce__(self) -> tuple:  # pickling (torchrun gathers scores between ranks)
        return Score, (float(self), self.sums, self.positions, self.sources)


@dataclass
class Aggregate:
    kind: str = "tokens"
    names: tuple[str, ...] = ("text",)  # the calibration sources, in label order
    reference: np.ndarray | None = None  # per source: the reference's mean metric (None: 1 each)

    def per_source(self, sums: np.ndarray, positions: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Each source's mean metric per position; NaN for a source the windows do not cover."""
        total = np.bincount(sources, weights=sums, minlength=len(self.names))
        count = np.bincount(sources, weights=positions, minlength=len(self.names))
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count

    def value(self, sums: np.ndarray, positions: np.ndarray, sources: np.ndarray) -> float:
        if self.kind == "tokens":
            return float(sums.sum() / max(positions.sum(), 1))
        ratios = self.per_source(sums, positions, sources)
        if self.reference is not None:
            ratios = ratios / self.reference
        ratios = ratios[~np.isnan(ratios)]
        return float(ratios.mean() if self.kind == "sources" else ratios.max())

    def score(self, sums: np.ndarray, positions: np.ndarray, sources: np.ndarray) -> Score:
        return Score(self.value(sums, positions, sources), sums, positions, sources)

    def noise(self, a: Score, b: Score) -> float:
        """The standard error of ``a - b`` for two scores on the same windows (jackknife).

        0 with fewer than two windows: one window says nothing about the spread, so the comparison is plain.
        """
        n = len(a.sums)
        if n < 2:
            return 0.0
        keep = ~np.eye(n, dtype=bool)
        diffs = np.array([self.value(a.sums[k], a.positions[k], a.sources[k]) -
                          self.value(b.sums[k], b.positions[k], b.sources[k]) for k in keep])
        return float(np.sqrt((n - 1) / n * ((diffs - diffs.mean()) ** 2).sum()))
