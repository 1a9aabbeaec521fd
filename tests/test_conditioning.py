"""sotjax.conditioning: each transform against an independent float64 NumPy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sotjax
from sotjax.conditioning import Conditioner, ConditioningConfig
from sotjax.errors import SotjaxInputError
from sotjax.eval.metrics import auroc
from sotjax.synthetic import make_problem

D = 12


def _sets(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) * np.linspace(3.0, 0.2, D)[:, None]  # anisotropic, distinct eigenvalues
    return [(rng.normal(size=(n, D)) @ mix + rng.normal(size=D) * 4 + off).astype(np.float32)
            for n, off in ((300, 0.0), (40, 1.0), (90, -2.0))]


def _pooled(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: the data stacked, each set weighing 1/K, np.cov (population)."""
    x = np.concatenate([s.astype(np.float64) for s in sets])
    w = np.concatenate([np.full(len(s), 1.0 / (len(sets) * len(s))) for s in sets])
    return x, w


def _wmean_cov(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.average(y, axis=0, weights=w), np.cov(y, rowvar=False, aweights=w, bias=True)


def test_center_gives_zero_pooled_mean() -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig(center=True), sets)
    x, w = _pooled(sets)
    np.testing.assert_allclose(cond.mean, np.average(x, axis=0, weights=w), rtol=1e-12, atol=1e-12)
    mean, _ = _wmean_cov(cond.apply(x).astype(np.float64), w)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)


def test_standardize_gives_unit_std() -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig(center=True, standardize=True), sets)
    x, w = _pooled(sets)
    _, cov = _wmean_cov(x, w)
    np.testing.assert_allclose(cond.scale, np.sqrt(np.diag(cov)), rtol=1e-10)
    _, cov_y = _wmean_cov(cond.apply(x).astype(np.float64), w)
    np.testing.assert_allclose(np.sqrt(np.diag(cov_y)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("spec", ["standardize", "abtt:2", "whiten:0.1"])
@pytest.mark.parametrize("s", [1e-200, 1e200])
def test_extreme_float64_scales_condition_like_unit_scale(spec: str, s: float) -> None:
    """Moments of x * 1e200 overflow (and of x * 1e-200 underflow) if summed as they are; the conditioned
    rows must equal those of x itself, up to a positive factor per map (standardize and whiten are scale-free;
    all-but-the-top's output is divided by a power of two near s, so it stays in float32's range)."""
    sets = [x.astype(np.float64) for x in _sets()]
    config = ConditioningConfig.parse(spec)
    base = Conditioner.fit(config, sets)
    scaled = Conditioner.fit(config, [x * s for x in sets])
    for x in sets:
        got, want = scaled.apply(x * s).astype(np.float64), base.apply(x).astype(np.float64)
        assert np.all(np.isfinite(got))
        factor = np.linalg.norm(want) / np.linalg.norm(got)  # 1 for scale-free maps, s / 2^e for abtt
        if not spec.startswith("abtt"):
            assert factor == pytest.approx(1.0, rel=1e-6)
        np.testing.assert_allclose(got * factor, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("k", [1, 3])
def test_remove_top_kills_top_eigenvectors(k: int) -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig(center=True, remove_top=k), sets)
    x, w = _pooled(sets)
    _, cov = _wmean_cov(x, w)
    lam, u = np.linalg.eigh(cov)
    top, rest = u[:, ::-1][:, :k], u[:, ::-1][:, k:]
    y = cond.apply(x).astype(np.float64)
    _, cov_y = _wmean_cov(y, w)
    assert np.abs(top.T @ cov_y @ top).max() < 1e-8 * lam.max()
    # the other directions keep their variance (sign-invariant: quadratic forms)
    np.testing.assert_allclose(np.diag(rest.T @ cov_y @ rest), lam[::-1][k:], rtol=1e-4)
    # the projection is I - U_k U_k^T (sign-invariant)
    np.testing.assert_allclose(cond.matrix, np.eye(D) - top @ top.T, atol=1e-10)


def test_whiten_without_shrinkage_gives_identity_covariance() -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig(center=True, whiten=True, shrinkage=0.0), sets)
    x, w = _pooled(sets)
    _, cov_y = _wmean_cov(cond.apply(x).astype(np.float64), w)
    np.testing.assert_allclose(cov_y, np.eye(D), atol=1e-4)


def test_whiten_with_shrinkage_matches_formula() -> None:
    sets = _sets()
    s = 0.3
    cond = Conditioner.fit(ConditioningConfig(center=True, whiten=True, shrinkage=s), sets)
    x, w = _pooled(sets)
    _, cov = _wmean_cov(x, w)
    target = (1 - s) * cov + s * np.trace(cov) / D * np.eye(D)
    lam, u = np.linalg.eigh(target)
    np.testing.assert_allclose(cond.matrix, (u / np.sqrt(lam)) @ u.T, rtol=1e-8, atol=1e-10)


def test_remove_top_then_whiten() -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig(center=True, remove_top=2, whiten=True, shrinkage=0.0), sets)
    x, w = _pooled(sets)
    _, cov_y = _wmean_cov(cond.apply(x).astype(np.float64), w)
    expected = np.linalg.eigvalsh(cov_y)
    np.testing.assert_allclose(expected, [0.0, 0.0] + [1.0] * (D - 2), atol=1e-4)


def test_equal_set_weighting() -> None:
    sets = _sets()
    config = ConditioningConfig(center=True, standardize=True, remove_top=2, whiten=True)
    a = Conditioner.fit(config, sets)
    b = Conditioner.fit(config, [np.concatenate([sets[0]] * 10), sets[1], sets[2]])
    for name in ("mean", "scale", "matrix"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)


def test_fit_problem_picks_sets() -> None:
    corpus, safe, harmful = _sets()
    config = ConditioningConfig(center=True, fit_on="references")
    a = Conditioner.fit_problem(config, corpus, safe, harmful)
    np.testing.assert_array_equal(a.mean, Conditioner.fit(config, [safe, harmful]).mean)
    u = Conditioner.fit_problem(ConditioningConfig(center=True), corpus, safe, harmful)
    np.testing.assert_array_equal(u.mean, Conditioner.fit(config, [corpus, safe, harmful]).mean)


def test_chunked_fit_on_memmap_equals_one_shot(tmp_path) -> None:
    sets = _sets()
    paths = []
    for i, s in enumerate(sets):
        np.save(tmp_path / f"s{i}.npy", s)
        paths.append(np.load(tmp_path / f"s{i}.npy", mmap_mode="r"))
    config = ConditioningConfig(center=True, standardize=True, remove_top=1, whiten=True)
    one = Conditioner.fit(config, sets, chunk_rows=10_000)
    chunked = Conditioner.fit(config, paths, chunk_rows=7)
    for name in ("mean", "scale", "matrix"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(one, name), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.apply(paths[0], chunk_rows=13), one.apply(sets[0]), rtol=1e-5, atol=1e-5)
    assert chunked.apply(paths[0]).dtype == np.float32


def test_round_trip_is_bit_exact() -> None:
    config = ConditioningConfig(center=True, standardize=True, remove_top=2, whiten=True, shrinkage=0.25,
                                fit_on="references")
    cond = Conditioner.fit(config, _sets())
    back = Conditioner.from_dict(json.loads(json.dumps(cond.to_dict())))
    assert back.config == config and back.dim == cond.dim
    for name in ("mean", "scale", "matrix"):
        assert np.array_equal(getattr(back, name), getattr(cond, name))
    assert ConditioningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    raw = Conditioner.fit(ConditioningConfig.raw(), _sets())
    assert Conditioner.from_dict(json.loads(json.dumps(raw.to_dict()))).to_dict() == raw.to_dict()


def test_raw_is_identity() -> None:
    sets = _sets()
    cond = Conditioner.fit(ConditioningConfig.raw(), sets)
    assert cond.mean is None and cond.scale is None and cond.matrix is None
    assert np.array_equal(cond.apply(sets[1]), sets[1].astype(np.float32))
    x64 = sets[2].astype(np.float64) + 1e-9
    assert np.array_equal(cond.apply(x64), x64.astype(np.float32))


def test_all_but_the_top_preset() -> None:
    assert ConditioningConfig.all_but_the_top(k=5) == ConditioningConfig(center=True, remove_top=5)


@pytest.mark.parametrize("kwargs, field", [
    ({"center": 1}, "center"),
    ({"standardize": "yes"}, "standardize"),
    ({"whiten": None}, "whiten"),
    ({"remove_top": -1}, "remove_top"),
    ({"remove_top": 1.5}, "remove_top"),
    ({"remove_top": True}, "remove_top"),
    ({"shrinkage": 1.5}, "shrinkage"),
    ({"shrinkage": float("nan")}, "shrinkage"),
    ({"shrinkage": -0.1}, "shrinkage"),
    ({"fit_on": "corpus"}, "fit_on"),
])
def test_bad_config_one_line(kwargs, field) -> None:
    with pytest.raises(SotjaxInputError) as err:
        ConditioningConfig(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg and field in msg


def test_bad_inputs_one_line() -> None:
    sets = _sets()
    cases = [
        lambda: ConditioningConfig.from_dict({"centre": True}),
        lambda: Conditioner.fit(ConditioningConfig(remove_top=D), sets),
        lambda: Conditioner.fit(ConditioningConfig(center=True), [sets[0], sets[1][:, :3]]),
        lambda: Conditioner.fit(ConditioningConfig(center=True), []),
        lambda: Conditioner.fit(ConditioningConfig(center=True), sets).apply(sets[0][:, :3]),
        lambda: Conditioner.from_dict({"config": {}, "dim": D, "mean": [0.0], "scale": None, "matrix": None}),
    ]
    for case in cases:
        with pytest.raises(SotjaxInputError) as err:
            case()
        assert "\n" not in str(err.value)


def _outlier_problem():
    """Synthetic problem plus 3 huge 'massive activation' dimensions on every row (mean 30, sd 3)."""
    p = make_problem(n=400, n_safe=40, n_harmful=100, dim=32, harmful_fraction=0.1, seed=3)
    rng = np.random.default_rng(1)

    def add(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, 30.0 + 3.0 * rng.normal(size=(len(x), 3))], axis=1).astype(np.float32)

    return p, add(p.corpus), add(p.safe), add(p.harmful)


def test_conditioning_rescues_outlier_dimensions() -> None:
    p, corpus, safe, harmful = _outlier_problem()
    scores = {}
    for name, config in (("raw", ConditioningConfig.raw()), ("abtt", ConditioningConfig.all_but_the_top(3)),
                         ("standardize", ConditioningConfig(standardize=True))):
        cond = Conditioner.fit_problem(config, corpus, safe, harmful)
        res = sotjax.fit(cond.apply(corpus), cond.apply(safe), cond.apply(harmful), sotjax.SOTConfig.paper())
        scores[name] = auroc(res.logits, p.is_harmful)
    print(scores)
    # measured: raw 0.504, all-but-the-top 0.999, standardize 0.999
    assert scores["raw"] < 0.7
    assert scores["abtt"] > 0.95 and scores["standardize"] > 0.95
    assert scores["abtt"] - scores["raw"] > 0.25 and scores["standardize"] - scores["raw"] > 0.25


# --------------------------------------------------------------------------- the spec, the fit, the run directory

@pytest.mark.parametrize("spec, expected", [
    ("raw", ConditioningConfig()),
    ("center", ConditioningConfig(center=True)),
    ("standardize", ConditioningConfig(center=True, standardize=True)),
    ("scale", ConditioningConfig(standardize=True)),
    ("abtt:3", ConditioningConfig(center=True, remove_top=3)),
    ("whiten", ConditioningConfig(center=True, whiten=True, shrinkage=0.1)),
    ("standardize+abtt:1+whiten:0.5@references",
     ConditioningConfig(center=True, standardize=True, remove_top=1, whiten=True, shrinkage=0.5, fit_on="references")),
])
def test_spec_parse_and_canonical_round_trip(spec: str, expected: ConditioningConfig) -> None:
    cfg = ConditioningConfig.parse(spec)
    assert cfg == expected
    assert ConditioningConfig.parse(cfg.spec) == cfg


@pytest.mark.parametrize("spec", ["", "zscore", "abtt", "abtt:x", "abtt:-1", "whiten:2", "raw@corpus", "center:1"])
def test_bad_spec_one_line(spec: str) -> None:
    with pytest.raises(SotjaxInputError) as err:
        ConditioningConfig.parse(spec)
    assert "\n" not in str(err.value) and "conditioning" in str(err.value)
    with pytest.raises(SotjaxInputError):
        sotjax.SOTConfig(conditioning=spec)


def test_fit_records_the_conditioner_fitted_on_the_sets_it_uses() -> None:
    corpus, safe, harmful = _sets(3)
    cfg = sotjax.SOTConfig(conditioning="standardize", steps=3)
    res = sotjax.fit(corpus, safe, harmful, cfg)
    assert res.conditioner is not None
    x, w = _pooled([corpus, safe, harmful])
    mu, cov = _wmean_cov(x, w)
    np.testing.assert_allclose(res.conditioner.mean, mu, rtol=1e-10)
    np.testing.assert_allclose(res.conditioner.scale, np.sqrt(np.diag(cov)), rtol=1e-10)
    refs = sotjax.fit(corpus, safe, harmful, cfg.replace(conditioning="standardize@references")).conditioner
    x, w = _pooled([safe, harmful])
    np.testing.assert_allclose(refs.mean, _wmean_cov(x, w)[0], rtol=1e-10)
    assert sotjax.fit(corpus, safe, harmful, cfg.replace(conditioning="raw")).conditioner is None


def test_weigh_cli_writes_and_reads_back_the_conditioner(tmp_path) -> None:
    from cli_helpers import one_line_error
    from cli_helpers import sotjax as run_cli

    from sotjax.rundir import read_run

    corpus, safe, harmful = _sets(4)
    for name, x in (("c", corpus), ("s", safe), ("h", harmful)):
        np.save(tmp_path / f"{name}.npy", x)
    out = tmp_path / "run"
    proc = run_cli("weigh", "--corpus", tmp_path / "c.npy", "--safe", tmp_path / "s.npy", "--harmful",
                   tmp_path / "h.npy", "--out", out, "--conditioning", "abtt:2", "--steps", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["sot"]["conditioning"] == "abtt:2"
    fitted = read_run(out).read_conditioner()
    x, w = _pooled([corpus, safe, harmful])
    mu, cov = _wmean_cov(x, w)
    lam, u = np.linalg.eigh(cov)
    top = u[:, np.argsort(lam)[::-1][:2]]
    reference = (harmful - mu) - (harmful - mu) @ top @ top.T  # centre, remove the top 2 directions
    np.testing.assert_allclose(fitted.apply(harmful), reference, rtol=1e-4, atol=1e-4)
    raw = tmp_path / "raw"
    proc = run_cli("weigh", "--corpus", tmp_path / "c.npy", "--safe", tmp_path / "s.npy", "--harmful",
                   tmp_path / "h.npy", "--out", raw, "--conditioning", "raw", "--steps", "3", "--no-progress")
    assert proc.returncode == 0 and not (raw / "conditioning.npz").exists()
    assert read_run(raw).read_conditioner() is None
    bad = tmp_path / "bad"
    line = one_line_error(run_cli("weigh", "--corpus", tmp_path / "c.npy", "--safe", tmp_path / "s.npy", "--harmful",
                                  tmp_path / "h.npy", "--out", bad, "--conditioning", "abtt:many"), 2)
    assert "conditioning" in line and not bad.exists()
