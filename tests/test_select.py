"""Top-K selection and training weights, against hand computations."""

import numpy as np
import pytest

from sotjax import SotjaxInputError, select
from sotjax.select import effective_sample_size, resolve_keep_count


def test_topk_by_count_and_fraction_with_index_tie_break():
    w = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
    sel = select(w, keep_count=3)
    assert sel.selected.tolist() == [False, True, True, True, False]
    assert sel.rank.tolist() == [3, 0, 1, 2, 4]  # tie 0.3/0.3 -> lower index first; 0.1/0.1 likewise
    assert sel.selected_indices.tolist() == [1, 2, 3]
    assert select(w, keep=0.4).keep_count == 2  # 0.4 * 5 = 2
    assert select(w, keep=0.5).keep_count == 3  # 2.5 rounds half up
    assert resolve_keep_count(10, keep=0.01) == 1  # at least one


def test_logits_set_the_order_of_underflowed_weights():
    logits = np.array([-800.0, -750.0, 0.0, -900.0])
    weights = np.exp(logits - logits.max())
    assert (weights[[0, 1, 3]] == 0).all()
    sel = select(weights, keep_count=2, logits=logits)
    assert sel.selected_indices.tolist() == [2, 1]


def test_train_weight_readings_by_hand():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    exp_sel = select(w, keep_count=3, reweight="exp")
    e = np.exp([0.5, 0.3, 0.15])
    np.testing.assert_allclose(exp_sel.train_weight[:3], 3 * e / e.sum())
    assert exp_sel.train_weight[3] == 0.0
    sm = select(w, keep_count=3, reweight="softmax")
    np.testing.assert_allclose(sm.train_weight[:3], 3 * np.array([0.5, 0.3, 0.15]) / 0.95)
    assert np.isclose(sm.train_weight[sm.selected].mean(), 1.0)
    tw = sm.train_weight[:3]
    assert np.isclose(sm.ess, tw.sum() ** 2 / (tw ** 2).sum())
    assert exp_sel.ess > sm.ess  # the exp reading is closer to uniform


def test_effective_sample_size_extremes():
    assert effective_sample_size(np.ones(7)) == pytest.approx(7.0)
    assert effective_sample_size(np.array([1.0, 0, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_count": 6}, "keep_count=6"),
    ({"keep_count": 0}, "keep_count=0"),
    ({"keep": 0.0}, "keep=0.0"),
    ({"keep": 1.5}, "keep=1.5"),
    ({"reweight": "bogus"}, "reweight"),
])
def test_bad_selection_arguments(kwargs, message):
    with pytest.raises(SotjaxInputError, match=message):
        select(np.full(5, 0.2), **kwargs)
