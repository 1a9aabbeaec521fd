"""Behaviour of Stage 1 on synthetic problems with known labels."""

import numpy as np
import pytest
from reference import auroc
from scipy.stats import spearmanr

import sotjax
from sotjax.synthetic import make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem(n=300, n_safe=30, n_harmful=120, dim=32, harmful_fraction=0.1, seed=11)


@pytest.fixture(scope="module")
def default_fit(problem):
    return sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace())


def test_harmful_samples_get_lower_weights(problem, default_fit):
    benign = ~problem.is_harmful
    assert auroc(default_fit.logits, benign) >= 0.99
    sel = sotjax.select(default_fit.weights, keep=0.8, logits=default_fit.logits)
    assert sel.selected[problem.is_harmful].mean() <= 0.01
    assert default_fit.converged, default_fit.message
    assert np.isclose(default_fit.weights.sum(), 1.0)
    assert default_fit.objective[-1] < default_fit.objective[0]  # it descends


@pytest.mark.parametrize("loss", ["regularized", "divergence"])
def test_other_losses_also_separate(problem, loss):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                     sotjax.SOTConfig.paper().replace(loss=loss, steps=30))
    assert auroc(res.logits, ~problem.is_harmful) >= 0.99


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def three_clusters(seed=5, dim=24):
    """Task cluster (near the safe anchor), harmful cluster, and an off-task cluster far from harm."""
    rng = np.random.default_rng(seed)
    task, harm = _unit(rng.normal(size=dim)), _unit(rng.normal(size=dim))
    off = _unit(-harm + 0.3 * rng.normal(size=dim))
    def around(c, k):
        return _unit(c + 0.25 * rng.normal(size=(k, dim))).astype(np.float32)
    corpus = np.concatenate([around(task, 120), around(off, 60), around(harm, 20)])
    group = np.array(["task"] * 120 + ["off"] * 60 + ["harm"] * 20)
    return corpus, around(task, 20), around(harm, 80), group


def test_pull_only_and_push_only_ablations():
    corpus, safe, harmful, group = three_clusters()
    def mean_logit(res, g):
        return res.logits[group == g].mean()
    pull = sotjax.fit(corpus, safe, None, sotjax.SOTConfig.paper().replace(lam=0.0))
    push = sotjax.fit(corpus, None, harmful, sotjax.SOTConfig.paper().replace(lam=1.0))
    both = sotjax.fit(corpus, safe, harmful, sotjax.SOTConfig.paper().replace(lam=0.5))
    # pull-only: task relevance; off-task and harmful both fall behind the task cluster, but it does
    # not tell harmful from off-task (the paper: pull-only is good, push-pull better)
    assert mean_logit(pull, "task") > max(mean_logit(pull, "off"), mean_logit(pull, "harm"))
    # push-only: rewards distance from the harmful reference, so off-task outliers beat task data
    # (the paper's push-only ablation is worse than plain SFT for this reason)
    assert mean_logit(push, "off") > mean_logit(push, "task") > mean_logit(push, "harm")
    # push-pull: task first, harmful last
    assert mean_logit(both, "task") > mean_logit(both, "off") > mean_logit(both, "harm")
    assert auroc(both.logits, group != "harm") >= 0.99 > auroc(pull.logits, group != "harm")


def test_permuting_the_corpus_permutes_the_weights(problem, default_fit):
    perm = np.random.default_rng(0).permutation(problem.corpus.shape[0])
    res = sotjax.fit(problem.corpus[perm], problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace())
    np.testing.assert_allclose(res.logits, default_fit.logits[perm], atol=1e-4)


def test_rescaling_embeddings_does_not_change_weights(problem, default_fit):
    rng = np.random.default_rng(1)
    def scale(x):
        return x * rng.uniform(0.1, 10.0, size=(x.shape[0], 1)).astype(np.float32)
    res = sotjax.fit(scale(problem.corpus), scale(problem.safe), scale(problem.harmful), sotjax.SOTConfig.paper())
    # float32: logits reach ~37, where one rounding is 4e-6; 20 steps of it stay within 1e-5 relative
    np.testing.assert_allclose(res.logits, default_fit.logits, rtol=1e-5, atol=1e-4)


def test_deterministic(problem, default_fit):
    again = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace())
    np.testing.assert_array_equal(again.logits, default_fit.logits)


@pytest.mark.parametrize("changes", [{"lr": 0.3}, {"lr": 3.0}, {"steps": 8, "weight_tol": 0.0},
                                     {"steps": 200}, {"momentum": 0.0, "steps": 200}])
def test_ranking_is_stable_to_step_count_and_learning_rate(problem, default_fit, changes):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace(**changes))
    assert spearmanr(res.logits, default_fit.logits)[0] >= 0.99
    assert auroc(res.logits, ~problem.is_harmful) >= 0.99


def test_entropy_term_gives_an_interior_optimum_reached_by_any_optimiser(problem, default_fit):
    kw = dict(entropy=0.03, steps=400)
    sgd = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace(**kw))
    adam = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                      sotjax.SOTConfig.paper().replace(optimizer="adam", lr=0.1, **kw))
    assert sgd.converged and adam.converged
    assert spearmanr(sgd.logits, adam.logits)[0] >= 0.99
    def ess(w):
        return 1.0 / np.sum(w ** 2)
    assert ess(sgd.weights) >= 5 * ess(default_fit.weights)  # far less collapsed than tau = 0
    assert auroc(sgd.logits, ~problem.is_harmful) >= 0.99


def test_reports_non_convergence_plainly(problem):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace(steps=2))
    assert not res.converged and res.n_steps == 2
    assert res.message.startswith("did not converge")


def test_float64_agrees_with_float32(problem, default_fit):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig.paper().replace(dtype="float64"))
    assert res.logits.dtype == np.float64
    assert spearmanr(res.logits, default_fit.logits)[0] >= 0.999


def test_missing_reference_is_an_input_error(problem):
    with pytest.raises(sotjax.SotjaxInputError, match="harmful"):
        sotjax.fit(problem.corpus, problem.safe, None, sotjax.SOTConfig.paper().replace(lam=0.5))


def test_relative_epsilon_is_epsilon_times_the_pooled_mean_cost(problem):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                     sotjax.SOTConfig.paper().replace(relative_epsilon=True, epsilon=0.2, steps=3))
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    pooled = np.concatenate([problem.safe, problem.harmful])
    mean_cost = np.mean(1.0 - unit(problem.corpus) @ unit(pooled).T)
    assert res.geometry["safe"].epsilon == pytest.approx(0.2 * mean_cost, rel=1e-4)
    assert res.geometry["harmful"].epsilon == res.geometry["safe"].epsilon


@pytest.mark.parametrize("loss", ["transport", "regularized", "divergence"])
def test_stays_finite_after_the_weights_collapse_and_underflow(problem, loss):
    """Long, aggressive runs drive most softmax weights to exactly 0 in float32 (kernel mode)."""
    config = sotjax.SOTConfig.paper().replace(loss=loss, lr=20.0, steps=60, objective_tol=0.0, weight_tol=0.0)
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, config)
    assert np.all(np.isfinite(res.logits)) and np.all(np.isfinite(res.objective))
    # the regime this guards: the solver's float32 weights softmax(logits) underflow to exactly 0
    # (the returned weights are the float64 softmax of the final logits, which does not underflow)
    z = res.logits.astype(np.float32) - np.float32(res.logits.max())
    assert (np.exp(z) == 0).mean() > 0.5
    assert auroc(res.logits, ~problem.is_harmful) >= 0.99


def test_hyperparameters_do_not_recompile_the_step():
    """lambda, tau, epsilon, lr, momentum are traced; keep/reweight/steps/tolerances never reach jit."""
    from sotjax.solver import _update as _step

    p = make_problem(n=90, n_safe=8, n_harmful=15, dim=6, seed=11)
    base = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(steps=4))
    compiled = _step._cache_size()
    variants = [dict(lam=0.3), dict(entropy=0.05), dict(epsilon=0.12), dict(lr=0.5), dict(momentum=0.5),
                dict(keep=0.5), dict(reweight="softmax"), dict(steps=6), dict(objective_tol=0.0),
                dict(weight_tol=1e-3), dict(relative_epsilon=True, epsilon=0.2)]
    paper = sotjax.SOTConfig.paper().replace(steps=4)
    results = [sotjax.fit(p.corpus, p.safe, p.harmful, paper.replace(**v)) for v in variants]
    assert _step._cache_size() == compiled
    # and the traced values are really used: each variant of the method changes the weights
    for v, res in zip(variants[:5], results[:5], strict=True):
        assert not np.allclose(res.logits, base.logits), v


def test_a_new_corpus_size_in_the_same_bucket_does_not_recompile():
    """n = 1000 and 1010 share the padded size 1024 (zero-mass rows): one compiled step; the padding
    does not change the answer (the weights of a permuted corpus are the permuted weights)."""
    from sotjax.plan import bucket_rows
    from sotjax.solver import _update as _step

    assert bucket_rows(1000) == bucket_rows(1010) == 1024 and bucket_rows(1025) > 1024
    p = make_problem(n=1010, n_safe=8, n_harmful=15, dim=6, seed=5)
    config = sotjax.SOTConfig.paper().replace(steps=3)
    first = sotjax.fit(p.corpus[:1000], p.safe, p.harmful, config)
    compiled = _step._cache_size()
    second = sotjax.fit(p.corpus, p.safe, p.harmful, config)
    assert _step._cache_size() == compiled
    assert first.weights.shape == (1000,) and second.weights.shape == (1010,)
    assert first.weights.sum() == pytest.approx(1.0, abs=1e-5) and second.weights.sum() == pytest.approx(1.0, abs=1e-5)
    perm = np.random.default_rng(0).permutation(1010)
    permuted = sotjax.fit(p.corpus[perm], p.safe, p.harmful, config)
    np.testing.assert_allclose(permuted.weights, second.weights[perm], rtol=1e-4, atol=1e-9)
