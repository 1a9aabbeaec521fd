"""The core API: the push-pull problem is a registered pytree (arrays and hyperparameters as leaves,
the loss kind and layout as aux data) and ``SOTSolver(...)(problem) -> SOTOutput``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sotjax
from sotjax.learn import build_problem, solver_from
from sotjax.problem import PushPullProblem
from sotjax.solver import SOTOutput, SOTSolver, StopRule, _update
from sotjax.synthetic import make_problem


@pytest.fixture(scope="module")
def small():
    p = make_problem(n=120, n_safe=8, n_harmful=20, dim=8, seed=7)
    config = sotjax.SOTConfig.paper().replace(steps=6)
    problem, _ = build_problem(jnp.asarray(p.corpus), jnp.asarray(p.safe), jnp.asarray(p.harmful), config)
    return p, config, problem


def test_problem_is_a_pytree_with_hyperparameters_as_leaves(small):
    _, _, problem = small
    leaves, treedef = jax.tree_util.tree_flatten(problem)
    assert isinstance(problem, PushPullProblem) and problem.loss == "transport" and problem.padded_rows == 120
    assert any(leaf is problem.lam for leaf in leaves) and any(leaf is problem.n for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.loss == problem.loss and float(rebuilt.lam) == 0.5 and float(rebuilt.n) == 120
    # another loss is another program: it is aux data, not a leaf
    assert jax.tree_util.tree_structure(problem.replace(loss="regularized")) != treedef


def test_solver_returns_an_output_whose_weights_are_the_softmax_of_its_logits(small):
    _, config, problem = small
    out = solver_from(config)(problem, jnp.zeros(120, jnp.float32), rows=120)
    assert isinstance(out, SOTOutput) and out.logits.shape == (120,) and 1 < out.n_steps <= 6
    z = out.logits - out.logits.max()
    np.testing.assert_allclose(out.weights, np.exp(z) / np.exp(z).sum(), rtol=1e-12)
    assert out.converged == (out.stopped and out.sinkhorn_converged.all() and out.adjoint_converged.all())


def test_another_lambda_on_the_same_problem_reuses_the_program_and_matches_a_fresh_fit(small):
    p, config, problem = small
    solver = SOTSolver(stop_rule=StopRule(max_steps=4, objective_tol=0.0, weight_tol=0.0))
    solver(problem, jnp.zeros(120, jnp.float32))
    compiled = _update._cache_size()
    out = solver(problem.replace(lam=jnp.asarray(0.3, jnp.float32)), jnp.zeros(120, jnp.float32))
    assert _update._cache_size() == compiled
    fresh = sotjax.fit(p.corpus, p.safe, p.harmful, config.replace(lam=0.3, steps=4, objective_tol=0.0,
                                                                     weight_tol=0.0))
    np.testing.assert_allclose(out.logits, fresh.logits, rtol=1e-5, atol=1e-6)
