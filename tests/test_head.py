"""The weight head (sotjax.head, `sotjax weigh --head`, `sotjax score`): gradients, equivalence with the
free logits, scoring through the CLI, refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import one_line_error
from cli_helpers import sotjax as run_cli
from flax import nnx

import sotjax
from sotjax import head as H
from sotjax import learn
from sotjax.cli import main
from sotjax.problem import initial_warm_start
from sotjax.rundir import read_run
from sotjax.synthetic import make_problem


def _tiny_problem(config, n=7, d=4, seed=0):
    p = make_problem(n=n, n_safe=4, n_harmful=5, dim=d, seed=seed, dtype=np.float64)
    unit = learn.unit_rows
    corpus = jnp.asarray(unit(p.corpus, np.float64))
    problem, _ = learn.build_problem(corpus, jnp.asarray(unit(p.safe, np.float64)),
                                     jnp.asarray(unit(p.harmful, np.float64)), config, rows=n)
    return problem, corpus


@pytest.mark.parametrize("kind,residual,decay", [("linear", 0.0, 0.0), ("mlp", 0.0, 0.0), ("linear", 0.7, 0.0),
                                                 ("mlp", 0.0, 0.3)])
def test_gradient_matches_central_differences(kind, residual, decay):
    config = sotjax.SOTConfig(dtype="float64", conditioning="raw", epsilon=0.2, sinkhorn_threshold=1e-13,
                              sinkhorn_max_iterations=20000, adjoint_tol=1e-13, adjoint_max_iterations=20000)
    settings = learn.settings_from(config)
    with jax.enable_x64(True):
        problem, features = _tiny_problem(config)
        head = H.make_head(features.shape[1], H.HeadConfig(kind, hidden=5, residual=residual, decay=decay), jnp.float64)
        graphdef, params = nnx.split(head, nnx.Param)
        rng = np.random.default_rng(1)
        # move away from the zero init so that every parameter has a gradient
        params = jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=0.5, size=x.shape)), params)
        residual_vec = jnp.asarray(rng.normal(scale=0.3, size=(problem.padded_rows,))) if residual else None
        warm = initial_warm_start(problem, problem.padded_rows, jnp.float64)

        # per-layer gradient scales (the ridge divides each layer's term by its scale)
        scales = jax.tree.map(lambda x: jnp.asarray(rng.uniform(1.0, 5.0)), params) if decay else None
        evaluate = jax.jit(lambda p, r: H.evaluate_head(p, r, problem, features, warm, graphdef=graphdef,
                                                         settings=settings, residual_weight=residual,
                                                         decay_weight=decay, scales=scales))

        def objective(p, r):
            return float(evaluate(p, r)[0].objective)

        _, _, (g_params, g_res) = evaluate(params, residual_vec)
        leaves, treedef = jax.tree.flatten(params)
        grads = jax.tree.leaves(g_params)
        h = 1e-5
        for li, (leaf, grad) in enumerate(zip(leaves, grads, strict=True)):
            flat = np.asarray(leaf).ravel()
            for k in range(min(flat.size, 4)):
                def at(delta, li=li, k=k):
                    moved = [np.asarray(x).copy() for x in leaves]
                    moved[li].ravel()[k] += delta
                    return objective(jax.tree.unflatten(treedef, [jnp.asarray(m) for m in moved]), residual_vec)
                fd = (at(h) - at(-h)) / (2 * h)
                assert abs(fd - float(np.asarray(grad).ravel()[k])) < 1e-6 + 1e-4 * abs(fd), (li, k, fd, grad)
        if residual_vec is not None:
            for k in range(3):
                e = jnp.zeros_like(residual_vec).at[k].set(h)
                fd = (objective(params, residual_vec + e) - objective(params, residual_vec - e)) / (2 * h)
                assert abs(fd - float(g_res[k])) < 1e-6 + 1e-4 * abs(fd)


def test_ridge_penalty_adds_half_decay_times_the_squared_weight_matrices():
    config = sotjax.SOTConfig(dtype="float64", conditioning="raw", epsilon=0.2)
    settings = learn.settings_from(config)
    with jax.enable_x64(True):
        problem, features = _tiny_problem(config)
        head = H.make_head(features.shape[1], H.HeadConfig("mlp", hidden=5), jnp.float64)
        graphdef, params = nnx.split(head, nnx.Param)
        rng = np.random.default_rng(2)
        params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
        warm = initial_warm_start(problem, problem.padded_rows, jnp.float64)
        base = H.evaluate_head(params, None, problem, features, warm, graphdef=graphdef, settings=settings)[0]
        pen = H.evaluate_head(params, None, problem, features, warm, graphdef=graphdef, settings=settings,
                              decay_weight=0.25)[0]
        arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        kernels = sum(float(np.sum(v ** 2)) for k, v in arrays.items() if "kernel" in k)
        assert len([k for k in arrays if "kernel" in k]) == 2 and len(arrays) == 4  # two biases untouched
        assert float(pen.objective) - float(base.objective) == pytest.approx(0.125 * kernels, rel=1e-12)
        scales = jax.tree_util.tree_map_with_path(lambda k, _: 4.0 if "out" in jax.tree_util.keystr(k) else 2.0,
                                                  params)
        scaled = H.evaluate_head(params, None, problem, features, warm, graphdef=graphdef, settings=settings,
                                 decay_weight=0.25, scales=scales)[0]
        want = sum(float(np.sum(v ** 2)) / (4.0 if "out" in k else 2.0) for k, v in arrays.items() if "kernel" in k)
        assert float(scaled.objective) - float(base.objective) == pytest.approx(0.125 * want, rel=1e-12)


def test_linear_head_on_one_hot_features_reproduces_the_free_logits():
    n = 12
    rng = np.random.default_rng(0)
    corpus = np.eye(n)
    safe, harmful = rng.normal(size=(5, n)) + 0.5, rng.normal(size=(6, n)) - 0.5
    config = sotjax.SOTConfig(dtype="float64", conditioning="raw", steps=25, objective_tol=0.0, weight_tol=0.0)
    free = sotjax.fit(corpus, safe, harmful, config)
    for bias in (False, True):
        fitted = H.fit_head(corpus, safe, harmful, config, H.HeadConfig("linear", bias=bias))
        assert fitted.result.n_steps == free.n_steps
        np.testing.assert_allclose(fitted.result.weights, free.weights, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(fitted.result.objective, free.objective, rtol=1e-9, atol=1e-12)
        assert np.array_equal(np.argsort(-fitted.result.logits, kind="stable"), np.argsort(-free.logits, kind="stable"))
        # the head scores the training rows with the logits it was trained to (no residual)
        np.testing.assert_allclose(fitted.head.score(corpus) - fitted.result.logits, 0.0, atol=1e-9)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("head-inputs")
    for name, dim, seed in (("a", 8, 3), ("b", 5, 4)):
        p = make_problem(n=50, n_safe=8, n_harmful=15, dim=dim, seed=seed)
        np.save(d / f"corpus_{name}.npy", p.corpus)
        np.save(d / f"corpus_{name}.ids.npy", np.array([f"doc-{i}" for i in range(50)]))
        np.save(d / f"safe_{name}.npy", p.safe)
        np.save(d / f"harmful_{name}.npy", p.harmful)
    (d / "corpus_a.meta.json").write_text(json.dumps({"model": "m", "model_fingerprint": "f" * 64}))
    return d


def _weigh(d, name, out, *extra):
    args = ["weigh", "--no-progress", "--corpus", d / f"corpus_{name}.npy", "--safe", d / f"safe_{name}.npy",
            "--harmful", d / f"harmful_{name}.npy", "--out", out, "--steps", "6", *extra]
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def runs(sets, tmp_path_factory):
    d = tmp_path_factory.mktemp("head-runs")
    _weigh(sets, "a", d / "a", "--head", "linear", "--conditioning", "standardize", "--head-decay", "0.01")
    _weigh(sets, "b", d / "b", "--head", "mlp", "--head-hidden", "6", "--head-residual", "0.5")
    _weigh(sets, "a", d / "plain")
    return d


def test_weigh_writes_the_head_and_score_reproduces_the_run_logits(sets, runs, tmp_path, capsys):
    run = read_run(runs / "a")
    assert {"head.safetensors", "head.json"} <= set(run.files)
    meta = json.loads((runs / "a" / "head.json").read_text())
    assert meta["kind"] == "linear" and meta["dim"] == 8 and meta["conditioning"] == "standardize"
    assert meta["decay"] == 0.01 and run.read_head().config.decay == 0.01
    assert meta["features"]["model_fingerprint"] == "f" * 64 and meta["schema"] == run.schema
    out = tmp_path / "scores.parquet"
    assert main(["score", "--no-progress", "--run", str(runs / "a"), "--corpus", str(sets / "corpus_a.npy"),
                 "--out", str(out), "--chunk-rows", "7"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["id"] == list(run.ids)
    np.testing.assert_allclose(table["logit"], run.logits, atol=1e-5)
    head = run.read_head()
    np.testing.assert_allclose(head.score(np.load(sets / "corpus_a.npy")), run.logits, atol=1e-5)


def test_mlp_head_with_residual_scores_unseen_rows(sets, runs, tmp_path):
    run = read_run(runs / "b")
    head = run.read_head()
    assert head.config.kind == "mlp" and head.config.hidden == 6 and head.config.residual == 0.5
    x = np.load(sets / "corpus_b.npy")
    scores = head.score(x[:10])
    assert scores.shape == (10,) and np.all(np.isfinite(scores))
    # the residual makes the run's logits differ from the head's, but not its order by much
    assert np.corrcoef(head.score(x), run.logits)[0, 1] > 0.5


def _refused(capsys, args, out):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sotjax score: error: "), err
    assert not out.exists()
    return lines[0]


def test_score_refuses_bad_inputs_with_one_line(sets, runs, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    base = ["score", "--no-progress", "--out", out]
    line = _refused(capsys, [*base, "--run", runs / "a", "--corpus", sets / "corpus_b.npy"], out)
    assert "dimension 5" in line and "8" in line
    line = _refused(capsys, [*base, "--run", runs / "plain", "--corpus", sets / "corpus_a.npy"], out)
    assert "no weight head" in line
    # a head file from another feature dimension
    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "a", mixed)
    shutil.copy(runs / "b" / "head.safetensors", mixed / "head.safetensors")
    line = _refused(capsys, [*base, "--run", mixed, "--corpus", sets / "corpus_a.npy"], out)
    assert "head.safetensors" in line
    shutil.copy(runs / "b" / "head.json", mixed / "head.json")
    line = _refused(capsys, [*base, "--run", mixed, "--corpus", sets / "corpus_a.npy"], out)
    assert "dimension" in line
    # embeddings of another feature model (sotjax embed's meta.json says so)
    other = tmp_path / "other.npy"
    shutil.copy(sets / "corpus_a.npy", other)
    (tmp_path / "other.meta.json").write_text(json.dumps({"model_fingerprint": "0" * 64}))
    line = _refused(capsys, [*base, "--run", runs / "a", "--corpus", other], out)
    assert "another feature model" in line
    # bad rows, found mid-stream: nothing written
    bad = np.load(sets / "corpus_a.npy")
    bad[30, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    line = _refused(capsys, [*base, "--run", runs / "a", "--corpus", tmp_path / "bad.npy", "--chunk-rows", "8"], out)
    assert "row 30" in line
    _refused(capsys, [*base, "--run", runs / "a", "--corpus", sets / "corpus_a.npy", "--chunk-rows", "0"], out)


def test_score_subprocess_refuses_a_head_of_another_dimension(sets, runs, tmp_path):
    out = tmp_path / "s.parquet"
    proc = run_cli("score", "--run", runs / "b", "--corpus", sets / "corpus_a.npy", "--out", out)
    line = one_line_error(proc, 2, "score")
    assert "dimension" in line and not out.exists()
