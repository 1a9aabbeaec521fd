r"""Cross-set linkage audit: near-copies between the corpus, the safe anchor and the harmful reference.

SOT weighs three sets that must not be linked by accident (the linkage idea of LinkNBed, Trivedi et
al., ACL 2018, carried over from knowledge graphs to embedding sets):

* corpus rows that are near-copies of safe-anchor rows (**anchor leakage**) get high weight for
  the wrong reason — they are in the anchor, not merely like it;
* corpus rows that are near-copies of harmful-reference rows are certain contamination;
* duplicate clusters inside the corpus let one sample count many times in the transport problem;
* safe rows that are near-copies of harmful rows mean the anchor and the reference overlap.

**Links.** Rows are compared by cosine similarity :math:`s_{ij} = \hat a_i^\top \hat b_j` of their
L2-normalised embeddings :math:`\hat a = a / \lVert a\rVert` (normalised on the host in float64, by
the scale-free formula of :func:`sotjax.geometry.unit_rows`, then searched in float32). A *link* is a
pair with :math:`s_{ij} \ge \tau` (``threshold``, default 0.95), between two sets
(:data:`PAIRS`: corpus–safe, corpus–harmful, safe–harmful) or within the corpus (pairs
:math:`i < j`, a row is never linked to itself).

**Search.** :math:`S = \hat A \hat B^\top` is never formed: it is computed one ``block × block`` tile
at a time (one matrix product per tile; within the corpus only the tiles on and above the diagonal,
:math:`n^2/2` pairs), the last block zero-padded to the fixed tile shape (a zero row has cosine 0 with
everything, below any :math:`\tau > 0`). Each tile is reduced at once to its candidates, the entries
:math:`\ge \tau`, so memory is :math:`O((n_A + n_B)\,d)` for the unit rows plus one tile plus the
links. The per-row and per-column counts of entries :math:`\ge \tau` are exact.

**Top-k cap.** Each row keeps at most ``top_k`` links: a pair :math:`(i, j)` is reported when
:math:`j` is among the ``top_k`` most similar rows of :math:`i` above :math:`\tau`, *or* :math:`i`
among those of :math:`j` (ties broken by the lower row index). When no row has more than ``top_k``
neighbours above :math:`\tau` the result is therefore *every* pair above the threshold, exactly; a
pair can be missing only when both of its rows have more than ``top_k`` neighbours above
:math:`\tau`. Such rows are counted (:attr:`Links.truncated`, ``truncated_rows`` in the summary, and
a warning): give a larger ``top_k`` to list them all. Within a tile the same rule is applied with
``argpartition`` (a pair outside the tile's top-k of its row and of its column cannot be in either
row's global top-k), and the running candidate list is pruned by it whenever it grows beyond
:math:`O((n_A + n_B)\,k)` entries, so a corpus of many copies of one row stays bounded too. A
cluster of copies stays connected under the cap (each row keeps links to its ``top_k`` best).

**Mutual nearest neighbours.** A link is ``mutual`` when :math:`j` is the nearest row of :math:`i`
in the other set and :math:`i` the nearest of :math:`j` (both above :math:`\tau`): the
high-confidence one-to-one linkage. (Ranks 0 are exact whatever the cap.)

**Duplicate clusters.** The within-corpus links are the edges of a graph on the corpus rows; its
connected components (union–find, :func:`connected_components`) are the duplicate clusters.
:func:`dedup_groups` gives the cluster id of every corpus row, :func:`fit_dedup` collapses each
cluster to one representative (its first row) before :func:`sotjax.fit` and spreads the weight
back: member :math:`i` of cluster :math:`c` of size :math:`|c|` gets
:math:`w_i = w^{\mathrm{rep}}_c / |c|` and logit :math:`\ell^{\mathrm{rep}}_c - \log |c|`, so that
:math:`\sum_i w_i = 1` and ``weights == softmax(logits)`` on the full corpus. Duplicating a row
:math:`k` times then leaves every other row's weight unchanged and splits that row's weight
evenly over its copies.

**Backends.** ``"numpy"`` (BLAS on the host) or ``"jax"`` (one jitted tile program per tile
shape, the unit rows on the device, ``precision=HIGHEST`` so that a GPU does not round the
products through TF32). ``"auto"`` takes JAX on an accelerator and NumPy on a CPU, where the two
measured within noise of each other at n = 10⁵, d = 384 (``benchmarks/bench_audit.py``) and NumPy
avoids JAX's start-up and the device copy of the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sotjax.errors import SotjaxInputError, SotjaxWarning

SETS = ("corpus", "safe", "harmful")
#: the set pairs searched, in this order: within the corpus, then every cross-set pair
PAIRS: tuple[tuple[str, str], ...] = (("corpus", "corpus"), ("corpus", "safe"), ("corpus", "harmful"),
                                      ("safe", "harmful"))
DEFAULT_THRESHOLD = 0.95
DEFAULT_TOP_K = 32
DEFAULT_BLOCK_ROWS = 2048
BACKENDS = ("auto", "numpy", "jax")
#: rows normalised at a time (float64 work buffer of ``chunk × d``)
_NORMALISE_CHUNK = 8192


def pair_name(set_a: str, set_b: str) -> str:
    """``("corpus", "safe")`` -> ``"corpus-safe"`` (the key of a set pair in the summary)."""
    return f"{set_a}-{set_b}"


# ------------------------------------------------------------------------------------------ inputs
def unit_rows(x: Any, name: str = "x", chunk_rows: int = _NORMALISE_CHUNK) -> np.ndarray:
    r"""The rows of ``x`` L2-normalised, as a float32 ``(n, d)`` array; one :class:`SotjaxInputError`
    line naming ``name`` for a set that is not 2-D float, is empty, or has a non-finite value or an
    all-zero row (cosine undefined).

    ``x`` may be a memory-mapped ``.npy`` (float16, bfloat16, float32, float64; see
    :func:`sotjax.io.open_npy`): it is read ``chunk_rows`` rows at a time, each row scaled by its
    largest absolute value and then by its norm in float64 (:math:`\hat x = (x/m)/\lVert x/m\rVert`,
    :math:`m = \max_k |x_k|`: no overflow or underflow whatever the row's scale).
    """
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    if len(x.shape) != 2:
        raise SotjaxInputError(f"{name}: expected a 2-D array (samples x dim), got shape {tuple(x.shape)}")
    n, d = int(x.shape[0]), int(x.shape[1])
    if n == 0:
        raise SotjaxInputError(f"{name}: empty set (0 samples)")
    if d == 0:
        raise SotjaxInputError(f"{name}: embeddings have dimension 0")
    if np.dtype(x.dtype).kind not in "fiu" and "bfloat16" not in str(x.dtype):
        raise SotjaxInputError(f"{name}: expected float embeddings, got dtype {x.dtype}")
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk_rows):
        block = np.asarray(x[start:start + chunk_rows], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise SotjaxInputError(f"{name}: non-finite value (NaN or inf) in row {start + int(np.argmin(finite))}")
        scale = np.max(np.abs(block), axis=1, keepdims=True)
        if np.any(scale == 0):
            row = start + int(np.argmax(scale[:, 0] == 0))
            raise SotjaxInputError(f"{name}: row {row} is the zero vector (cosine undefined)")
        block /= scale
        block /= np.sqrt(np.sum(block * block, axis=1, keepdims=True))
        out[start:start + block.shape[0]] = block
    return out


def check_options(threshold: float, top_k: int, block_rows: int, backend: str) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise SotjaxInputError(f"--threshold: must be a cosine in (0, 1], got {threshold!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise SotjaxInputError(f"--top-k: must be a positive integer, got {top_k!r}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 8:
        raise SotjaxInputError(f"--block-rows: must be an integer >= 8, got {block_rows!r}")
    if backend not in BACKENDS:
        raise SotjaxInputError(f"--backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"jax"`` when JAX's default device is an accelerator, else ``"numpy"``."""
    if backend != "auto":
        return backend
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return "numpy"
    return "numpy" if jax.default_backend() == "cpu" else "jax"


# ------------------------------------------------------------------------------------------- tiles
class _NumpyTiles:
    """Tiles ``S = A[i0:i0+r] B[j0:j0+c]^T`` by NumPy (BLAS); the last blocks are simply shorter."""

    def __init__(self, a: np.ndarray, b: np.ndarray, rows: int, cols: int) -> None:
        self.a, self.b, self.rows, self.cols = a, b, rows, cols

    def __call__(self, i0: int, j0: int, diag: bool) -> tuple[np.ndarray, np.ndarray]:
        s = self.a[i0:i0 + self.rows] @ self.b[j0:j0 + self.cols].T
        if diag:  # within one set: keep j > i only (no self pairs, each pair once)
            s[np.tril_indices(s.shape[0], 0, s.shape[1])] = -np.inf
        return s, s.max(axis=1)


@functools.lru_cache(maxsize=1)
def _jax_tile_program() -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("rows", "cols", "diag"))
    def tile(a: Any, b: Any, i0: Any, j0: Any, *, rows: int, cols: int, diag: bool) -> tuple[Any, Any]:
        ab = jax.lax.dynamic_slice_in_dim(a, i0, rows)
        bb = jax.lax.dynamic_slice_in_dim(b, j0, cols)
        s = jnp.matmul(ab, bb.T, precision=jax.lax.Precision.HIGHEST)
        if diag:
            s = jnp.where(jnp.arange(cols)[None, :] > jnp.arange(rows)[:, None], s, -jnp.inf)
        return s, s.max(axis=1)

    return tile


class _JaxTiles:
    """Tiles by one jitted program of fixed shape ``(rows, cols)``: both sets zero-padded to whole
    blocks and put on the default device once; the tile's offsets are traced (no recompilation)."""

    def __init__(self, a: np.ndarray, b: np.ndarray | None, rows: int, cols: int) -> None:
        import jax

        def padded(x: np.ndarray, block: int) -> Any:
            n = -(-x.shape[0] // block) * block
            return jax.device_put(np.concatenate([x, np.zeros((n - x.shape[0], x.shape[1]), x.dtype)])
                                  if n > x.shape[0] else x)

        self.rows, self.cols = rows, cols
        self.a = padded(a, max(rows, cols) if b is None else rows)
        self.b = self.a if b is None else padded(b, cols)
        self.n_a, self.n_b = a.shape[0], (a if b is None else b).shape[0]
        self.program = _jax_tile_program()

    def __call__(self, i0: int, j0: int, diag: bool) -> tuple[Any, np.ndarray]:
        s, rowmax = self.program(self.a, self.b, i0, j0, rows=self.rows, cols=self.cols, diag=diag)
        rowmax = np.asarray(rowmax)[: max(0, min(self.rows, self.n_a - i0))]
        return _LazyTile(s, self.n_b - j0), rowmax


class _LazyTile:
    """A device tile fetched to the host only when one of its rows holds a candidate."""

    def __init__(self, s: Any, cols_valid: int) -> None:
        self.s, self.cols_valid = s, cols_valid

    def rows(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.s)[index, : self.cols_valid]


def _tile_candidates(s: Any, rowmax: np.ndarray, tau: float, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Candidates of one tile: ``(rows, cols, cosines)`` (tile-local indices) plus the exact counts of
    entries ``>= tau`` per hit row (``hit_rows``, ``row_counts``) and per column (``col_counts``).

    When a row or a column of the tile has more than ``k`` entries above ``tau``, only the pairs in
    the top ``k`` of their row or of their column are kept (see the module docstring)."""
    hit_rows = np.flatnonzero(rowmax >= tau)
    if hit_rows.size == 0:
        return None
    sub = s.rows(hit_rows) if isinstance(s, _LazyTile) else s[hit_rows]
    hit = sub >= tau
    row_counts = hit.sum(axis=1)
    col_counts = hit.sum(axis=0)
    if row_counts.max() <= k and col_counts.max() <= k:
        ri, cj = np.nonzero(hit)
    else:
        n_r, n_c = sub.shape
        kr, kc = min(k, n_c), min(k, n_r)
        top_r = np.argpartition(-sub, kr - 1, axis=1)[:, :kr]
        top_c = np.argpartition(-sub, kc - 1, axis=0)[:kc]
        keys = np.unique(np.concatenate([
            (np.repeat(np.arange(n_r), kr) * n_c + top_r.ravel()),
            (top_c.ravel() * n_c + np.tile(np.arange(n_c), kc)),
        ]))
        ri, cj = np.divmod(keys, n_c)
        keep = sub[ri, cj] >= tau
        ri, cj = ri[keep], cj[keep]
    return hit_rows[ri], cj, sub[ri, cj].astype(np.float32), hit_rows, row_counts, col_counts


def _ranks(a: np.ndarray, b: np.ndarray, cos: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each pair among the links of its first row and among those of its second row (0 = the
    most similar; ties by the other row's index). ``offset`` separates the two sets' row numbers
    (0 within one set, where both ends are rows of the same list)."""
    m = a.size
    node = np.concatenate([a, b + offset])
    other = np.concatenate([b + offset, a])
    key = np.concatenate([cos, cos])
    order = np.lexsort((other, -key, node))
    sorted_node = node[order]
    first = np.searchsorted(sorted_node, sorted_node, side="left")
    rank = np.empty(2 * m, dtype=np.int64)
    rank[order] = np.arange(2 * m) - first
    return rank[:m], rank[m:]


def _prune_limit(rows: int, k: int) -> int:
    """Candidates held before the running list is pruned to the top-k union (:func:`_prune`)."""
    return 4 * rows * k + (1 << 20)


def _prune(a: np.ndarray, b: np.ndarray, cos: np.ndarray, offset: int, k: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the pairs in the top ``k`` of at least one of their two rows."""
    ra, rb = _ranks(a, b, cos, offset)
    keep = (ra < k) | (rb < k)
    return a[keep], b[keep], cos[keep]


# ------------------------------------------------------------------------------------------ search
@dataclasses.dataclass(frozen=True)
class Links:
    """The links of one set pair (see the module docstring).

    Attributes:
      set_a, set_b: the two sets (equal for the within-corpus search).
      a, b: ``(m,)`` int64 row indices into ``set_a`` and ``set_b`` (``a < b`` within one set), sorted
        by ``(a, b)``.
      cosine: ``(m,)`` float32 cosine similarity, ``>= threshold``.
      mutual: ``(m,)`` bool: ``b`` is ``a``'s nearest row above the threshold and ``a`` is ``b``'s.
      count_a, count_b: exact number of rows of the other set with cosine ``>= threshold``, per row of
        ``set_a`` / ``set_b`` (within one set: the same array, the neighbours of each row).
      threshold, top_k: the search's settings.
    """

    set_a: str
    set_b: str
    a: np.ndarray
    b: np.ndarray
    cosine: np.ndarray
    mutual: np.ndarray
    count_a: np.ndarray
    count_b: np.ndarray
    threshold: float
    top_k: int

    @property
    def within(self) -> bool:
        return self.set_a == self.set_b

    @property
    def truncated(self) -> int:
        """Rows with more than ``top_k`` neighbours above the threshold (some of their links may be
        missing: those whose other row is truncated too)."""
        if self.within:
            return int(np.count_nonzero(self.count_a > self.top_k))
        return int(np.count_nonzero(self.count_a > self.top_k) + np.count_nonzero(self.count_b > self.top_k))

    def __len__(self) -> int:
        return int(self.a.size)

    def counts(self) -> dict[str, int]:
        """``links``, ``mutual``, ``rows_a``/``rows_b`` (rows with at least one link; ``rows`` within one
        set), ``truncated_rows``, and ``pairs_above_threshold`` (exact, from the counts)."""
        out = {"links": len(self), "mutual": int(np.count_nonzero(self.mutual))}
        if self.within:
            out["rows"] = int(np.count_nonzero(self.count_a))
            out["pairs_above_threshold"] = int(self.count_a.sum()) // 2
        else:
            out["rows_a"] = int(np.count_nonzero(self.count_a))
            out["rows_b"] = int(np.count_nonzero(self.count_b))
            out["pairs_above_threshold"] = int(self.count_a.sum())
        out["truncated_rows"] = self.truncated
        return out


def search_links(ua: np.ndarray, ub: np.ndarray | None, *, threshold: float = DEFAULT_THRESHOLD,
                 top_k: int = DEFAULT_TOP_K, block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "auto",
                 set_a: str = "a", set_b: str | None = None) -> Links:
    """The links between the unit rows ``ua`` and ``ub`` (``ub`` None: within ``ua``, pairs ``i < j``),
    by blocked matrix products (see the module docstring). ``ua``/``ub`` must already be unit rows
    (:func:`unit_rows`); :func:`find_links` normalises raw embeddings first."""
    check_options(threshold, top_k, block_rows, backend)
    backend = resolve_backend(backend)
    within = ub is None
    b = ua if ub is None else ub
    if b.shape[1] != ua.shape[1]:
        raise SotjaxInputError(f"{set_b}: embedding dimension {b.shape[1]} does not match {set_a}'s {ua.shape[1]}")
    n_a, n_b = ua.shape[0], b.shape[0]
    rows = int(min(block_rows, -(-n_a // 8) * 8))  # a tile no larger than the set (rounded up to 8 rows)
    cols = rows if within else int(min(block_rows, -(-n_b // 8) * 8))
    if backend == "jax":
        tiles: Any = _JaxTiles(ua, None if within else b, rows, cols)
    else:
        tiles = _NumpyTiles(ua, b, rows, cols)
    offset = 0 if within else n_a
    count_a = np.zeros(n_a, dtype=np.int64)
    count_b = count_a if within else np.zeros(n_b, dtype=np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    limit = _prune_limit(n_a + (0 if within else n_b), top_k)
    for i0 in range(0, n_a, rows):
        for j0 in range(i0 if within else 0, n_b, cols):
            s, rowmax = tiles(i0, j0, within and j0 == i0)
            got = _tile_candidates(s, rowmax, threshold, top_k)
            if got is None:
                continue
            ri, cj, cos, hit_rows, row_counts, col_counts = got
            count_a[i0 + hit_rows] += row_counts
            count_b[j0:j0 + col_counts.size] += col_counts
            found.append((ri + i0, cj + j0, cos))
            held += ri.size
            if held > limit:
                found = [_prune(*_joined(found), offset, top_k)]
                held = found[0][0].size
    a_idx, b_idx, cos = _prune(*_joined(found), offset, top_k)
    order = np.lexsort((b_idx, a_idx))
    a_idx, b_idx, cos = a_idx[order], b_idx[order], cos[order]
    ra, rb = _ranks(a_idx, b_idx, cos, offset)
    return Links(set_a=set_a, set_b=set_a if set_b is None else set_b, a=a_idx, b=b_idx,
                 cosine=np.minimum(cos, np.float32(1.0)), mutual=(ra == 0) & (rb == 0), count_a=count_a,
                 count_b=count_b, threshold=float(threshold), top_k=int(top_k))


def _joined(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate([f[0] for f in found]).astype(np.int64), np.concatenate([f[1] for f in found]).astype(
        np.int64), np.concatenate([f[2] for f in found]))


def find_links(a: Any, b: Any = None, *, threshold: float = DEFAULT_THRESHOLD, top_k: int = DEFAULT_TOP_K,
               block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "auto", names: tuple[str, str] = ("a", "b")
               ) -> Links:
    """The pairs of rows of ``a`` and ``b`` (``b`` None: pairs ``i < j`` within ``a``) whose cosine
    similarity is ``>= threshold``, each row keeping at most its ``top_k`` best (see the module
    docstring). ``a``/``b``: ``(n, d)`` float arrays or memory-mapped ``.npy`` files; ``names``
    are what errors and :class:`Links` call them."""
    check_options(threshold, top_k, block_rows, backend)
    ua = unit_rows(a, names[0])
    ub = None if b is None else unit_rows(b, names[1])
    return search_links(ua, ub, threshold=threshold, top_k=top_k, block_rows=block_rows, backend=backend,
                        set_a=names[0], set_b=names[0] if b is None else names[1])


# -------------------------------------------------------------------------------------- clusters
def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component id of each of ``n`` nodes of the graph with edges ``(i[e], j[e])``, by union–find.

    Vectorised union–find (hooking and pointer jumping): each round finds the root of both ends of
    every edge, hooks the larger root under the smaller (``parent[max] = min``, the smallest
    candidate wins), then compresses every path; it ends when every edge joins one root. Ids are
    ``0..c-1`` in the order of each component's first (smallest) node.
    """
    parent = np.arange(n, dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)

    def compress() -> None:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return
            parent[:] = grand

    while i.size:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            break
        ri, rj = ri[differ], rj[differ]
        i, j = i[differ], j[differ]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        compress()
    roots = parent
    _, ids = np.unique(roots, return_inverse=True)  # roots are each component's smallest node
    return ids.astype(np.int64)


# ------------------------------------------------------------------------------------------- audit
@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The linkage audit of a corpus against its safe anchor and harmful reference.

    Attributes:
      threshold, top_k, backend: the search's settings (``backend`` resolved).
      shapes: ``{set: (n, d)}`` of the sets given.
      links: ``{(set_a, set_b): Links}`` for every pair of :data:`PAIRS` whose sets were given.
      clusters: ``(n,)`` int64 duplicate-cluster id of every corpus row (``0..c-1`` by first row;
        a row without a within-corpus link is a cluster of its own).
      cluster_sizes: ``(c,)`` rows per cluster.
      timings: seconds per step (``normalise``, each pair, ``clusters``, ``total``).
      warnings: one line per finding the user should act on (anchor leakage, contamination,
        anchor/reference overlap, truncated rows); never any data, only counts.
    """

    threshold: float
    top_k: int
    backend: str
    shapes: dict[str, tuple[int, int]]
    links: dict[tuple[str, str], Links]
    clusters: np.ndarray
    cluster_sizes: np.ndarray
    timings: dict[str, float]
    warnings: tuple[str, ...]

    @property
    def representatives(self) -> np.ndarray:
        """Row index of the first row of each duplicate cluster (``(c,)``, increasing)."""
        return first_rows(self.clusters)

    def linked_rows(self, set_a: str, set_b: str, side: str = "a") -> np.ndarray:
        """Distinct rows of ``set_a`` (``side="a"``) or ``set_b`` with a link in the pair."""
        found = self.links.get((set_a, set_b))
        if found is None:
            return np.zeros(0, np.int64)
        return np.unique(found.a if side == "a" else found.b)

    def _linked_count(self, set_a: str, set_b: str, side: str) -> int | None:
        return int(self.linked_rows(set_a, set_b, side).size) if (set_a, set_b) in self.links else None

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json``: settings, shapes, counts per set pair, duplicate clusters
        (count, rows, largest, size histogram), leakage counts, warnings, timings."""
        sizes = self.cluster_sizes[self.cluster_sizes > 1]
        values, counts = np.unique(sizes, return_counts=True)
        n = self.clusters.size
        return {
            "threshold": self.threshold,
            "top_k": self.top_k,
            "backend": self.backend,
            "shapes": {name: ({"n": s[0], "dim": s[1]} if (s := self.shapes.get(name)) else None) for name in SETS},
            "pairs": {pair_name(*key): found.counts() for key, found in self.links.items()},
            "duplicates": {
                "clusters": int(sizes.size),
                "rows_in_clusters": int(sizes.sum()),
                "rows_after_dedup": int(self.cluster_sizes.size),
                "rows_removed_by_dedup": int(n - self.cluster_sizes.size),
                "largest": int(sizes.max()) if sizes.size else 1,
                "size_histogram": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
            },
            "leakage": {  # None: that pair was not searched (a set not given)
                "corpus_rows_linked_to_safe": self._linked_count("corpus", "safe", "a"),
                "safe_rows_linked_to_corpus": self._linked_count("corpus", "safe", "b"),
                "corpus_rows_linked_to_harmful": self._linked_count("corpus", "harmful", "a"),
                "safe_rows_linked_to_harmful": self._linked_count("safe", "harmful", "a"),
            },
            "warnings": list(self.warnings),
            "timings_s": dict(self.timings),
        }


def first_rows(groups: np.ndarray) -> np.ndarray:
    """The first row of each group id ``0..c-1`` (``(c,)``)."""
    groups = np.asarray(groups)
    c = int(groups.max()) + 1 if groups.size else 0
    first = np.full(c, groups.size, dtype=np.int64)
    np.minimum.at(first, groups, np.arange(groups.size, dtype=np.int64))
    return first


def audit_warnings(links: Mapping[tuple[str, str], Links], threshold: float) -> list[str]:
    """One line per finding: anchor leakage (corpus rows linked to safe rows), contamination (corpus
    rows linked to harmful rows), anchor/reference overlap (safe rows linked to harmful rows), and
    rows whose links were capped at ``top_k``. Counts only, never data."""
    out: list[str] = []
    at = f"cosine >= {threshold:g}"
    if (found := links.get(("corpus", "safe"))) is not None and len(found):
        out.append(f"anchor leakage: {np.unique(found.a).size} corpus row(s) are near-copies ({at}) of "
                   f"{np.unique(found.b).size} safe-anchor row(s); they get high weight for being in the anchor, "
                   "not for being safe: drop them from the corpus or from the anchor")
    if (found := links.get(("corpus", "harmful"))) is not None and len(found):
        out.append(f"contamination: {np.unique(found.a).size} corpus row(s) are near-copies ({at}) of "
                   f"{np.unique(found.b).size} harmful-reference row(s)")
    if (found := links.get(("safe", "harmful"))) is not None and len(found):
        out.append(f"anchor/reference overlap: {np.unique(found.a).size} safe-anchor row(s) are near-copies ({at}) "
                   f"of {np.unique(found.b).size} harmful-reference row(s)")
    for (set_a, set_b), found in links.items():
        if found.truncated:
            out.append(f"{pair_name(set_a, set_b)}: {found.truncated} row(s) have more than top_k = {found.top_k} "
                       f"neighbours at {at}; only each row's {found.top_k} best are listed (raise --top-k for all)")
    return out


def audit(corpus: Any, safe: Any = None, harmful: Any = None, *, threshold: float = DEFAULT_THRESHOLD,
          top_k: int = DEFAULT_TOP_K, block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "auto",
          names: Mapping[str, str] | None = None) -> AuditResult:
    """The linkage audit: links within the corpus and across every pair of the sets given
    (:data:`PAIRS`), duplicate clusters of the corpus, counts and warnings (module docstring).

    ``corpus``, ``safe``, ``harmful``: ``(n, d)`` float arrays or memory-mapped ``.npy`` files
    (``safe``/``harmful`` may be None: their pairs are skipped). ``names`` maps the sets to what
    error messages call them (e.g. their paths). Bad input is one :class:`SotjaxInputError` line.
    """
    check_options(threshold, top_k, block_rows, backend)
    t0 = time.perf_counter()
    labels = {**{s: s for s in SETS}, **(names or {})}
    raw = {"corpus": corpus, "safe": safe, "harmful": harmful}
    unit: dict[str, np.ndarray] = {}
    for name in SETS:
        if raw[name] is not None:
            unit[name] = unit_rows(raw[name], labels[name])
    d = unit["corpus"].shape[1]
    for name in ("safe", "harmful"):
        if name in unit and unit[name].shape[1] != d:
            raise SotjaxInputError(f"{labels[name]}: embedding dimension {unit[name].shape[1]} does not match "
                                   f"the corpus dimension {d}")
    backend = resolve_backend(backend)
    timings = {"normalise": time.perf_counter() - t0}
    links: dict[tuple[str, str], Links] = {}
    for set_a, set_b in PAIRS:
        if set_a not in unit or set_b not in unit:
            continue
        t = time.perf_counter()
        links[(set_a, set_b)] = search_links(
            unit[set_a], None if set_a == set_b else unit[set_b], threshold=threshold, top_k=top_k,
            block_rows=block_rows, backend=backend, set_a=set_a, set_b=set_b)
        timings[pair_name(set_a, set_b)] = time.perf_counter() - t
    t = time.perf_counter()
    within = links[("corpus", "corpus")]
    clusters = connected_components(unit["corpus"].shape[0], within.a, within.b)
    sizes = np.bincount(clusters)
    timings["clusters"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return AuditResult(threshold=float(threshold), top_k=int(top_k), backend=backend,
                       shapes={k: (int(v.shape[0]), int(v.shape[1])) for k, v in unit.items()}, links=links,
                       clusters=clusters, cluster_sizes=sizes, timings=timings,
                       warnings=tuple(audit_warnings(links, threshold)))


def dedup_groups(corpus: Any, threshold: float = DEFAULT_THRESHOLD, *, top_k: int = DEFAULT_TOP_K,
                 block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "auto", name: str = "corpus") -> np.ndarray:
    """Duplicate-cluster id of every corpus row: ``(n,)`` int64, ``0..c-1`` in order of each cluster's
    first row; rows linked by a chain of cosines ``>= threshold`` share an id (module docstring)."""
    links = find_links(corpus, None, threshold=threshold, top_k=top_k, block_rows=block_rows, backend=backend,
                       names=(name, name))
    return connected_components(links.count_a.size, links.a, links.b)


# ------------------------------------------------------------------------------------------ dedup
@dataclasses.dataclass(frozen=True)
class DedupFit:
    """A fit on one representative per duplicate cluster, spread back over the corpus.

    Attributes:
      weights: ``(n,)`` float64 weight of every corpus row: its representative's weight divided by
        its cluster's size (sums to 1).
      logits: ``(n,)`` float64, ``softmax(logits) == weights`` (representative's logit − log size).
      groups: ``(n,)`` cluster id per row; ``sizes``: ``(c,)`` rows per cluster.
      representatives: ``(c,)`` the row fitted for each cluster (its first row).
      result: the :class:`~sotjax.learn.SOTResult` of the fit on the representatives (its ``weights``
        are per cluster).
      audit: the :class:`AuditResult` the clusters came from (None when ``groups`` were given).
      warnings: the audit's warnings (anchor leakage first), also issued as :class:`SotjaxWarning`
        when ``warn``.
    """

    weights: np.ndarray
    logits: np.ndarray
    groups: np.ndarray
    sizes: np.ndarray
    representatives: np.ndarray
    result: Any
    audit: AuditResult | None
    warnings: tuple[str, ...]


def spread(values_per_cluster: np.ndarray, groups: np.ndarray, sizes: np.ndarray, *, logits: bool = False
           ) -> np.ndarray:
    r"""Spread per-cluster weights (``logits=False``: :math:`w_c/|c|`) or logits
    (``logits=True``: :math:`\ell_c - \log|c|`) back to the rows of each cluster."""
    v = np.asarray(values_per_cluster, dtype=np.float64)[groups]
    size = np.asarray(sizes, dtype=np.float64)[groups]
    return v - np.log(size) if logits else v / size


def fit_dedup(corpus: Any, safe: Any, harmful: Any, config: Any = None, *, threshold: float = DEFAULT_THRESHOLD,
              top_k: int = DEFAULT_TOP_K, block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "auto",
              groups: np.ndarray | None = None, linkage: AuditResult | None = None, warn: bool = True,
              progress: bool = False, callback: Callable[[int, dict[str, float]], None] | None = None,
              names: dict[str, str] | None = None) -> DedupFit:
    """:func:`sotjax.fit` with each within-corpus duplicate cluster collapsed to one mass.

    The clusters come from ``groups`` (a cluster id per corpus row, e.g. :func:`dedup_groups`), else
    from ``linkage`` (an :func:`audit` of these sets), else from an :func:`audit` run here at
    ``threshold`` (which also finds anchor leakage). The fit sees the first row of every cluster
    once; the weights are spread back by :func:`spread` (module docstring), so duplicating a row
    ``k`` times leaves every other row's weight unchanged and gives each copy ``1/k`` of its weight.
    ``config``: a :class:`~sotjax.SOTConfig` (None: the defaults); ``progress``, ``callback``,
    ``names`` go to :func:`sotjax.fit`.
    """
    from sotjax.config import SOTConfig
    from sotjax.learn import fit

    config = SOTConfig() if config is None else config
    if not (hasattr(corpus, "shape") and hasattr(corpus, "__getitem__")):
        corpus = np.asarray(corpus)
    label = (names or {}).get("corpus", "corpus")
    found: AuditResult | None = None
    if groups is None:
        found = linkage if linkage is not None else audit(
            corpus, safe if config.lam < 1.0 else None, harmful if config.lam > 0.0 else None,
            threshold=threshold, top_k=top_k, block_rows=block_rows, backend=backend, names=names)
        groups = found.clusters
    groups = np.asarray(groups)
    n = int(corpus.shape[0])
    if groups.shape != (n,) or groups.dtype.kind not in "iu" or (n and (groups.min() < 0)):
        raise SotjaxInputError(f"{label}: groups must be one non-negative integer cluster id per corpus row "
                               f"({n}), got {groups.dtype} {groups.shape}")
    _, groups = np.unique(groups, return_inverse=True)  # ids 0..c-1 (in order of the given ids)
    groups = groups.astype(np.int64).reshape(n)
    sizes = np.bincount(groups)
    reps = first_rows(groups)
    if reps.size < 2:
        raise SotjaxInputError(f"{label}: {reps.size} distinct row(s) after merging duplicates "
                               f"(cosine >= {threshold:g}); the fit needs at least 2")
    order = np.argsort(reps, kind="stable")  # fit the representatives in corpus order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    reps_sorted = reps[order]
    rows = corpus if reps_sorted.size == n else np.asarray(corpus[reps_sorted])
    result = fit(rows, safe, harmful, config, progress=progress, callback=callback, names=names)
    per_cluster_w = np.asarray(result.weights, dtype=np.float64)[rank]
    per_cluster_l = np.asarray(result.logits, dtype=np.float64)[rank]
    lines = tuple(found.warnings) if found is not None else ()
    if warn:
        for line in lines:
            warnings.warn(line, SotjaxWarning, stacklevel=2)
    return DedupFit(weights=spread(per_cluster_w, groups, sizes), logits=spread(per_cluster_l, groups, sizes,
                                                                                   logits=True),
                    groups=groups, sizes=sizes, representatives=reps, result=result, audit=found, warnings=lines)


# ------------------------------------------------------------------------------------------- files
def links_table(result: AuditResult, ids: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The columns of ``links.parquet``: ``id_a``, ``set_a``, ``id_b``, ``set_b`` (strings), ``cosine``
    (float32), ``row_a``, ``row_b`` (int64 row numbers), ``mutual`` (bool); pairs in :data:`PAIRS`
    order, then by ``(row_a, row_b)``. ``ids`` maps a set to its row ids (default: row numbers)."""
    ids = ids or {}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("id_a", "set_a", "id_b", "set_b", "cosine", "row_a",
                                                         "row_b", "mutual")}
    for (set_a, set_b), found in result.links.items():
        m = len(found)

        def named(set_name: str, rows: np.ndarray) -> np.ndarray:
            given = ids.get(set_name)
            if given is None:
                return rows.astype(str).astype(object)
            return np.asarray([str(v) for v in np.asarray(given, dtype=object)[rows]], dtype=object)

        cols["id_a"].append(named(set_a, found.a))
        cols["id_b"].append(named(set_b, found.b))
        cols["set_a"].append(np.full(m, set_a, dtype=object))
        cols["set_b"].append(np.full(m, set_b, dtype=object))
        cols["cosine"].append(found.cosine.astype(np.float32))
        cols["row_a"].append(found.a.astype(np.int64))
        cols["row_b"].append(found.b.astype(np.int64))
        cols["mutual"].append(found.mutual.astype(bool))
    empty = {"id_a": object, "set_a": object, "id_b": object, "set_b": object, "cosine": np.float32,
             "row_a": np.int64, "row_b": np.int64, "mutual": bool}
    return {k: (np.concatenate(v) if v else np.zeros(0, dtype=empty[k])) for k, v in cols.items()}


def summary_html(summary: Mapping[str, Any], *, page: bool = True) -> str:
    """A short self-contained HTML page of an audit summary: settings, the counts per set pair, the
    duplicate-cluster sizes and the warnings. Counts only: no id and no text of the data.
    ``page=False``: the ``<section>`` alone, to embed in another report."""
    esc = html.escape

    def table(head: list[str], rows: list[list[Any]]) -> str:
        th = "".join(f"<th>{esc(str(h))}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    shapes = summary.get("shapes", {})
    shape_rows = [[name, s["n"], s["dim"]] for name, s in shapes.items() if s]
    pair_rows = []
    for name, c in summary.get("pairs", {}).items():
        rows_a = c.get("rows", c.get("rows_a", ""))
        rows_b = c.get("rows", c.get("rows_b", ""))
        pair_rows.append([name, c["links"], c["pairs_above_threshold"], c["mutual"], rows_a, rows_b,
                          c["truncated_rows"]])
    dup = summary.get("duplicates", {})
    hist = [[size, count] for size, count in dup.get("size_histogram", {}).items()]
    leak = summary.get("leakage", {})
    warn = "".join(f"<li>{esc(str(w))}</li>" for w in summary.get("warnings", []))
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>sotjax linkage audit</title>',
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}th:first-child,td:first-child{text-align:left}.warn{color:#a40000}</style>",
        "</head><body>",
    ]
    parts = [
        "<section><h2>Linkage audit</h2>",
        f"<p>Links are pairs of rows with cosine similarity &ge; {esc(str(summary.get('threshold')))}"
        f" (each row keeps at most its {esc(str(summary.get('top_k')))} best).</p>",
        "<h3>Sets</h3>", table(["set", "rows", "dim"], shape_rows),
        "<h3>Links per set pair</h3>",
        table(["pair", "links listed", "pairs above threshold", "mutual nearest", "rows (a)", "rows (b)",
               "rows truncated"], pair_rows),
        "<h3>Leakage</h3>",
        table(["finding", "rows"], [[k.replace("_", " "), "not searched" if v is None else v]
                                    for k, v in leak.items()]),
        "<h3>Duplicate clusters in the corpus</h3>",
        f"<p>{esc(str(dup.get('clusters', 0)))} cluster(s) holding {esc(str(dup.get('rows_in_clusters', 0)))} rows;"
        f" largest {esc(str(dup.get('largest', 1)))}; deduplication keeps {esc(str(dup.get('rows_after_dedup', '')))}"
        " rows.</p>",
        table(["cluster size", "clusters"], hist) if hist else "<p>No duplicates.</p>",
        f'<h3>Warnings</h3><ul class="warn">{warn}</ul>' if warn else "",
        "</section>",
    ]
    if page:
        parts = [*head, *parts, "</body></html>"]
    return "\n".join(p for p in parts if p) + "\n"


def describe(summary: Mapping[str, Any]) -> str:
    """A few lines for the terminal: counts per set pair and the duplicate clusters."""
    lines = [f"links at cosine >= {summary['threshold']:g} (top_k {summary['top_k']}):"]
    for name, c in summary["pairs"].items():
        extra = f", {c['truncated_rows']} row(s) truncated" if c["truncated_rows"] else ""
        lines.append(f"  {name}: {c['links']} link(s), {c['mutual']} mutual{extra}")
    dup = summary["duplicates"]
    lines.append(f"  duplicate clusters: {dup['clusters']} holding {dup['rows_in_clusters']} rows (largest "
                 f"{dup['largest']}); dedup keeps {dup['rows_after_dedup']} rows")
    return "\n".join(lines)
