"""Judge-free measures of the Stage 2 experiment: refusal-prefix matcher, centroid signal, agreement, utility NLL."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sotjax.errors import SotjaxInputError
from sotjax.finetune.causal_lm import random_causal_lm
from sotjax.finetune.data import Encoded, make_batch
from sotjax.finetune.loss import response_nll as batch_response_nll
from sotjax.finetune.safety import (
    REFUSAL_PREFIXES,
    CentroidClassifier,
    agreement,
    is_refusal,
    mean_spread,
    refusal_by_prefix,
    response_nll,
)
from sotjax.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def test_prefix_list_is_the_advbench_list():
    assert REFUSAL_PREFIXES[:4] == ("I'm sorry", "Sorry", "I am sorry", "I apologize")
    assert "I can't assist" in REFUSAL_PREFIXES and "As an AI" in REFUSAL_PREFIXES
    assert len(REFUSAL_PREFIXES) == len(set(REFUSAL_PREFIXES)) == 29


@pytest.mark.parametrize(("text", "expected"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, I won\u2019t.", True),  # typographic apostrophe
    ("Sure, I can't wait to tell you about bread baking.", True),  # substring semantics (documented)
    ("Here is a recipe for bread: flour, water, salt.", False),
    ("", False),
    ("   ", False),
    ("i'm sorry", False),  # case-sensitive, as the reference list
])
def test_is_refusal(text, expected):
    assert is_refusal(text) is expected


def test_refusal_by_prefix_vector_and_custom_phrases():
    out = refusal_by_prefix(["I cannot do that", "Of course!", "Nope"], phrases=None)
    assert out.dtype == bool and out.tolist() == [True, False, False]
    assert refusal_by_prefix(["Nope"], phrases=["Nope"]).tolist() == [True]
    with pytest.raises(SotjaxInputError):
        refusal_by_prefix("I cannot")


def test_centroid_classifier_by_hand():
    refusals = np.array([[1.0, 0.1, 0.0], [2.0, -0.1, 0.0]])  # scale does not matter (unit-normalised)
    harmful = np.array([[0.0, 1.0, 0.0], [0.1, 3.0, 0.0]])
    clf = CentroidClassifier.fit(refusals, harmful)
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    margin = clf.margin(x)
    assert margin[0] > 0 and margin[1] < 0 and margin[2] == pytest.approx(0.0, abs=1e-12)
    assert clf.predict(x).tolist() == [True, False, False]
    np.testing.assert_allclose(np.linalg.norm(clf.refusal), 1.0)
    with pytest.raises(SotjaxInputError):
        clf.margin(np.ones((2, 4)))
    with pytest.raises(SotjaxInputError):
        CentroidClassifier.fit(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(SotjaxInputError):
        CentroidClassifier.fit(np.full((1, 3), np.nan), np.ones((2, 3)))


def test_agreement_and_kappa_by_hand():
    a = [True, True, False, False, True, False]
    b = [True, False, False, False, True, True]
    out = agreement(a, b)
    po = 4 / 6
    pe = 0.5 * 0.5 + 0.5 * 0.5
    assert out["n"] == 6 and out["agreement"] == pytest.approx(po)
    assert out["kappa"] == pytest.approx((po - pe) / (1 - pe))
    assert agreement([True, True], [True, True])["kappa"] == 1.0  # constant and equal
    assert agreement([True, False], [False, True])["kappa"] == pytest.approx(-1.0)
    assert math.isnan(agreement([], [])["kappa"])
    with pytest.raises(SotjaxInputError):
        agreement([True], [True, False])


def test_mean_spread():
    s = mean_spread([0.2, 0.6, 0.4])
    assert s["mean"] == pytest.approx(0.4) and s["spread"] == pytest.approx(0.2) and len(s["values"]) == 3
    assert math.isnan(mean_spread([])["mean"])


def test_response_nll_matches_the_loss_module_row_by_row():
    rng = np.random.default_rng(0)
    lengths, n_prompt = [5, 9, 7, 4, 12], [2, 3, 6, 1, 4]
    enc = Encoded(tokens=[rng.integers(0, TINY.vocab_size, n).astype(np.int32) for n in lengths],
                  n_prompt=np.asarray(n_prompt), weights=np.full(5, 3.0, np.float32), n_truncated=0)
    model = random_causal_lm(TINY, seed=2)
    got = response_nll(model, enc, batch_size=2)
    per_row = []
    for r in range(5):  # one row at a time, unpadded: the reference
        b = make_batch(enc, np.array([r]), 1, 64)
        nll, _ = batch_response_nll(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])),
                                    jnp.asarray(b["input_ids"]), jnp.asarray(b["loss_mask"]))
        per_row.append(float(nll[0]))
    assert got == pytest.approx(float(np.mean(per_row)), rel=1e-5)  # weights ignored, padding rows excluded
    with pytest.raises(SotjaxInputError):
        response_nll(model, Encoded(tokens=[], n_prompt=np.zeros(0), weights=np.zeros(0), n_truncated=0))
