"""HTML report: self-contained, contains the metrics, valid embedded PNGs, PCA correct."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from sotjax import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pca_2d_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    x = x @ np.linalg.qr(rng.normal(size=(5, 5)))[0]  # random rotation
    p = R.pca_2d(x)
    xc = x - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(xc.T))
    top = evecs[:, ::-1][:, :2]
    ref = xc @ top
    for j in range(2):  # equal up to sign
        assert min(np.abs(p[:, j] - ref[:, j]).max(), np.abs(p[:, j] + ref[:, j]).max()) < 1e-8
    np.testing.assert_allclose(p.var(axis=0, ddof=1), evals[::-1][:2], rtol=1e-8)


def test_metrics_tables():
    m = {"sot": {"auroc": 0.98765, "harmful_retention": 0.01}, "random": {"auroc": (0.5, 0.02)}}
    md = R.metrics_table_markdown(m)
    assert "| sot | 0.9877 |" in md and "0.5000 ± 0.0200" in md
    htm = R.metrics_table_html({"<b>x</b>": {"auroc": 1.0}})
    assert "<b>x</b>" not in htm and "&lt;b&gt;x&lt;/b&gt;" in htm


def test_write_report_self_contained(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    y = np.zeros(n, dtype=bool)
    y[:6] = True
    w = rng.random(n)
    w[y] *= 1e-3
    w /= w.sum()
    corpus, safe, harmful = rng.normal(size=(n, 8)), rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    metrics = {
        "sot (push-pull)": {
            "auroc": 0.975,
            "auprc": 0.5,
            "harmful_retention": 0.0,
            "benign_recall": 0.9,
            "harmful_weight_mass": 1e-4,
        }
    }
    path = R.write_report(
        tmp_path / "run", weights=w, is_harmful=y, metrics=metrics,
        objective=[1.0, 0.8, 0.7], pull=[0.5, 0.4, 0.3], push=[0.2, 0.25, 0.3],
        corpus=corpus, safe=safe, harmful=harmful, info={"config": {"lam": 0.5}},
    )
    page = path.read_text(encoding="utf-8")
    assert path.name == "report.html"
    for name in ("weights.png", "traces.png", "projection.png"):
        assert (tmp_path / "run" / name).read_bytes().startswith(PNG_MAGIC)
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(imgs) == 3 and all(base64.b64decode(b).startswith(PNG_MAGIC) for b in imgs)
    assert "0.9750" in page and "sot (push-pull)" in page and "&quot;lam&quot;: 0.5" in page
    assert "http://" not in page and "https://" not in page  # nothing external
    assert not list((tmp_path / "run").glob(".*tmp"))  # no temporary files left


def test_weights_figure_handles_constant_and_zero_weights():
    png = R.figure_weights(np.array([0.0, 0.5, 0.5, 0.0]), np.array([True, False, False, False]), keep=0.5)
    assert png.startswith(PNG_MAGIC)
    png = R.figure_weights(np.full(4, 0.25), np.zeros(4, dtype=bool), keep=None)
    assert png.startswith(PNG_MAGIC)


def test_log10_weights_from_logits_survives_underflow():
    logits = np.array([0.0, -1.0, -2000.0, 3.0])
    w = np.exp(logits - logits.max())
    w /= w.sum()
    lw = R.log10_weights(w, logits)
    ok = w > 0
    np.testing.assert_allclose(lw[ok], np.log10(w[ok]), rtol=1e-12)
    expected = (-2000.0 - 3.0 - np.log(w.sum() / w[3])) / np.log(10)
    assert w[2] == 0.0 and np.isfinite(lw[2]) and lw[2] == pytest.approx(expected, rel=1e-6)
