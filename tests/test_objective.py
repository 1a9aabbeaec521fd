"""Objective value and logit gradient against the independent float64 reference (tests/reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from sotjax import SOTConfig
from sotjax import objective as obj
from sotjax.learn import build_problem, initial_warm_start, settings_from

TIGHT = dict(sinkhorn_threshold=1e-13, sinkhorn_max_iterations=50_000, adjoint_tol=1e-13,
             adjoint_max_iterations=5_000, dtype="float64")


def small_problem(seed=0, n=9, ns=4, nh=6, d=5):
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(n, d))
    safe = rng.normal(size=(ns, d)) + 0.5 * corpus[:1]
    harmful = rng.normal(size=(nh, d)) - 0.5 * corpus[:1]
    theta = 0.3 * rng.normal(size=n)
    return corpus, safe, harmful, theta


def sotjax_eval(theta, corpus, safe, harmful, config):
    with jax.enable_x64(True):
        def as_dev(x):
            return None if x is None else jnp.asarray(x)
        problem, _ = build_problem(as_dev(corpus), as_dev(safe), as_dev(harmful), config)
        warm = initial_warm_start(problem, corpus.shape[0], jnp.float64)
        ev = obj.evaluate(jnp.asarray(theta), problem, warm, lam=config.lam, entropy=config.entropy,
                          loss=config.loss, settings=settings_from(config))
        return jax.device_get(ev)


@pytest.mark.parametrize("loss", ["transport", "regularized", "divergence"])
@pytest.mark.parametrize("lse_mode", ["log", "kernel"])
def test_objective_and_gradient_match_reference(loss, lse_mode):
    corpus, safe, harmful, theta = small_problem()
    config = SOTConfig(loss=loss, lse_mode=lse_mode, **TIGHT)
    ev = sotjax_eval(theta, corpus, safe, harmful, config)
    value, pull, push = ref.objective(theta, corpus, safe, harmful, loss=loss)
    assert abs(float(ev.objective) - value) <= 1e-8 * max(1.0, abs(value))
    assert abs(float(ev.pull.value) - pull) <= 1e-8
    assert abs(float(ev.push.value) - push) <= 1e-8
    fd = ref.finite_difference_grad(lambda t: ref.objective(t, corpus, safe, harmful, loss=loss)[0], theta)
    grad = np.asarray(ev.grad_logits)
    assert np.linalg.norm(grad - fd) <= 1e-4 * np.linalg.norm(fd)


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.3])
def test_one_sided_and_entropy_terms_match_reference(lam):
    corpus, safe, harmful, theta = small_problem(seed=1)
    config = SOTConfig(lam=lam, entropy=0.05, **TIGHT)
    ev = sotjax_eval(theta, corpus, safe, harmful, config)
    def fun(t):
        return ref.objective(t, corpus, safe, harmful, lam=lam, tau=0.05)[0]
    assert abs(float(ev.objective) - fun(theta)) <= 1e-8
    fd = ref.finite_difference_grad(fun, theta)
    assert np.linalg.norm(np.asarray(ev.grad_logits) - fd) <= 1e-4 * np.linalg.norm(fd)


def test_regularized_gradient_is_centred_dual_potential():
    """Envelope theorem: d OT_eps / d a = f~ (up to a constant) -- checked against POT's potentials."""
    ot = pytest.importorskip("ot")
    corpus, _, harmful, _ = small_problem(seed=2)
    a = np.full(corpus.shape[0], 1.0 / corpus.shape[0])
    b = np.full(harmful.shape[0], 1.0 / harmful.shape[0])
    C = ref.cosine_cost(corpus, harmful)
    plan_pot = ot.sinkhorn(a, b, C, 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14)
    _, _, plan_ref = ref.sinkhorn_log(C, a, b, 0.1)
    np.testing.assert_allclose(plan_pot, plan_ref, atol=1e-12)
    config = SOTConfig(lam=1.0, loss="regularized", **TIGHT)
    ev = sotjax_eval(np.zeros_like(a), corpus, None, harmful, config)
    # J = -OT(w, b); grad_theta = w * (g - <w, g>) with g = -f~  =>  f~ - mean(f~) = -n * grad_theta
    f_ref, _, _ = ref.sinkhorn_log(C, a, b, 0.1)
    got = -a.size * np.asarray(ev.grad_logits)
    np.testing.assert_allclose(got, f_ref - f_ref.mean(), atol=1e-9)
    # value: POT's sinkhorn2 returns <T, C> (no entropy term) -- the "transport" loss
    assert abs(float(ot.sinkhorn2(a, b, C, 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14))
               - ref.transport_cost(C, a, b, 0.1)) < 1e-10


def test_float32_gradient_close_to_float64_reference():
    corpus, safe, harmful, theta = small_problem(seed=3, n=40, ns=10, nh=30, d=8)
    config = SOTConfig(sinkhorn_threshold=1e-6, adjoint_tol=1e-6)
    problem, _ = build_problem(jnp.asarray(corpus, jnp.float32), jnp.asarray(safe, jnp.float32),
                               jnp.asarray(harmful, jnp.float32), config)
    ev = obj.evaluate(jnp.asarray(theta, jnp.float32), problem, initial_warm_start(problem, 40, jnp.float32),
                      lam=0.5, entropy=0.0, loss="transport", settings=settings_from(config))
    fd = ref.finite_difference_grad(lambda t: ref.objective(t, corpus, safe, harmful)[0], theta)
    assert np.linalg.norm(np.asarray(ev.grad_logits) - fd) <= 1e-3 * np.linalg.norm(fd)
