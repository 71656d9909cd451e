"""The built-in texts: installed by the setup, split by document, disjoint, and enough for an evaluation."""

import pytest

from evopress.corpora import CORPORA, HELD_OUT
from evopress.data import DEFAULT_CALIBRATION, source_parts

# the generalization benchmark evaluates 2,048 tokens of each, about 8k characters of English: twice that at least
MIN_EVAL_CHARS = 16_000


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_every_text_splits_into_disjoint_nonempty_parts(name):
    calibration, evaluation = CORPORA[name].documents("calibration"), CORPORA[name].documents("evaluation")
    assert calibration and evaluation and all(d.strip() for d in calibration + evaluation)
    assert not set(calibration) & set(evaluation)
    assert sum(map(len, evaluation)) > MIN_EVAL_CHARS
    assert CORPORA[name].documents("evaluation") == evaluation  # the split is fixed


def test_the_default_calibration_never_touches_a_held_out_genre():
    calibrated = source_parts(DEFAULT_CALIBRATION)
    assert len(calibrated) >= 3 and not set(calibrated) & set(HELD_OUT)
    assert len(HELD_OUT) >= 5 and len({CORPORA[n].genre for n in HELD_OUT}) == len(HELD_OUT)
    assert not {CORPORA[n].genre for n in calibrated} & {CORPORA[n].genre for n in HELD_OUT}
