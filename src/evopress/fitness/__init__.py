"""Fitness: KL(dense || candidate) per token, measured end to end for every candidate.

- ``kl``: the KL maths from hidden-sized teacher entries, chunked under a memory bound.
- ``teacher``: the dense model's entries per calibration window, computed once.
- ``prefix``: which block boundaries a stage keeps so each candidate starts where it differs.
- ``evaluator``: ``Evaluator`` scores a stage's candidates on one shared sample.
- ``aggregate``: one number per candidate from its per-window sums (per source), and its noise.
"""

from .aggregate import AGGREGATES, Aggregate, Score
from .evaluator import METRICS, EvalStats, Evaluator, FitnessConfig, Measurement, to_device
from .kl import (HOST_BLOCK_BYTES, block_bytes_for, chunk_positions, compare, fp32_product, linear_head,
                 logsumexp_, predicted, teacher_targets)
from .teacher import TeacherCache

__all__ = ["AGGREGATES", "Aggregate", "Score", "METRICS", "EvalStats", "Evaluator", "FitnessConfig", "Measurement", "TeacherCache", "to_device",
           "HOST_BLOCK_BYTES", "block_bytes_for", "chunk_positions", "compare", "fp32_product", "linear_head",
           "logsumexp_", "predicted", "teacher_targets"]
