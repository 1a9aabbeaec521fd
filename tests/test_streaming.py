"""Streamed Sinkhorn and plan products against the independent float64 NumPy reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import reference as ref

from sotjax import streaming


def problem(n=37, m=11, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    a = rng.uniform(0.2, 1.0, n)
    a /= a.sum()
    return x, y, a, np.full(m, 1.0 / m)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("block_rows", [1, 5, 8, 37, 100])
@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_sinkhorn_potentials_and_value_match_reference(block_rows, eps):
    x, y, a, b = problem()
    geom = streaming.streamed_cosine(ref.unit(x), ref.unit(y), block_rows)
    out = streaming.sinkhorn(geom, a, b, eps, np.zeros(len(b)), threshold=1e-12, max_iterations=20000)
    assert bool(out.converged)
    C = ref.cosine_cost(x, y)
    f, g, T = ref.sinkhorn_log(C, a, b, eps)
    shift = np.mean(np.asarray(out.g) - g)  # potentials are defined up to (f + t, g - t)
    np.testing.assert_allclose(np.asarray(out.f), f - shift, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.g), g + shift, atol=1e-9)
    assert float(out.reg_ot_cost(a, b)) == pytest.approx(ref.regularized_ot(C, a, b, eps), abs=1e-10)
    plan = streaming.StreamedPlan.from_solve(geom, a, b, eps, out)
    sums = plan.sums()
    np.testing.assert_allclose(sums.row_mass, T.sum(1), atol=1e-11)
    np.testing.assert_allclose(sums.col_mass, T.sum(0), atol=1e-11)
    np.testing.assert_allclose(sums.row_cost, (T * C).sum(1), atol=1e-11)
    np.testing.assert_allclose(sums.col_cost, (T * C).sum(0), atol=1e-11)
    rng = np.random.default_rng(1)
    v, z = rng.normal(size=len(b)), rng.normal(size=len(a))
    np.testing.assert_allclose(geom.unblock(plan.matvec(v)), T @ v, atol=1e-11)  # row vectors are blocked
    np.testing.assert_allclose(plan.rmatvec(geom.blocks(z)), z @ T, atol=1e-11)
    r, c = T.sum(1), T.sum(0)
    np.testing.assert_allclose(plan.schur_matvec(v, geom.blocks(r, fill=1.0), c), c * v - T.T @ ((T @ v) / r),
                               atol=1e-10)


@pytest.mark.parametrize("block_rows", [4, 16])
def test_transport_gradient_matches_finite_differences(block_rows):
    x, y, a, b = problem(n=14, m=6, d=4, seed=3)
    eps = 0.1
    C = ref.cosine_cost(x, y)
    geom = streaming.streamed_cosine(ref.unit(x), ref.unit(y), block_rows)
    out = streaming.sinkhorn(geom, a, b, eps, np.zeros(len(b)), threshold=1e-13, max_iterations=20000)
    plan = streaming.StreamedPlan.from_solve(geom, a, b, eps, out)
    value, grad, _ = streaming.transport_value_and_grad(plan, tol=1e-12, max_iterations=500)
    assert float(value) == pytest.approx(ref.transport_cost(C, a, b, eps), abs=1e-11)
    # the gradient in a (on the simplex's tangent space: compare directional derivatives)
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = rng.normal(size=a.size)
        direction -= direction.mean()
        h = 1e-6
        up = ref.transport_cost(C, a + h * direction, b, eps)
        down = ref.transport_cost(C, a - h * direction, b, eps)
        fd = (up - down) / (2 * h)
        assert float(np.dot(np.asarray(grad), direction)) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_padding_rows_carry_no_mass():
    x, y, a, b = problem(n=10, m=7, d=3, seed=5)
    geom = streaming.streamed_cosine(ref.unit(x), ref.unit(y), 4)  # 12 rows, 2 of padding
    assert geom.x_blocks.shape == (3, 4, 3)
    out = streaming.sinkhorn(geom, a, b, 0.05, np.zeros(7), threshold=1e-12, max_iterations=20000)
    assert out.f.shape == (10,) and np.all(np.isfinite(out.f))
    sums = streaming.StreamedPlan.from_solve(geom, a, b, 0.05, out).sums()
    np.testing.assert_allclose(sums.row_mass, a, atol=1e-10)
    np.testing.assert_allclose(sums.col_mass, b, atol=1e-10)


def test_float32_reaches_the_default_threshold():
    x, y, a, b = problem(n=300, m=40, d=16, seed=7)
    with jax.enable_x64(False):
        geom = streaming.streamed_cosine(ref.unit(x).astype(np.float32), ref.unit(y).astype(np.float32), 64)
        out = streaming.sinkhorn(geom, a.astype(np.float32), b.astype(np.float32), np.float32(0.1),
                                 np.zeros(40, np.float32), threshold=1e-4, max_iterations=2000)
    assert bool(out.converged) and int(out.n_iters) < 200
    f, _, _ = ref.sinkhorn_log(ref.cosine_cost(x, y), a, b, 0.1)
    got = np.asarray(out.f, np.float64)
    np.testing.assert_allclose(got - got.mean(), f - f.mean(), atol=1e-3)


def _stream_budget(n: int, refs: tuple[int, ...], dim: int, block_rows: int) -> int:
    """A memory budget for which the planner streams with ``block_rows``-row blocks."""
    from sotjax.plan import estimate_bytes

    return estimate_bytes("stream", n, refs, dim, block_rows=block_rows)


@pytest.mark.parametrize("loss", ["transport", "regularized"])
def test_streamed_fit_matches_the_dense_fit(loss):
    import sotjax
    from sotjax.synthetic import make_problem

    p = make_problem(n=203, n_safe=12, n_harmful=40, dim=16, seed=2)  # 203 rows: the last block is partial
    with jax.enable_x64(False):
        tight = dict(loss=loss, sinkhorn_threshold=1e-6, steps=15)
        dense = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(plan="dense", **tight))
        stream = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(
            plan="stream", memory_budget=_stream_budget(203, (12, 40), 16, 64), **tight))
    assert dense.plan.kind == "dense" and stream.plan.kind == "stream"
    # 4 balanced blocks of <= 64 rows; the last one holds real rows and zero-mass padding
    assert stream.plan.block_rows <= 64 and stream.plan.padded_rows == 4 * stream.plan.block_rows > 203
    assert stream.n_steps == dense.n_steps
    np.testing.assert_allclose(stream.weights, dense.weights, rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(stream.objective, dense.objective, rtol=1e-4, atol=1e-6)
    assert np.array_equal(np.argsort(-stream.logits)[:150], np.argsort(-dense.logits)[:150])


def test_auto_streams_when_dense_does_not_fit_and_divergence_is_refused():
    import sotjax
    from sotjax.errors import SotjaxInputError
    from sotjax.synthetic import make_problem

    p = make_problem(n=100, n_safe=8, n_harmful=20, dim=8, seed=4)
    with jax.enable_x64(False):
        budget = _stream_budget(100, (8, 20), 8, 32)
        res = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(memory_budget=budget, steps=3))
        assert res.plan.kind == "stream" and "dense needs" in res.plan.reason
        with pytest.raises(SotjaxInputError, match="divergence loss has no streamed plan"):
            sotjax.fit(p.corpus, p.safe, p.harmful,
                       sotjax.SOTConfig.paper().replace(memory_budget=_stream_budget(100, (8, 20), 8, 32),
                                                        loss="divergence"))
