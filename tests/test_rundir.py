"""The run directory is one object: weigh, demo and eval'd runs carry one marker schema and are read
back by the one reader (:func:`sotjax.rundir.read_run`) with the right values; older runs stay
readable; a missing or malformed file is one line naming it.

Values are checked against what the test wrote or computes itself (the input ids and their order,
the shapes, ``softmax`` of the logits, the Top-K by logit, a pairwise AUROC), and the files are
also parsed here with json/pyarrow/numpy directly, not only through the code under test.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sotjax import rundir
from sotjax.cli import main
from sotjax.errors import SotjaxInputError
from sotjax.synthetic import make_problem

N, N_SAFE, N_HARMFUL, DIM, KEEP = 40, 8, 12, 6, 0.75
IDS = [f"doc-{(7 * i) % N:03d}" for i in range(N)]  # not sorted: the order must survive as written


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def _auroc(scores: np.ndarray, harmful: np.ndarray) -> float:
    b, h = scores[~harmful], scores[harmful]
    return float(((b[:, None] > h[None, :]) + 0.5 * (b[:, None] == h[None, :])).mean())


def _raw_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- weigh
@pytest.fixture(scope="module")
def problem():
    return make_problem(n=N, n_safe=N_SAFE, n_harmful=N_HARMFUL, dim=DIM, seed=5)


@pytest.fixture(scope="module")
def weigh_run(tmp_path_factory, problem):
    d = tmp_path_factory.mktemp("weigh")
    np.save(d / "corpus.npy", problem.corpus)
    np.save(d / "safe.npy", problem.safe)
    np.save(d / "harmful.npy", problem.harmful)
    (d / "ids.txt").write_text("".join(f"{i}\n" for i in IDS))
    out = d / "run"
    code = main(["weigh", "--no-progress", "--corpus", str(d / "corpus.npy"), "--ids", str(d / "ids.txt"),
                 "--safe", str(d / "safe.npy"), "--harmful", str(d / "harmful.npy"), "--out", str(out),
                 "--keep", str(KEEP), "--steps", "5"])
    assert code == 0
    return out


@pytest.fixture
def weigh_copy(weigh_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(weigh_run, out)
    return out


def test_weigh_run_carries_the_schema_and_reads_back(weigh_run, problem):
    marker = _raw_json(weigh_run / rundir.MARKER)
    assert marker == {"format": "sotjax-run", "version": 2, "schema": "sotjax.run/2", "kind": "weigh",
                      "files": ["conditioning.npz", "config.json", "selected_ids.npy", "stats.json",
                                "weights.parquet"]}
    assert _raw_json(weigh_run / "config.json")["schema"] == "sotjax.run/2"
    assert _raw_json(weigh_run / "stats.json")["schema"] == "sotjax.run/2"

    run = rundir.read_run(weigh_run)
    assert (run.kind, run.version, run.schema) == ("weigh", 2, rundir.SCHEMA) and run.schema == "sotjax.run/2"
    assert run.files == ("conditioning.npz", "config.json", "selected_ids.npy", "stats.json", "weights.parquet")
    assert run.ids == tuple(IDS) and run.n == N  # the input's ids, in the input's order
    assert run.weights.dtype == np.float64 and run.weights.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(run.weights, _softmax(run.logits), rtol=1e-5, atol=1e-12)
    k = int(np.floor(KEEP * N + 0.5))
    assert run.selected is not None and int(run.selected.sum()) == k
    best_first = [IDS[i] for i in np.argsort(-run.logits, kind="stable")[:k]]
    assert run.selected_ids == tuple(best_first)
    assert run.rank is not None and sorted(run.rank.tolist()) == list(range(N))
    assert run.train_weight is not None and run.train_weight[run.selected].mean() == pytest.approx(1.0)
    assert (run.train_weight[~run.selected] == 0).all()
    assert not run.selected[problem.is_harmful].any()
    assert run.keep == KEEP and run.config["sot"]["keep"] == KEEP
    assert run.stats is not None and run.stats["shapes"] == {"n": N, "dim": DIM, "n_safe": N_SAFE,
                                                             "n_harmful": N_HARMFUL}
    assert run.metrics is None and run.eval is None and run.benchmark_config is None and run.seed is None
    # the reader agrees with pyarrow read directly
    table = pq.read_table(weigh_run / "weights.parquet").to_pydict()
    assert table["id"] == IDS and np.array_equal(table["logit"], run.logits)


def test_eval_of_a_weigh_run_keeps_the_schema_and_reads_back(weigh_copy, problem, capsys):
    labels = weigh_copy.parent / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "label": "harmful" if h else "benign"}) + "\n"
                              for i, h in zip(IDS, problem.is_harmful, strict=True)))
    marker_before = (weigh_copy / rundir.MARKER).read_bytes()
    assert main(["eval", str(weigh_copy), "--labels", str(labels), "--no-baselines"]) == 0
    capsys.readouterr()
    assert (weigh_copy / rundir.MARKER).read_bytes() == marker_before  # still the weigh run, same schema
    assert _raw_json(weigh_copy / "eval.json")["schema"] == "sotjax.run/2"
    run = rundir.read_run(weigh_copy)
    assert (run.kind, run.schema) == ("weigh", "sotjax.run/2")
    assert run.eval is not None and run.eval["keep"] == KEEP and run.eval["k"] == int(np.floor(KEEP * N + 0.5))
    logits = np.asarray(pq.read_table(weigh_copy / "weights.parquet").column("logit").to_pylist())
    assert run.eval["metrics"]["SOT (this run)"]["auroc"] == pytest.approx(_auroc(logits, problem.is_harmful),
                                                                           abs=1e-12)
    assert rundir.is_run_dir(weigh_copy)  # a later weigh may still replace it


# -------------------------------------------------------------------------------------------- demo
def _pools():
    """Small benchmark pools (synthetic texts; no asset wheels needed)."""
    from sotjax.data.benchmark import Pools
    from sotjax.data.sources import BENIGN, HARMFUL, make_records

    topics = ["bread", "router", "python", "garden", "bicycle", "tea", "piano", "camera", "tokyo", "chess"]
    benign = [(f"How do I get started with {t}, question {j}?", f"Start small with {t} and practise daily, step {j}.")
              for t in topics for j in range(8)]
    harmful = [(f"zorbax kill vector {j} qux", f"grelm exploit payload {j} vortash") for j in range(40)]
    return Pools(benign=make_records(benign, BENIGN, "benign"),
                 contamination=make_records(harmful[:20], HARMFUL, "contamination"),
                 references={"many_shot": make_records(harmful[20:], HARMFUL, "reference")})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from sotjax import data
    from sotjax.commands import demo

    pools = _pools()
    patch = pytest.MonkeyPatch()
    patch.setattr(data, "build_benchmark", functools.partial(data.build_benchmark, pools=pools))
    d = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--features", "ngram", "--n-corpus", "50", "--n-safe", "8", "--n-harmful", "12",
                              "--p", "0.2", "--seed", "3", "--quiet", "--no-baselines", "--keep", "0.8",
                              "--cache-dir", str(d / "cache"), "--out", str(d / "run")])
    try:
        assert demo.run(args) == 0
        bm = data.build_benchmark(data.BenchmarkConfig(n_corpus=50, n_safe=8, n_harmful=12, p=0.2, seed=3))
        yield d / "run", bm, patch
    finally:
        patch.undo()


def test_demo_run_carries_the_same_schema_and_reads_back(demo_run, weigh_run):
    out, bm, _ = demo_run
    marker = _raw_json(out / rundir.MARKER)
    assert marker["schema"] == _raw_json(weigh_run / rundir.MARKER)["schema"] == "sotjax.run/2"
    assert marker["version"] == 2 and marker["kind"] == "demo"
    assert set(rundir.REQUIRED["demo"]) <= set(marker["files"]) <= set(rundir.FILES["demo"])
    run = rundir.read_run(out)
    assert (run.kind, run.schema) == ("demo", "sotjax.run/2")
    assert run.ids == tuple(bm.ids("corpus")) and run.n == 50
    assert run.weights.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(run.weights, _softmax(run.logits), rtol=1e-5, atol=1e-12)
    assert run.selected is not None and int(run.selected.sum()) == 40
    assert set(run.selected_ids or ()) == {i for i, s in zip(run.ids, run.selected, strict=True) if s}
    assert (run.keep, run.seed) == (0.8, 3) and run.benchmark_config == bm.config.to_dict()
    # the same stats.json shape as a weigh run, plus the benchmark's counts
    assert run.stats is not None and run.stats["shapes"] == {"n": 50, "dim": 256, "n_safe": 8, "n_harmful": 12}
    weigh_stats = rundir.read_run(weigh_run).stats
    assert weigh_stats is not None and set(weigh_stats) <= set(run.stats)
    assert run.stats["kept_harmful"] == int((run.selected & bm.is_harmful).sum())
    assert "embed" in run.stats["timings_s"]
    assert run.metrics is not None
    assert run.metrics["SOT (push-pull)"]["auroc"] == pytest.approx(_auroc(run.logits, bm.is_harmful), abs=1e-12)
    manifest = run.read_benchmark()
    assert manifest["id"].tolist() == [r["id"] for r in bm.manifest()]
    emb = run.read_embeddings()
    assert {k: v.shape for k, v in emb.items()} == {"corpus": (50, 256), "safe": (8, 256), "harmful": (12, 256)}


def test_eval_of_a_demo_run_reads_its_own_labels(demo_run, tmp_path, capsys):
    out, bm, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert main(["eval", str(copy)]) == 0  # labels from benchmark.parquet, baselines from embeddings.npz
    capsys.readouterr()
    assert _raw_json(copy / rundir.MARKER) == _raw_json(out / rundir.MARKER)
    run = rundir.read_run(copy)
    assert run.eval is not None and run.eval["schema"] == "sotjax.run/2" and run.eval["k"] == 40
    assert run.eval["metrics"]["SOT (this run)"]["auroc"] == pytest.approx(_auroc(run.logits, bm.is_harmful),
                                                                           abs=1e-12)
    assert "DSIR (n-gram → safe)" in run.eval["metrics"]  # the benchmark was rebuilt from config.json
    assert run.eval["notes"] == []
    # the same run as written before the schema (marker version 1): its labels are still its corpus rows
    _as_version_1(copy)
    assert main(["eval", str(copy), "--no-baselines"]) == 0
    capsys.readouterr()
    old = rundir.read_run(copy)
    assert old.schema == "sotjax.run/1" and old.eval is not None
    assert old.eval["metrics"]["SOT (this run)"]["auroc"] == run.eval["metrics"]["SOT (this run)"]["auroc"]


# ------------------------------------------------------------------------------------- older runs
def _as_version_1(run_dir):
    """Rewrite a run as sotjax wrote it before the schema: marker version 1, no "schema" keys."""
    marker = _raw_json(run_dir / rundir.MARKER)
    old = {"format": "sotjax-run", "version": 1, "kind": marker["kind"], "files": marker["files"]}
    (run_dir / rundir.MARKER).write_text(json.dumps(old))
    for name in ("config.json", "stats.json"):
        body = _raw_json(run_dir / name)
        del body["schema"]
        (run_dir / name).write_text(json.dumps(body))


def test_a_version_1_run_is_read_and_evaluated(weigh_copy, problem, capsys):
    _as_version_1(weigh_copy)
    run = rundir.read_run(weigh_copy)
    assert (run.kind, run.version, run.schema) == ("weigh", 1, "sotjax.run/1")
    assert run.ids == tuple(IDS) and run.keep == KEEP
    labels = weigh_copy.parent / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "label": "harmful" if h else "benign"}) + "\n"
                              for i, h in zip(IDS, problem.is_harmful, strict=True)))
    assert main(["eval", str(weigh_copy), "--labels", str(labels), "--no-baselines"]) == 0
    capsys.readouterr()
    assert rundir.read_run(weigh_copy).eval is not None
    assert _raw_json(weigh_copy / rundir.MARKER)["version"] == 1  # eval never rewrites the marker


def test_a_directory_without_marker_is_read_but_not_written(weigh_run, tmp_path, problem, capsys):
    bare = tmp_path / "copied"
    bare.mkdir()
    table = pq.read_table(weigh_run / "weights.parquet").select(["id", "weight", "logit"])
    pq.write_table(table, bare / "weights.parquet")
    run = rundir.read_run(bare)
    assert (run.kind, run.version, run.schema) == (None, None, None)
    assert run.ids == tuple(IDS) and run.rank is None and run.selected_ids is None and run.config == {}
    assert run.keep is None and run.stats is None
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "label": "harmful" if h else "benign"}) + "\n"
                              for i, h in zip(IDS, problem.is_harmful, strict=True)))
    assert main(["eval", str(bare), "--labels", str(labels), "--no-baselines", "--no-write"]) == 0
    assert "AUROC" in capsys.readouterr().out
    assert main(["eval", str(bare), "--labels", str(labels), "--no-baselines"]) == 2
    assert "--no-write" in capsys.readouterr().err
    assert sorted(p.name for p in bare.iterdir()) == ["weights.parquet"]


# ------------------------------------------------------------------------------ malformed / missing
def _set_json(name, change):
    def apply(run_dir):
        body = _raw_json(run_dir / name)
        (run_dir / name).write_text(json.dumps(change(body)))
    return apply


def _rewrite_weights(change):
    def apply(run_dir):
        table = pq.read_table(run_dir / "weights.parquet")
        pq.write_table(change(table), run_dir / "weights.parquet")
    return apply


MALFORMED = {
    "stats.json missing": (lambda d: (d / "stats.json").unlink(), "stats.json", "file not found"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{\n"), "config.json", "malformed JSON"),
    "config.json not an object": (lambda d: (d / "config.json").write_text("[1]"), "config.json",
                                  "expected a JSON object"),
    "config.json wrong schema": (_set_json("config.json", lambda b: {**b, "schema": "sotjax.run/9"}), "config.json",
                                 "field 'schema'"),
    "config.json sot": (_set_json("config.json", lambda b: {**b, "sot": [1]}), "config.json", "field 'sot'"),
    "config.json keep": (_set_json("config.json", lambda b: {**b, "sot": {**b["sot"], "keep": "most"}}),
                         "config.json", "field 'sot.keep'"),
    "stats.json no schema": (_set_json("stats.json", lambda b: {k: v for k, v in b.items() if k != "schema"}),
                             "stats.json", "field 'schema'"),
    "weights.parquet garbage": (lambda d: (d / "weights.parquet").write_bytes(b"not parquet"), "weights.parquet",
                                "not a readable Parquet file"),
    "weights.parquet missing": (lambda d: (d / "weights.parquet").unlink(), "weights.parquet", "file not found"),
    "weights column missing": (_rewrite_weights(lambda t: t.drop_columns(["logit"])), "weights.parquet",
                               "column 'logit' is missing"),
    "weights column type": (_rewrite_weights(lambda t: t.set_column(1, "weight", pa.array(["x"] * t.num_rows))),
                            "weights.parquet", "column 'weight' has type string"),
    "selected_ids garbage": (lambda d: (d / "selected_ids.npy").write_bytes(b"garbage"), "selected_ids.npy",
                             "not a readable .npy array"),
    "selected_ids count": (lambda d: np.save(d / "selected_ids.npy", np.array(IDS[:3])), "selected_ids.npy",
                           "holds 3 ids"),
    "marker not JSON": (lambda d: (d / rundir.MARKER).write_text("{"), rundir.MARKER, "not valid JSON"),
    "marker newer": (_set_json(rundir.MARKER, lambda b: {**b, "version": 99}), rundir.MARKER, "newer sotjax"),
    "marker kind": (_set_json(rundir.MARKER, lambda b: {**b, "kind": "train"}), rundir.MARKER, "field 'kind'"),
    "marker schema": (_set_json(rundir.MARKER, lambda b: {**b, "schema": "other/2"}), rundir.MARKER,
                      "field 'schema'"),
    "marker files": (_set_json(rundir.MARKER, lambda b: {**b, "files": [*b["files"], "../etc"]}), rundir.MARKER,
                     "field 'files'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_or_missing_file_is_one_line_naming_it(case, weigh_copy, capsys):
    damage, name, needle = MALFORMED[case]
    damage(weigh_copy)
    with pytest.raises(SotjaxInputError) as info:
        rundir.read_run(weigh_copy)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{weigh_copy / name}: ") and needle in message, message
    # the command line says the same in one line, exit code 2
    assert main(["eval", str(weigh_copy), "--labels", str(weigh_copy / "none.jsonl"), "--no-write"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sotjax eval: error: ") and str(weigh_copy / name) in err, err


def test_malformed_demo_files_name_the_file(demo_run, tmp_path):
    out, _, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    np.savez(copy / "embeddings.npz", corpus=np.zeros((50, 4), np.float32), safe=np.zeros((2, 4), np.float32))
    run = rundir.read_run(copy)
    with pytest.raises(SotjaxInputError, match=r"embeddings.npz: array\(s\) harmful missing"):
        run.read_embeddings()
    (copy / "metrics.json").write_text("nope")
    with pytest.raises(SotjaxInputError, match=r"metrics.json: line 1: malformed JSON"):
        rundir.read_run(copy)
    (copy / "metrics.json").unlink()
    with pytest.raises(SotjaxInputError, match=r"metrics.json: file not found \(listed in .sotjax-run\)"):
        rundir.read_run(copy)


def test_writer_refuses_files_outside_the_schema(tmp_path):
    with pytest.raises(ValueError, match="only files of sotjax.run/2"), \
            rundir.writing_run(tmp_path / "run", "weigh") as run:
        (run.path / "notes.txt").write_text("x")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- finetune
def _write_finetune(out, merged: bool):
    with rundir.writing_run(out, "finetune") as run:
        (run.path / "adapter").mkdir()
        (run.path / "adapter" / "adapter_model.safetensors").write_bytes(b"A")
        (run.path / "adapter" / "adapter_config.json").write_text("{}")
        (run.path / "config.json").write_text("{}")
        (run.path / "stats.json").write_text("{}")
        if merged:
            (run.path / "merged").mkdir()
            (run.path / "merged" / "model.safetensors").write_bytes(b"M")
            (run.path / "merged" / "config.json").write_text("{}")
            (run.path / "merged" / "tokenizer.json").write_text("{}")


def test_finetune_kind_nested_files_marker_and_replacement(tmp_path, weigh_copy):
    out = tmp_path / "ft"
    _write_finetune(out, merged=True)
    marker = _raw_json(out / rundir.MARKER)
    assert marker["kind"] == "finetune" and marker["schema"] == rundir.SCHEMA
    assert marker["files"] == sorted(["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json",
                                      "stats.json", "merged/config.json", "merged/model.safetensors",
                                      "merged/tokenizer.json"])
    assert rundir.parse_marker(out) == marker
    # a sotjax fine-tune directory with nested files is accepted and replaced by a new fine-tune
    rundir.check_output_dir(out, kind="finetune")
    _write_finetune(out, merged=False)
    assert not (out / "merged").exists()
    assert _raw_json(out / rundir.MARKER)["files"] == ["adapter/adapter_config.json",
                                                       "adapter/adapter_model.safetensors", "config.json", "stats.json"]
    # but a weigh/demo run never replaces it, nor a fine-tune a weigh run, nor anything with an extra file
    for target, kind in ((out, None), (out, "weigh"), (weigh_copy, "finetune")):
        with pytest.raises(SotjaxInputError, match="which a .* run does not replace") as info:
            rundir.check_output_dir(target, kind=kind)
        assert "\n" not in str(info.value)
    (out / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(SotjaxInputError, match="'adapter/notes.txt', which sotjax did not write there"):
        rundir.check_output_dir(out, kind="finetune")
    (out / "adapter" / "notes.txt").unlink()
    # read_run on a fine-tune directory: one line
    with pytest.raises(SotjaxInputError) as info:
        rundir.read_run(out)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{out}: is a sotjax finetune run; it has no weights.parquet")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "adapter/../../x", ".sotjax-run", "adapter//x", "a\\b"])
def test_finetune_marker_outside_paths_are_refused(tmp_path, name):
    out = tmp_path / "ft"
    _write_finetune(out, merged=False)
    body = _raw_json(out / rundir.MARKER)
    (out / rundir.MARKER).write_text(json.dumps({**body, "files": [*body["files"], name]}))
    with pytest.raises(SotjaxInputError) as info:
        rundir.parse_marker(out)
    message = str(info.value)
    assert "\n" not in message and "not a relative path inside the run" in message, message
    with pytest.raises(SotjaxInputError, match="has an invalid .sotjax-run marker") as info:
        rundir.check_output_dir(out, kind="finetune")
    assert "\n" not in str(info.value)
    assert (out / "config.json").is_file()  # refused, left untouched
