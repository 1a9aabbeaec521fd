"""Hostile numerics: embeddings of any finite scale, tiny epsilon, and honest non-convergence reports.

References are independent of sotjax: float64 NumPy (``x / np.linalg.norm(x)``), a log-domain Sinkhorn
written here from the definitions of tests/reference.py with epsilon-scaling (plain Sinkhorn needs
~1e5 iterations at epsilon = 1e-4), and POT's exact LP (``ot.emd``), which the entropic transport cost
and its gradient approach exponentially fast as epsilon -> 0 on a non-degenerate problem.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
import reference as ref
from scipy.special import logsumexp

import sotjax
from sotjax import objective as obj
from sotjax import transport
from sotjax.cli import main
from sotjax.geometry import normalize_rows, unit_rows
from sotjax.learn import build_problem, initial_warm_start, settings_from
from sotjax.select import select
from sotjax.synthetic import make_problem

FAST = dict(steps=10, weight_tol=0.0)  # a fixed number of steps: runs compare step for step


@pytest.fixture(scope="module")
def problem():
    return make_problem(n=60, n_safe=10, n_harmful=20, dim=8, seed=3)


def _scaled(x, s, dtype):
    return (np.asarray(x, np.float64) * s).astype(dtype)


# ------------------------------------------------------------------------------------------- scale
F32_SCALES = [1e-40, 1e-30, 1e-20, 1e20, 1e30, 3e38]  # 1e-40 is subnormal in float32; rows have max |x| <= 1
F64_SCALES = [1e-300, 1e-200, 1e200, 1e300]


@pytest.mark.parametrize(("dtype", "s"), [(np.float32, s) for s in F32_SCALES] + [(np.float64, s) for s in F64_SCALES])
def test_unit_rows_match_float64_numpy_on_the_unscaled_rows(problem, dtype, s):
    x = problem.corpus / np.abs(problem.corpus).max(axis=1, keepdims=True)  # max |x| = 1: s * x stays finite
    want = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    xs = _scaled(x, s, dtype)
    assert np.all(np.isfinite(xs)) and np.all(np.any(xs != 0, axis=1))
    got32 = unit_rows(xs, np.float32)
    got64 = unit_rows(xs, np.float64)
    # the scaled input itself is rounded to dtype (subnormal float32 keeps ~16 bits at 1e-40)
    input_rounding = 3e-5 if s < 1e-38 and dtype == np.float32 else 3 * np.finfo(dtype).eps
    np.testing.assert_allclose(got32, want, rtol=0, atol=input_rounding + 2 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(got64, want, rtol=0, atol=input_rounding + 4 * np.finfo(np.float64).eps)
    # a float64 input beyond the float32 range still gives float32 unit vectors
    assert got32.dtype == np.float32 and np.all(np.isfinite(got32))


@pytest.mark.parametrize("s", [1e-30, 1e-20, 1e20, 1e30, 3e38])
def test_device_normalize_rows_is_scale_free_in_float32(problem, s):
    x = problem.corpus / np.abs(problem.corpus).max(axis=1, keepdims=True)
    want = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    got = np.asarray(normalize_rows(jnp.asarray(_scaled(x, s, np.float32))))
    np.testing.assert_allclose(got, want, rtol=0, atol=6 * np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def base32(problem):
    return sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig(**FAST))


def _fit_scaled(problem, s, dtype, config):
    p = problem
    return sotjax.fit(_scaled(p.corpus, s, dtype), _scaled(p.safe, s, dtype), _scaled(p.harmful, s, dtype), config)


@pytest.mark.parametrize("k", [-100, -66, 66, 100, 127])
def test_power_of_two_scales_give_identical_weights(problem, base32, k):
    """x * 2^k is exact in float32, so the weights must be bit-identical (before the fix, 2^66 and up
    gave exactly uniform weights, "converged after 2 steps", and 2^-100 was refused as a zero vector)."""
    res = _fit_scaled(problem, 2.0 ** k, np.float32, sotjax.SOTConfig(**FAST))
    np.testing.assert_array_equal(res.weights, base32.weights)


@pytest.mark.parametrize("s", [1e-40, 1e-30, 1e-20, 1e20, 1e30, 3e38])
def test_decimal_scales_give_the_same_ranking(problem, base32, s):
    """x * 1e30 is x up to one float32 rounding per entry: same Top-K ranking, logits within 1e-3."""
    res = _fit_scaled(problem, s, np.float32, sotjax.SOTConfig(**FAST))
    assert np.ptp(res.weights) > 0.1  # not the uniform weights of an overflowed norm
    np.testing.assert_array_equal(select(res.weights, 0.8, logits=res.logits).rank,
                                  select(base32.weights, 0.8, logits=base32.logits).rank)
    np.testing.assert_allclose(res.logits, base32.logits, atol=1e-3)


def test_float64_scales(problem, base32):
    config = sotjax.SOTConfig(dtype="float64", **FAST)
    base = sotjax.fit(problem.corpus, problem.safe, problem.harmful, config)
    for s in (1e-200, 1e200):
        res = _fit_scaled(problem, s, np.float64, config)
        np.testing.assert_allclose(res.weights, base.weights, rtol=1e-6)
    # float64 inputs of size 1e200 in a float32 fit (the cast alone would give inf): the float32 run's ranking
    res32 = _fit_scaled(problem, 1e200, np.float64, sotjax.SOTConfig(**FAST))
    np.testing.assert_array_equal(select(res32.weights, 0.8, logits=res32.logits).rank,
                                  select(base32.weights, 0.8, logits=base32.logits).rank)


def test_only_an_all_zero_row_is_the_zero_vector(problem):
    corpus = problem.corpus.copy()
    corpus[3] = 0.0
    with pytest.raises(sotjax.SotjaxInputError, match="row 3 is the zero vector"):
        sotjax.fit(corpus, problem.safe, problem.harmful, sotjax.SOTConfig(**FAST))
    corpus[3] = 0.0
    corpus[3, 5] = np.float32(1e-45)  # the smallest subnormal: a direction, not the zero vector
    res = sotjax.fit(corpus, problem.safe, problem.harmful, sotjax.SOTConfig(**FAST))
    assert np.all(np.isfinite(res.weights))


def test_cli_ranking_of_inputs_scaled_by_1e30(problem, tmp_path, capsys):
    # a fixed step count: the stopping rule watches ||dw||_1, and near a collapse a one-ulp input change can
    # move the stop by a step while tail logits (weights ~1e-10) still move; the runs compare step for step
    fixed = ["--steps", "20", "--weight-tol", "0"]
    for name in ("corpus", "safe", "harmful"):
        x = getattr(problem, name)
        np.save(tmp_path / f"{name}.npy", x)
        np.save(tmp_path / f"{name}_big.npy", _scaled(x, 1e30, np.float32))
    code = main(["weigh", "--no-progress", *fixed, "--corpus", str(tmp_path / "corpus.npy"), "--safe",
                 str(tmp_path / "safe.npy"), "--harmful", str(tmp_path / "harmful.npy"), "--out", str(tmp_path / "a")])
    assert code == 0, capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "sotjax.cli", "weigh", "--no-progress", *fixed,
                           "--corpus", str(tmp_path / "corpus_big.npy"), "--safe", str(tmp_path / "safe_big.npy"),
                           "--harmful", str(tmp_path / "harmful_big.npy"), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    a = pq.read_table(tmp_path / "a" / "weights.parquet").to_pandas()
    b = pq.read_table(tmp_path / "b" / "weights.parquet").to_pandas()
    assert b["rank"].tolist() == a["rank"].tolist()
    assert b["selected"].tolist() == a["selected"].tolist()
    assert b["weight"].max() > 2.0 / len(b)  # not uniform


# ------------------------------------------------------------------------------------- tiny epsilon
def _sinkhorn_annealed(C, a, b, eps, tol):
    """Log-domain Sinkhorn of tests/reference.py (same updates, centred potentials), run through
    epsilon = max C, max C / 2, ... down to eps, each stage from the previous one's potentials."""
    la, lb = np.log(a), np.log(b)
    f, g = np.zeros(C.shape[0]), np.zeros(C.shape[1])
    e = max(eps, float(C.max()))
    while True:
        for _ in range(200_000):
            f = -e * logsumexp((g[None, :] - C) / e + lb[None, :], axis=1)
            g = -e * logsumexp((f[:, None] - C) / e + la[:, None], axis=0)
            T = np.exp((f[:, None] + g[None, :] - C) / e + la[:, None] + lb[None, :])
            if np.abs(T.sum(1) - a).sum() < (tol if e == eps else 1e-6):
                break
        else:
            raise AssertionError(f"the reference did not converge at epsilon={e}")
        if e == eps:
            return f, g, T
        e = max(eps, e / 2)


def _tiny_problem():
    rng = np.random.default_rng(7)
    corpus = rng.normal(size=(7, 4))
    safe = rng.normal(size=(3, 4)) + 0.5 * corpus[:1]
    harmful = rng.normal(size=(4, 4)) - 0.5 * corpus[:1]
    return corpus, safe, harmful, 0.3 * rng.normal(size=7)  # generic weights: a non-degenerate plan


def _reference_objective(theta, corpus, safe, harmful, eps, loss):
    w = ref.softmax(theta)
    terms = []
    for r in (safe, harmful):
        C, b = ref.cosine_cost(corpus, r), np.full(len(r), 1.0 / len(r))
        f, g, T = _sinkhorn_annealed(C, w, b, eps, tol=1e-11)
        terms.append(float(np.sum(T * C)) if loss == "transport" else float(f @ w + g @ b))
    return 0.5 * terms[0] - 0.5 * terms[1]


@functools.partial(jax.jit, static_argnames=("config",))
def _evaluate(theta, problem, warm, config):
    return obj.evaluate(theta, problem, warm, lam=config.lam, entropy=config.entropy, loss=config.loss,
                        settings=settings_from(config))


def _sotjax_eval(theta, corpus, safe, harmful, config):
    with jax.enable_x64(True):
        as64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        problem, _ = build_problem(as64(corpus), as64(safe), as64(harmful), config)
        warm = initial_warm_start(problem, corpus.shape[0], jnp.float64)
        return jax.device_get(_evaluate(as64(theta), problem, warm, config))


@pytest.mark.parametrize("loss", ["transport", "regularized"])
def test_epsilon_1e4_matches_the_reference(loss):
    """Before: the transport loss was NaN at epsilon <= 1e-4 (float64 too); Sinkhorn needed 10^4-10^5
    iterations. Value and directional derivatives against the annealed reference's finite differences."""
    corpus, safe, harmful, theta = _tiny_problem()
    config = sotjax.SOTConfig(loss=loss, epsilon=1e-4, lse_mode="log", dtype="float64", sinkhorn_threshold=1e-10)
    ev = _sotjax_eval(theta, corpus, safe, harmful, config)
    assert bool(ev.pull.sinkhorn_converged) and bool(ev.push.sinkhorn_converged)
    fun = lambda t: _reference_objective(t, corpus, safe, harmful, 1e-4, loss)  # noqa: E731
    assert abs(float(ev.objective) - fun(theta)) <= 1e-8
    grad = np.asarray(ev.grad_logits)
    h = 1e-5
    for v in np.random.default_rng(0).normal(size=(1, theta.size)):
        fd = (fun(theta + h * v) - fun(theta - h * v)) / (2 * h)
        assert abs(grad @ v - fd) <= 1e-4 * np.linalg.norm(grad) * np.linalg.norm(v), (grad @ v, fd)


@pytest.mark.parametrize("loss", ["transport", "regularized"])
def test_epsilon_1e6_matches_the_exact_lp(loss):
    """At epsilon = 1e-6 <T, C> and OT_eps equal the LP value (to ~1e-10 / eps-scale), and both gradients
    the LP's dual potential (unique here: a spanning-tree plan)."""
    ot = pytest.importorskip("ot")
    corpus, safe, harmful, theta = _tiny_problem()
    config = sotjax.SOTConfig(loss=loss, epsilon=1e-6, lse_mode="log", dtype="float64", sinkhorn_threshold=1e-9)
    ev = _sotjax_eval(theta, corpus, safe, harmful, config)
    assert bool(ev.pull.sinkhorn_converged) and bool(ev.push.sinkhorn_converged)
    w = ref.softmax(theta)
    values, duals = [], []
    for r in (safe, harmful):
        _, log = ot.emd(w, np.full(len(r), 1.0 / len(r)), ref.cosine_cost(corpus, r), log=True)
        values.append(log["cost"])
        duals.append(log["u"])
    assert abs(float(ev.objective) - (0.5 * values[0] - 0.5 * values[1])) <= 1e-5
    g = 0.5 * duals[0] - 0.5 * duals[1]
    want = w * (g - w @ g)
    np.testing.assert_allclose(np.asarray(ev.grad_logits), want, atol=1e-5 * np.abs(want).max())


def test_degenerate_first_step_at_tiny_epsilon_is_finite(problem):
    """Uniform weights with n = 60, m = 20: the LP plan is a forest, the Schur complement singular."""
    ot = pytest.importorskip("ot")
    config = sotjax.SOTConfig(epsilon=1e-6, lse_mode="log", dtype="float64")
    ev = _sotjax_eval(np.zeros(60), problem.corpus, problem.safe, problem.harmful, config)
    assert np.all(np.isfinite(np.asarray(ev.grad_logits)))
    a = np.full(60, 1.0 / 60)
    lp = [ot.emd2(a, np.full(len(r), 1.0 / len(r)), ref.cosine_cost(problem.corpus, r))
          for r in (problem.safe, problem.harmful)]
    assert abs(float(ev.objective) - (0.5 * lp[0] - 0.5 * lp[1])) <= 1e-4


def test_float64_fit_at_epsilon_1e6_converges_and_separates(problem):
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig(epsilon=1e-6, dtype="float64"))
    assert res.sinkhorn_converged.all() and res.converged, res.message
    assert ref.auroc(res.logits, ~problem.is_harmful) >= 0.99


def test_forced_kernel_mode_at_tiny_epsilon_names_the_log_mode(problem):
    with pytest.raises(FloatingPointError, match=r"leaves the float64 range .* use --lse-mode log \(or auto\)"):
        sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                   sotjax.SOTConfig(epsilon=1e-6, dtype="float64", lse_mode="kernel", steps=3))


def test_float32_at_epsilon_1e4_is_reported_not_converged(problem):
    """float32 resolves the exponent only to ~2e-3 here: early steps miss, later (collapsed) ones meet it."""
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful, sotjax.SOTConfig(epsilon=1e-4, steps=30))
    assert not res.converged and not res.sinkhorn_converged.all()
    assert res.message.startswith("did not converge")
    assert "missed the threshold 0.0001" in res.message and "use --dtype float64 or a larger --epsilon" in res.message
    # the advice is true: float64 meets the threshold in every step
    res64 = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                       sotjax.SOTConfig(epsilon=1e-4, steps=30, dtype="float64"))
    assert res64.sinkhorn_converged.all()


def test_float32_at_epsilon_1e6_fails_in_one_line_with_advice(problem, tmp_path):
    for name in ("corpus", "safe", "harmful"):
        np.save(tmp_path / f"{name}.npy", getattr(problem, name))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sotjax.cli", "weigh", "--no-progress", "--epsilon", "1e-6",
                           "--steps", "5", "--corpus", str(tmp_path / "corpus.npy"),
                           "--safe", str(tmp_path / "safe.npy"), "--harmful", str(tmp_path / "harmful.npy"),
                           "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sotjax weigh: error: no step's Sinkhorn solves reached the threshold 0.0001")
    assert "use --dtype float64 or a larger --epsilon" in lines[0]
    assert "try --dtype float64" not in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------- non-convergence, reported
def test_stopping_rule_met_with_unconverged_solves_is_not_converged(problem):
    """Before: regularized at epsilon = 1e-6 said "converged after 26 steps" with every solve at its cap."""
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                     sotjax.SOTConfig(loss="regularized", epsilon=1e-4, steps=40))
    assert not res.sinkhorn_converged.all()
    assert not res.converged
    assert res.message.startswith("did not converge")
    assert "step(s) had a Sinkhorn solve that missed the threshold" in res.message


def test_adjoint_cap_is_reported(problem, monkeypatch):
    monkeypatch.setattr(transport, "DIRECT_ADJOINT_MAX_FLOPS", 0)  # conjugate gradients on a small problem
    res = sotjax.fit(problem.corpus, problem.safe, problem.harmful,
                     sotjax.SOTConfig(adjoint_max_iterations=1, adjoint_tol=1e-12, steps=3))
    assert not res.adjoint_converged.all() and not res.converged
    assert "adjoint solve that hit its cap of 1 iterations" in res.message


def test_cli_warns_when_solves_missed(problem, tmp_path, capsys):
    for name in ("corpus", "safe", "harmful"):
        np.save(tmp_path / f"{name}.npy", getattr(problem, name))
    out = tmp_path / "run"
    code = main(["weigh", "--no-progress", "--epsilon", "1e-4", "--steps", "30",
                 "--corpus", str(tmp_path / "corpus.npy"), "--safe", str(tmp_path / "safe.npy"),
                 "--harmful", str(tmp_path / "harmful.npy"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sotjax weigh: warning: did not converge" in err and "missed the threshold" in err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["converged"] is False and stats["sinkhorn_all_converged"] is False
