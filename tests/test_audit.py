"""The cross-set linkage audit (sotjax.audit, ``sotjax audit``): planted copies found and nothing else,
the blocked search equal to brute force, union-find clusters, dedup invariance of the weights, the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from cli_helpers import one_line_error, snapshot, sotjax

from sotjax import audit as A
from sotjax import rundir
from sotjax.errors import SotjaxInputError, SotjaxWarning


def _near(x: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """``x`` plus Gaussian noise of ``noise`` times its norm (cosine about 1/sqrt(1 + noise^2))."""
    return x + noise * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(x.shape)


def planted_sets(seed: int = 0, n: int = 700, n_safe: int = 90, n_harmful: int = 110, d: int = 64):
    """Random sets (cosines ~ +-0.12 at d = 64, never near 0.95) with exact and near copies planted on
    disjoint rows of every set pair; returns the sets and the expected links per pair."""
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, d))
    safe = rng.standard_normal((n_safe, d))
    harmful = rng.standard_normal((n_harmful, d))
    rows = iter(rng.permutation(n).tolist())
    expected: dict[tuple[str, str], set[tuple[int, int]]] = {pair: set() for pair in A.PAIRS}
    # within the corpus: pairs (exact and near), a cluster of 4, and a chain of 3 near copies of one row
    for k in range(12):
        i, j = next(rows), next(rows)
        corpus[j] = corpus[i] if k % 2 else _near(corpus[i], rng, 0.05)
        expected[("corpus", "corpus")].add((min(i, j), max(i, j)))
    for size in (4, 3):
        members = [next(rows) for _ in range(size)]
        for m in members[1:]:
            corpus[m] = _near(corpus[members[0]], rng, 0.03)
        expected[("corpus", "corpus")].update((min(a, b), max(a, b)) for a in members for b in members if a < b)
    # across the sets (exact and near)
    for k, s in enumerate(rng.choice(n_safe, 6, replace=False)):
        i = next(rows)
        safe[s] = corpus[i] if k % 2 else _near(corpus[i], rng, 0.05)
        expected[("corpus", "safe")].add((i, int(s)))
    for k, h in enumerate(rng.choice(n_harmful, 6, replace=False)):
        i = next(rows)
        harmful[h] = corpus[i] if k % 2 else _near(corpus[i], rng, 0.05)
        expected[("corpus", "harmful")].add((i, int(h)))
    used_safe = {s for _, s in expected[("corpus", "safe")]}
    free_safe = [s for s in range(n_safe) if s not in used_safe]
    free_harmful = [h for h in range(n_harmful) if h not in {h for _, h in expected[("corpus", "harmful")]}]
    for k in range(4):
        s, h = free_safe[k], free_harmful[k]
        harmful[h] = safe[s] if k % 2 else _near(safe[s], rng, 0.05)
        expected[("safe", "harmful")].add((s, h))
    return corpus, safe, harmful, expected


def pairs_of(links: A.Links) -> set[tuple[int, int]]:
    return set(zip(links.a.tolist(), links.b.tolist(), strict=True))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_planted_copies_across_every_pair_are_found_and_nothing_else(backend):
    corpus, safe, harmful, expected = planted_sets()
    result = A.audit(corpus, safe, harmful, threshold=0.95, block_rows=128, backend=backend)  # 700 = 5*128 + 60
    assert set(result.links) == set(A.PAIRS)
    for pair in A.PAIRS:
        assert pairs_of(result.links[pair]) == expected[pair], pair
        assert result.links[pair].truncated == 0
    summary = result.summary()
    assert {k: v["links"] for k, v in summary["pairs"].items()} == {A.pair_name(*p): len(expected[p]) for p in A.PAIRS}
    assert summary["duplicates"]["size_histogram"] == {"2": 12, "3": 1, "4": 1}
    assert summary["duplicates"]["rows_after_dedup"] == 700 - 12 - 3 - 2
    assert summary["leakage"]["corpus_rows_linked_to_safe"] == 6
    assert any(w.startswith("anchor leakage: 6 corpus row(s)") for w in result.warnings)
    # the same sets as memory-mapped float16 files: the same links
    if backend == "numpy":
        import tempfile
        from pathlib import Path

        from sotjax.io import open_npy

        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "c.npy", corpus.astype(np.float16))
            again = A.audit(open_npy(Path(tmp) / "c.npy"), safe.astype(np.float32), harmful, block_rows=128)
            for pair in A.PAIRS:
                assert pairs_of(again.links[pair]) == expected[pair], pair


# --------------------------------------------------------------------------------- vs brute force
def brute_force(a: np.ndarray, b: np.ndarray | None, tau: float, k: int):
    """Reference in float64: pairs >= tau kept when in the top k of either row (ties by index), counts,
    mutual nearest neighbours."""
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    within = b is None
    ub = ua if within else b / np.linalg.norm(b, axis=1, keepdims=True)
    s = ua @ ub.T
    hit = s >= tau
    if within:
        hit &= ~np.eye(len(a), dtype=bool)
    lists_a = {i: sorted(np.flatnonzero(hit[i]).tolist(), key=lambda j: (-s[i, j], j)) for i in range(len(ua))}
    lists_b = {j: sorted(np.flatnonzero(hit[:, j]).tolist(), key=lambda i: (-s[i, j], i)) for j in range(len(ub))}
    pairs = {}
    for i, js in lists_a.items():
        for j in js:
            if within and j < i:
                continue
            rank_a = js.index(j)
            rank_b = lists_b[j].index(i) if not within else lists_a[j].index(i)
            if rank_a < k or rank_b < k:
                pairs[(i, j)] = (s[i, j], rank_a == 0 and rank_b == 0)
    return s, pairs, hit.sum(1), hit.sum(0)


@pytest.fixture(scope="module")
def clustered():
    """203 + 57 rows around 12 centres and a threshold near 0.9: many links, no cosine within 2e-6 of
    the threshold and the three best links of every row more than 2e-6 apart (float32 rounding cannot flip
    a link or a rank against the float64 reference)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 24))
    a = centres[rng.integers(0, 12, 203)] + 0.35 * rng.standard_normal((203, 24))
    b = centres[rng.integers(0, 12, 57)] + 0.35 * rng.standard_normal((57, 24))
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b)]
    sims = [unit[0] @ unit[0].T, unit[0] @ unit[1].T]
    values = np.concatenate([s.ravel() for s in sims])
    taus = np.linspace(0.88, 0.92, 401)
    gaps = [np.min(np.abs(values - t)) for t in taus]
    tau = float(taus[int(np.argmax(gaps))])
    assert max(gaps) > 2e-6
    for s in sims:
        for m in (s, s.T):
            for row in m:
                hits = np.sort(row[(row >= tau) & (row < 1 - 1e-9)])[::-1][:3]  # ranks 0, 1 | 2 (k = 2)
                assert hits.size < 2 or np.diff(-hits).min() > 2e-6
    return a, b, tau


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("block_rows", [16, 64, 1000])  # 203 = 12*16 + 11 = 3*64 + 11; one block
@pytest.mark.parametrize("within", [True, False])
def test_blocked_search_equals_brute_force(clustered, backend, block_rows, within):
    a, b, tau = clustered
    other = None if within else b
    for k in (1000, 2):
        links = A.find_links(a, other, threshold=tau, top_k=k, block_rows=block_rows, backend=backend)
        s, expected, count_a, count_b = brute_force(a, other, tau, k)
        assert len(expected) > (50 if k == 2 else 200)
        assert pairs_of(links) == set(expected)
        np.testing.assert_allclose(links.cosine, [expected[p][0] for p in zip(links.a, links.b, strict=True)],
                                   atol=1e-5)
        assert links.mutual.tolist() == [expected[p][1] for p in zip(links.a.tolist(), links.b.tolist(), strict=True)]
        np.testing.assert_array_equal(links.count_a, count_a if not within else count_a)
        np.testing.assert_array_equal(links.count_b, count_b)
        truncated = np.count_nonzero(count_a > k) + (0 if within else np.count_nonzero(count_b > k))
        assert links.truncated == truncated
        if k == 1000:
            assert truncated == 0
        else:
            assert truncated > 0 and len(links) < np.count_nonzero(np.triu(s >= tau, 1) if within else s >= tau)


def test_running_candidates_are_pruned_to_top_k_without_losing_any(monkeypatch):
    """Many exact copies of one row: every tile is full of hits; pruning keeps the top-k union, the
    cluster stays one component, truncation is counted and warned about."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    x[:120] = x[0]
    links = A.find_links(x, None, top_k=3, block_rows=32)
    assert links.truncated == 120
    assert set(links.count_a[:120].tolist()) == {119}
    groups = A.connected_components(300, links.a, links.b)
    assert np.all(groups[:120] == 0) and np.bincount(groups).max() == 120
    np.testing.assert_array_equal(A.dedup_groups(x, top_k=3, block_rows=32), groups)
    result = A.audit(x, top_k=3, block_rows=32)
    assert any("more than top_k = 3" in w for w in result.warnings)
    monkeypatch.setattr(A, "_prune_limit", lambda rows, k: 0)  # prune the running list after every tile
    again = A.find_links(x, None, top_k=3, block_rows=32)
    for field in ("a", "b", "cosine", "mutual", "count_a"):
        np.testing.assert_array_equal(getattr(again, field), getattr(links, field))


def test_connected_components_is_union_find():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    rng = np.random.default_rng(1)
    n = 500
    i, j = rng.integers(0, n, 300), rng.integers(0, n, 300)
    i = np.concatenate([i, np.arange(100, 199)])  # a long chain
    j = np.concatenate([j, np.arange(101, 200)])
    ours = A.connected_components(n, i, j)
    _, labels = scipy_components(coo_matrix((np.ones(i.size), (i, j)), shape=(n, n)), directed=False)
    _, first = np.unique(labels, return_index=True)
    relabel = np.empty(labels.max() + 1, dtype=np.int64)  # scipy's ids renumbered in order of first node
    order = np.argsort(first)
    relabel[order] = np.arange(order.size)
    np.testing.assert_array_equal(ours, relabel[labels])
    assert A.connected_components(3, np.zeros(0), np.zeros(0)).tolist() == [0, 1, 2]


def test_bad_inputs_are_one_line():
    x = np.ones((4, 3))
    with pytest.raises(SotjaxInputError, match="row 2 is the zero vector"):
        A.audit(np.array([[1.0, 0], [0, 1], [0, 0]]))
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(SotjaxInputError, match="corpus.npy: non-finite value .* row 1"):
        A.audit(bad, names={"corpus": "corpus.npy"})
    with pytest.raises(SotjaxInputError, match="safe: embedding dimension 2 does not match"):
        A.audit(x, np.ones((2, 2)))
    with pytest.raises(SotjaxInputError, match="--threshold"):
        A.audit(x, threshold=0.0)
    with pytest.raises(SotjaxInputError, match="--top-k"):
        A.audit(x, top_k=0)


# ------------------------------------------------------------------------------------------- dedup
def test_fit_dedup_is_invariant_to_duplicating_a_row():
    import sotjax
    from sotjax.synthetic import make_problem

    p = make_problem(n=60, n_safe=10, n_harmful=12, dim=32, seed=0, dtype=np.float64)
    safe = p.safe.copy()
    safe[3] = p.corpus[40]  # anchor leakage: corpus row 40 is a safe row
    config = sotjax.SOTConfig(dtype="float64", steps=15)
    base = sotjax.fit(p.corpus, safe, p.harmful, config)

    r, k = 7, 4  # row 7 appears k times: itself, two exact copies and one near copy (later rows)
    rng = np.random.default_rng(0)
    copies = [p.corpus[r], p.corpus[r], _near(p.corpus[r], rng, 1e-3)]
    rows = list(p.corpus[:20]) + [copies[0]] + list(p.corpus[20:45]) + [copies[1]] + list(p.corpus[45:]) + [copies[2]]
    corpus = np.asarray(rows)
    where = [r, 20, 46, 62]
    others = np.setdiff1d(np.arange(63), where)

    with pytest.warns(SotjaxWarning, match="anchor leakage: 1 corpus row"):
        dedup = A.fit_dedup(corpus, safe, p.harmful, config)
    assert any(w.startswith("anchor leakage") for w in dedup.warnings)
    assert dedup.sizes.max() == k and sorted(np.flatnonzero(dedup.groups == dedup.groups[r]).tolist()) == where
    np.testing.assert_allclose(dedup.weights[others], np.delete(base.weights, r), rtol=1e-10)
    np.testing.assert_allclose(dedup.weights[where], base.weights[r] / k, rtol=1e-10)
    np.testing.assert_allclose(dedup.weights[where].sum(), base.weights[r], rtol=1e-10)
    assert abs(dedup.weights.sum() - 1.0) < 1e-12
    e = np.exp(dedup.logits - dedup.logits.max())
    np.testing.assert_allclose(e / e.sum(), dedup.weights, rtol=1e-10)
    # precomputed groups give the same weights, without an audit (and without its warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = A.fit_dedup(corpus, safe, p.harmful, config, groups=dedup.groups * 10)
    np.testing.assert_allclose(again.weights, dedup.weights, rtol=1e-12)
    assert again.audit is None and again.warnings == ()


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit_inputs")
    corpus, safe, harmful, expected = planted_sets(seed=5, n=300, n_safe=40, n_harmful=50, d=32)
    np.save(d / "corpus.npy", corpus.astype(np.float16))
    np.save(d / "corpus.ids.npy", np.array([f"doc-{i:04d}" for i in range(300)]))
    np.save(d / "safe.npy", safe.astype(np.float32))
    np.save(d / "harmful.npy", harmful.astype(np.float32))
    return d, expected


def test_cli_audit_end_to_end(cli_inputs, tmp_path):
    import pyarrow.parquet as pq

    d, expected = cli_inputs
    out = tmp_path / "audit"
    args = ["audit", "--corpus", d / "corpus.npy", "--safe", d / "safe.npy", "--harmful", d / "harmful.npy",
            "--out", out, "--threshold", "0.95", "--block-rows", "64", "--conditioning", "raw"]
    proc = sotjax(*args)
    assert proc.returncode == 0, proc.stderr
    assert "warning: anchor leakage: 6 corpus row(s)" in proc.stderr
    marker = json.loads((out / rundir.MARKER).read_text())
    assert marker["kind"] == "audit"
    assert sorted(p.name for p in out.iterdir()) == sorted([rundir.MARKER, "audit.html", "links.parquet",
                                                            "summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == rundir.SCHEMA and summary["threshold"] == 0.95
    assert summary["shapes"]["corpus"] == {"n": 300, "dim": 32}
    assert {k: v["links"] for k, v in summary["pairs"].items()} == {A.pair_name(*p): len(expected[p])
                                                                    for p in A.PAIRS}
    assert summary["duplicates"]["size_histogram"] == {"2": 12, "3": 1, "4": 1}
    assert summary["leakage"]["corpus_rows_linked_to_safe"] == 6
    table = pq.read_table(out / "links.parquet").to_pydict()
    assert list(table)[:5] == ["id_a", "set_a", "id_b", "set_b", "cosine"]
    got = {(sa, sb): set() for sa, sb in A.PAIRS}
    for ra, sa, rb, sb in zip(table["row_a"], table["set_a"], table["row_b"], table["set_b"], strict=True):
        got[(sa, sb)].add((ra, rb))
    assert got == expected
    corpus_ids = [i for i, s in zip(table["id_a"], table["set_a"], strict=True) if s == "corpus"]
    assert corpus_ids and all(i.startswith("doc-") for i in corpus_ids)  # ids from corpus.ids.npy
    page = (out / "audit.html").read_text()
    assert "Linkage audit" in page and "doc-" not in page  # counts only, nothing from the data
    with pytest.raises(SotjaxInputError, match="is a sotjax audit run"):
        rundir.read_run(out)
    # an audit directory is replaced by the next audit
    proc = sotjax(*args[:-4], "--out", out, "--threshold", "0.999")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.999


def test_cli_audit_bad_input_is_one_line_and_writes_nothing(cli_inputs, tmp_path):
    d, _ = cli_inputs
    np.save(tmp_path / "safe16.npy", np.ones((5, 16), dtype=np.float32))
    out = tmp_path / "audit"
    before = snapshot(tmp_path)
    line = one_line_error(sotjax("audit", "--corpus", d / "corpus.npy", "--safe", tmp_path / "safe16.npy",
                                 "--out", out), 2, "audit")
    assert str(tmp_path / "safe16.npy") in line and "dimension 16" in line
    assert snapshot(tmp_path) == before and not out.exists()


def test_cli_audit_conditioned_still_finds_exact_copies(cli_inputs, tmp_path):
    """With a fitted conditioning (the geometry weigh's cost sees) exact copies stay at cosine 1."""
    d, expected = cli_inputs
    out = tmp_path / "audit_std"
    proc = sotjax("audit", "--corpus", d / "corpus.npy", "--safe", d / "safe.npy", "--harmful", d / "harmful.npy",
                  "--out", out, "--threshold", "0.999", "--conditioning", "standardize")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conditioning"] == "standardize"
    import pyarrow.parquet as pq

    table = pq.read_table(out / "links.parquet").to_pydict()
    exact = [(ra, rb) for ra, rb, c in zip(table["row_a"], table["row_b"], table["cosine"], strict=True) if c > 0.99999]
    assert exact  # the planted exact copies (float16 corpus: equal rows stay equal after any affine map)


def test_weigh_dedup_spreads_the_cluster_weight(cli_inputs, tmp_path):
    """`weigh --dedup`: copies of one row share its weight equally; the run records the merge."""
    import pyarrow.parquet as pq

    d, _ = cli_inputs
    out = tmp_path / "w"
    proc = sotjax("weigh", "--corpus", d / "corpus.npy", "--ids", d / "corpus.ids.npy", "--safe", d / "safe.npy",
                  "--harmful", d / "harmful.npy", "--out", out, "--dedup", "0.95", "--steps", "5", "--no-progress",
                  "--conditioning", "raw")
    assert proc.returncode == 0, proc.stderr
    assert "anchor leakage" in proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dedup"]["clusters"] == 14 and stats["dedup"]["rows_merged"] == 12 + 2 + 3
    table = pq.read_table(out / "weights.parquet").to_pydict()
    w = np.asarray(table["weight"])
    assert abs(w.sum() - 1.0) < 1e-9
    groups = A.dedup_groups(np.load(d / "corpus.npy").astype(np.float32), 0.95)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if members.size > 1:
            np.testing.assert_allclose(w[members], w[members[0]], rtol=1e-12)
    bad = one_line_error(sotjax("weigh", "--corpus", d / "corpus.npy", "--safe", d / "safe.npy", "--harmful",
                                d / "harmful.npy", "--out", tmp_path / "bad", "--dedup", "1.5"), 2)
    assert "--dedup" in bad and not (tmp_path / "bad").exists()
