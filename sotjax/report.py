"""Self-contained HTML report of a weighting run (PNG plots embedded as base64).

Sections: the metrics table (SOT and baselines), the weight distributions of benign vs harmful
corpus rows (the paper's Fig. 3), the objective / pull / push traces, a 2-D PCA projection
coloured by set and by weight, and the run information (config, counts). Rows are referred to
by id only: no prompt or response text ever enters the report.

Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg
backend), so no global pyplot state or display is touched. Files are written atomically; in a run
directory they are written through :class:`sotjax.rundir.RunWriter` (the schema is documented there).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.atomic import write_bytes_atomic, write_text_atomic
from sotjax.io import to_jsonable

# Colours (colour-blind safe pairs).
_C_BENIGN = "#1f77b4"
_C_HARMFUL = "#d62728"
_C_SAFE = "#2ca02c"
_C_REF = "#ff7f0e"

METRIC_COLUMNS = (
    ("auroc", "AUROC ↑"),
    ("auprc", "AUPRC (harmful) ↑"),
    ("harmful_retention", "harmful kept in Top-K ↓"),
    ("benign_recall", "benign kept in Top-K ↑"),
    ("harmful_weight_mass", "harmful weight mass ↓"),
)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` on its first two principal axes (centred SVD, deterministic signs).

    ``X − mean = U S Vᵀ``; returns ``(X − mean) V[:, :2]``, each axis's sign fixed so that its
    largest-magnitude loading is positive.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    v = vt[:2].T.copy()
    if v.shape[1] < 2:  # 1-D data: pad a zero axis
        v = np.concatenate([v, np.zeros((v.shape[0], 2 - v.shape[1]))], axis=1)
    for j in range(v.shape[1]):
        if v[np.argmax(np.abs(v[:, j])), j] < 0:
            v[:, j] = -v[:, j]
    return xc @ v


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def log10_weights(weights: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """log10 of the simplex weights; from the logits when given (``log w = ℓ − logsumexp ℓ``),
    which stays finite where the weights themselves underflow to 0."""
    if logits is not None:
        lg = np.asarray(logits, dtype=np.float64)
        m = lg.max()
        return (lg - (m + np.log(np.exp(lg - m).sum()))) / np.log(10.0)
    w = np.asarray(weights, dtype=np.float64)
    return np.log10(np.maximum(w, np.finfo(np.float64).tiny))


def figure_weights(
    weights: np.ndarray, is_harmful: np.ndarray, keep: float | None = 0.8, logits: np.ndarray | None = None
) -> bytes:
    """Histograms of log10 weight for benign vs harmful corpus rows, with the Top-K cut-off."""
    lw = log10_weights(weights, logits)
    y = np.asarray(is_harmful, dtype=bool)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(lw.min()), float(lw.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    ax.hist(lw[~y], bins=bins, color=_C_BENIGN, alpha=0.6, label=f"benign (n={int((~y).sum())})")
    if y.any():
        ax.hist(lw[y], bins=bins, color=_C_HARMFUL, alpha=0.6, label=f"harmful (n={int(y.sum())})")
    if keep is not None and 0 < keep < 1:
        k = max(1, int(math.floor(keep * lw.size + 0.5)))
        cut = np.sort(lw)[::-1][k - 1]
        ax.axvline(cut, color="k", ls="--", lw=1, label=f"Top-{keep:.0%} cut-off")
    ax.set_xlabel("log10 weight")
    ax.set_ylabel("corpus rows")
    ax.set_title("Learned weights: benign vs injected harmful")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def figure_traces(objective: Sequence[float], pull: Sequence[float], push: Sequence[float]) -> bytes:
    """Objective, pull term OT(P(w), Q) and push term OT(P(w), M) per outer step."""
    fig = _figure(9.0, 2.8)
    series = (
        ("objective", objective, "k"),
        ("pull: OT to safe anchor", pull, _C_SAFE),
        ("push: OT to harmful", push, _C_REF),
    )
    for i, (title, values, colour) in enumerate(series, start=1):
        ax = fig.add_subplot(1, 3, i)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size:
            ax.plot(np.arange(v.size), v, color=colour, lw=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    return _png(fig)


def figure_projection(
    corpus: np.ndarray,
    safe: np.ndarray,
    harmful: np.ndarray,
    weights: np.ndarray,
    is_harmful: np.ndarray,
    logits: np.ndarray | None = None,
) -> bytes:
    """PCA of all embeddings (unit-normalised): left coloured by set, right corpus by weight percentile.

    The percentile (rank of log w among the corpus, 0 = lowest, 100 = highest) is readable even
    when the weights span hundreds of orders of magnitude.
    """
    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    n, ns = corpus.shape[0], safe.shape[0]
    xy = pca_2d(np.concatenate([unit(corpus), unit(safe), unit(harmful)], axis=0))
    pc, ps, ph = xy[:n], xy[n:n + ns], xy[n + ns:]
    y = np.asarray(is_harmful, dtype=bool)
    fig = _figure(10.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(ph[:, 0], ph[:, 1], s=8, c=_C_REF, alpha=0.5, label="harmful reference", marker="x")
    ax.scatter(pc[~y, 0], pc[~y, 1], s=6, c=_C_BENIGN, alpha=0.5, label="corpus benign")
    ax.scatter(pc[y, 0], pc[y, 1], s=10, c=_C_HARMFUL, alpha=0.8, label="corpus harmful")
    ax.scatter(ps[:, 0], ps[:, 1], s=30, c=_C_SAFE, edgecolors="k", linewidths=0.5, label="safe anchor", marker="*")
    ax.set_title("PCA of features, by set", fontsize=10)
    ax.legend(loc="best", fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    lw = log10_weights(weights, logits)
    from sotjax.eval.metrics import midranks

    pct = 100.0 * (midranks(lw) - 1) / max(1, lw.size - 1)
    sc = ax2.scatter(pc[:, 0], pc[:, 1], s=7, c=pct, cmap="viridis", vmin=0, vmax=100)
    ax2.scatter(
        pc[y, 0], pc[y, 1], s=22, facecolors="none", edgecolors=_C_HARMFUL, linewidths=0.6, label="harmful (ring)"
    )
    fig.colorbar(sc, ax=ax2, label="weight percentile in the corpus")
    ax2.set_title("corpus, coloured by learned weight", fontsize=10)
    ax2.legend(loc="best", fontsize=7)
    return _png(fig)


def _fmt(x: Any) -> str:
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x):
        m, s = x
        return "–" if math.isnan(m) else f"{m:.4f} ± {s:.4f}"
    if isinstance(x, (int, float, np.floating)):
        return "–" if math.isnan(float(x)) else f"{float(x):.4f}"
    return html.escape(str(x))


def metrics_table_html(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """HTML table: one row per method, the columns of :data:`METRIC_COLUMNS` (values or (mean, std))."""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in METRIC_COLUMNS)
    rows = []
    for method, vals in metrics.items():
        cells = "".join(f"<td>{_fmt(vals[key]) if key in vals else '–'}</td>" for key, _ in METRIC_COLUMNS)
        rows.append(f"<tr><th scope='row'>{html.escape(str(method))}</th>{cells}</tr>")
    return f"<table class='metrics'><thead><tr><th>method</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def metrics_table_markdown(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """The same table in Markdown (for RESULTS files and terminal summaries)."""
    head = "| method | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
    sep = "|---|" + "---|" * len(METRIC_COLUMNS)
    lines = [head, sep]
    for method, vals in metrics.items():
        cells = " | ".join(_fmt(vals[key]) if key in vals else "–" for key, _ in METRIC_COLUMNS)
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


_CSS = (
    "\n"
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}\n"
    "h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}\n"
    "table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\n"
    "th[scope=row],thead th:first-child{text-align:left} img{max-width:100%} "
    "pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.8em}\n"
    ".note{color:#555;font-size:.9em}\n"
)


#: what each figure shows and how to read it (under the figure in ``report.html``)
FIGURE_NOTES = {
    "weights": (
        "Histogram of log10 of each corpus row's weight (x axis logarithmic). The learned weights span many orders "
        "of magnitude: minimising the push-pull objective concentrates the mass on the rows that best match the safe "
        "anchor and lie farthest from the harmful reference, and the rest fall to tiny but non-zero weights (computed "
        "from the logits, so nothing underflows). On a linear axis every row but a few would sit at 0. What counts for "
        "the selection is the order: rows right of the dashed line are the Top-K kept."),
    "traces": (
        "pull = OT cost from the weighted corpus to the safe anchor, push = OT cost to the harmful reference; the "
        "optimiser lowers objective = (1-λ)·pull − λ·push. Pull can rise while the objective still falls: as the "
        "weights collapse onto a few rows, those rows' distance from the harmful reference (push) grows faster than "
        "their mismatch with the whole anchor (pull), so the trade lowers the objective although the weighted corpus "
        "covers the anchor less evenly."),
    "projection": (
        "First two principal axes of the features the cost sees (after conditioning); left by set, right the corpus "
        "coloured by the percentile of its weight. A 2-D view: overlap here need not mean overlap in all dimensions."),
}


def interpretation(metrics: Mapping[str, Mapping[str, Any]], sot_name: str, *, keep: float, n_injected: int,
                   features: str, conditioning: str) -> list[str]:
    """Plain-language reading of a demo's metrics: what the numbers mean, SOT next to the baselines and
    ablations, and the caveats that apply (the measured text-length baseline, the features used)."""
    m = metrics[sot_name]
    kept = int(round(float(m["harmful_retention"]) * n_injected))
    out = [f"AUROC {m['auroc']:.3f} is the chance that a random benign row ranks above a random injected harmful row "
           f"(0.5 = a coin flip, 1 = every harmful row ranked last); SOT's Top-{keep:.0%} keeps {kept} of the "
           f"{n_injected} injected harmful rows."]
    others = {k: v for k, v in metrics.items() if k != sot_name and "λ=" not in k and k != "random"
              and np.isfinite(v.get("auroc", float("nan")))}
    if others:
        best = max(others, key=lambda k: others[k]["auroc"])
        b = others[best]
        verdict = "above" if m["auroc"] > b["auroc"] else "below"
        out.append(f"Best baseline: {best} (AUROC {b['auroc']:.3f}, keeps "
                   f"{int(round(float(b['harmful_retention']) * n_injected))}); SOT is {verdict} it.")
    ablations = [k for k in metrics if "λ=" in k]
    if ablations:
        parts = ", ".join(f"{k} {metrics[k]['auroc']:.3f}" for k in ablations)
        out.append(f"One-sided ablations (AUROC): {parts}; the paper's claim is that push-pull beats both.")
    length = metrics.get("text length (sanity)")
    if length is not None and np.isfinite(length["auroc"]) and length["auroc"] >= 0.75:
        out.append(f"Caveat: ranking by text length alone (shorter = keep) scores AUROC {length['auroc']:.3f} here: "
                   "this benchmark's benign dialogue is short and its harmful answers long, so a high AUROC on it "
                   "does not by itself show that a method reads content. benchmarks/RESULTS_quality.md reports a "
                   "length-matched benchmark (benign domain 'tasks') where length is no help.")
    if conditioning == "raw":
        out.append(f"Features: {features}, raw (the paper's exact setting). Raw LLM last-token states are dominated "
                   "by a few huge dimensions that wash out every cosine; the default conditioning removes them "
                   "(README, Feature conditioning).")
    else:
        out.append(f"Features: {features}, conditioned with '{conditioning}' (label-free, fitted on the three sets; "
                   "--conditioning raw gives the paper's raw features).")
    return out


def render_html(
    title: str,
    metrics: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, bytes],
    info: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    reading: Sequence[str] = (),
    figure_notes: Mapping[str, str] | None = None,
) -> str:
    """Assemble the report. ``figures`` maps a caption to PNG bytes (embedded as base64);
    ``reading`` is the interpretation section; ``figure_notes`` a note under each captioned figure."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for note in notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Selection quality</h2>")
    parts.append(metrics_table_html(metrics))
    parts.append(
        "<p class='note'>AUROC: weights/scores separating benign (higher) from injected harmful rows, ties ½. "
        "AUPRC: average precision for flagging harmful rows by low score. Top-K metrics use the expected "
        "value under random tie-breaking. Harmful weight mass: share of the simplex weight on harmful rows.</p>"
    )
    if reading:
        parts.append("<h2>What these numbers mean</h2><ul>")
        parts.extend(f"<li>{html.escape(line)}</li>" for line in reading)
        parts.append("</ul>")
    for caption, png in figures.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>{html.escape(caption)}</h2>"
            f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        )
        fig_note = (figure_notes or {}).get(caption)
        if fig_note:
            parts.append(f"<p class='note'>{html.escape(fig_note)}</p>")
    if info:
        parts.append("<h2>Run information</h2><pre>")
        parts.append(html.escape(json.dumps(to_jsonable(info), indent=2, sort_keys=True, default=str)))
        parts.append("</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(
    out_dir: str | Path,
    *,
    weights: np.ndarray,
    is_harmful: np.ndarray,
    metrics: Mapping[str, Mapping[str, Any]],
    objective: Sequence[float] = (),
    pull: Sequence[float] = (),
    push: Sequence[float] = (),
    corpus: np.ndarray | None = None,
    safe: np.ndarray | None = None,
    harmful: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    keep: float | None = 0.8,
    info: Mapping[str, Any] | None = None,
    title: str = "sotjax: SOT push-pull sample weighting report",
    notes: Sequence[str] = (),
    reading: Sequence[str] = (),
) -> Path:
    """Write ``report.html`` and the PNGs (``weights.png``, ``traces.png``, ``projection.png``).

    Each file is written atomically. The projection is drawn only when all three embedding
    sets are given. Returns the path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, bytes] = {}
    files: dict[str, str] = {}
    weights_caption = "Weight distributions, benign vs harmful (cf. paper Fig. 3)"
    figures[weights_caption] = figure_weights(weights, is_harmful, keep, logits)
    files[weights_caption] = "weights.png"
    if len(objective):
        figures["Objective, pull and push per step"] = figure_traces(objective, pull, push)
        files["Objective, pull and push per step"] = "traces.png"
    if corpus is not None and safe is not None and harmful is not None:
        figures["2-D projection (PCA)"] = figure_projection(corpus, safe, harmful, weights, is_harmful, logits)
        files["2-D projection (PCA)"] = "projection.png"
    for caption, png in figures.items():
        write_bytes_atomic(out / files[caption], png)
    notes_by_caption = {c: FIGURE_NOTES[f.removesuffix(".png")] for c, f in files.items()}
    page = render_html(title, metrics, figures, info=info, notes=notes, reading=reading,
                       figure_notes=notes_by_caption)
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
