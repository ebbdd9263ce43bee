"""Reference sparse MLA decode attention (pure jnp, float32 accumulation).

This is the *oracle* for decode context parallelism (``jaxkv.dcp``) and for the demo, not a
production kernel.  Two layers:

* ``attend(q, kv, valid)`` — low-level: one query token per request against dequantized latent rows
  and a validity mask.  Returns the normalized output and the log-sum-exp.  DCP calls it on each
  rank's local shard and merges the partial results.
* ``sparse_decode(q, cache, layer, ...)`` — reads a jaxkv ``Cache`` (``get_tokens`` +
  ``formats.dequantize``) and attends over what the model's sparse attention sees:

  - DSv4: the sliding window (last ``geo.swa_window`` positions, ``swa`` pool) of every layer,
    plus on a C4 layer the top-k C4 tokens chosen by the indexer (``c4_indexer`` keys), plus on a
    C128 layer every C128 token;
  - V3.2 (DSA): the top-k tokens of the ``kv`` pool chosen by the indexer (``indexer`` keys).

MLA convention (one latent KV head, "absorbed" decode)
  ``K`` is the whole dequantized row (``fmt.width`` wide: DSv4 512 = 448 nope + 64 RoPE; V3.2
  576 = 512 nope + 64 RoPE), so ``q`` is ``f32[B, h, fmt.width]``.  ``V`` is the first
  ``dv = 512`` columns: for DSv4 the whole latent (448 nope + 64 RoPE, as DSv4 shares K = V), for
  V3.2 the 512 nope columns.  Scores are ``scale * q . k`` with ``scale`` defaulting to
  ``fmt.width ** -0.5``.

Output
  ``out f32[B, h, dv]`` (softmax-normalized, 0 where a request has no valid key) and
  ``lse f32[B, h]`` = log-sum-exp of the scaled scores (natural log for ``base="e"``; log2 of
  sum exp2 of ``scores * log2(e)`` for ``base="2"``, i.e. ``lse_e * log2(e)``); ``-inf`` where there
  are no keys.

Paged addressing
  A request's tokens of one pool are found through a block table: position ``p`` of the pool's own
  sequence (full positions for ``swa``/``kv``, compressed positions ``f // 4`` / ``f // 128`` for
  ``c4``/``c128``) lives at location ``block_table[p // block] * block + p % block`` with
  ``block`` = the pool's tokens per page (SPEC §4: compressed pages line up 1:1 with full pages, so
  one full-page block table serves ``c4``, ``c128`` and ``c4_indexer``).  Under DCP the same table
  holds *virtual* block ids (each covering ``block * N`` positions, SPEC §9), see ``jaxkv.dcp``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import formats as F
from jaxkv import locs as L
from jaxkv.cache import Cache, get_tokens

__all__ = ["attend", "indexer_scores", "select_topk", "paged_locs", "sparse_decode", "gather_kv",
           "Placement", "DV", "LOG2E"]

DV = 512  # value width of the MLA latent (both models)
LOG2E = math.log2(math.e)
_HI = jax.lax.Precision.HIGHEST


def _check_base(base: str) -> str:
    if base not in ("e", "2"):
        raise ValueError(f"base must be 'e' or '2', got {base!r}")
    return base


def attend(q: jax.Array, kv: jax.Array, valid: jax.Array, *, dv: int = DV,
           scale: float | None = None, base: str = "e") -> tuple[jax.Array, jax.Array]:
    """Single-token decode attention of ``h`` query heads over one latent KV head.

    Args:
      q: float[B, h, D] queries (computed in float32).
      kv: float[B, T, D] dequantized latent rows: K = the whole row, V = ``kv[..., :dv]``.
      valid: bool[B, T]; invalid rows are ignored (their content may be anything finite or not).
      dv: value width (512).
      scale: softmax scale on ``q . k`` (default ``D ** -0.5``).
      base: ``"e"`` or ``"2"`` (the base of the returned ``lse``).

    Returns:
      ``(out f32[B, h, dv], lse f32[B, h])``.  Rows with no valid key give ``out = 0`` and
      ``lse = -inf`` (never NaN).
    """
    _check_base(base)
    q = jnp.asarray(q, jnp.float32)
    kv = jnp.asarray(kv, jnp.float32)
    valid = jnp.asarray(valid, bool)
    if q.ndim != 3 or kv.ndim != 3 or valid.ndim != 2:
        raise ValueError(f"q must be [B, h, D], kv [B, T, D], valid [B, T]; got {q.shape}, "
                         f"{kv.shape}, {valid.shape}")
    if q.shape[0] != kv.shape[0] or q.shape[2] != kv.shape[2] or valid.shape != kv.shape[:2]:
        raise ValueError(f"shapes disagree: q {q.shape}, kv {kv.shape}, valid {valid.shape}")
    if not 0 < dv <= kv.shape[2]:
        raise ValueError(f"dv must be in (0, {kv.shape[2]}], got {dv}")
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    kv = jnp.where(valid[..., None], kv, 0.0)  # garbage in invalid rows never reaches a product
    s = jnp.einsum("bhd,btd->bht", q, kv, precision=_HI) * jnp.float32(scale)
    if base == "2":
        s = s * jnp.float32(LOG2E)
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    exp, log = (jnp.exp, jnp.log) if base == "e" else (jnp.exp2, jnp.log2)
    p = jnp.where(valid[:, None, :], exp(s - m_safe[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    has = denom > 0
    out = jnp.einsum("bht,btd->bhd", p, kv[..., :dv], precision=_HI)
    out = jnp.where(has[..., None], out / jnp.where(has, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m_safe + log(jnp.where(has, denom, 1.0)), -jnp.inf)
    return out, lse


def indexer_scores(index_q: jax.Array, index_w: jax.Array, keys: jax.Array,
                   valid: jax.Array) -> jax.Array:
    """DSA lightning-indexer scores ``sum_h w_h * relu(q_h . k_t)``.

    Args:
      index_q: float[B, Hi, Di] indexer queries.
      index_w: float[B, Hi] per-head weights.
      keys: float[B, T, Di] dequantized indexer keys.
      valid: bool[B, T].

    Returns:
      f32[B, T]; ``-inf`` where invalid.
    """
    qk = jnp.einsum("bhd,btd->bht", jnp.asarray(index_q, jnp.float32),
                    jnp.asarray(keys, jnp.float32), precision=_HI)
    s = jnp.einsum("bh,bht->bt", jnp.asarray(index_w, jnp.float32), jnp.maximum(qk, 0.0),
                   precision=_HI)
    return jnp.where(valid, s, -jnp.inf)


def select_topk(scores: jax.Array, k: int) -> jax.Array:
    """Top-``k`` candidate indices by score: int32[B, k], ``-1`` for slots beyond the valid ones.

    Candidates with score ``-inf`` (invalid) are never selected.  ``k`` larger than the number of
    candidates pads with -1.
    """
    B, T = scores.shape
    kk = min(int(k), T)
    if kk < 1:
        return jnp.full((B, int(k)), -1, jnp.int32)
    vals, idx = jax.lax.top_k(scores, kk)
    idx = jnp.where(jnp.isfinite(vals), idx.astype(jnp.int32), -1)
    if kk < k:
        idx = jnp.concatenate([idx, jnp.full((B, k - kk), -1, jnp.int32)], axis=1)
    return idx


def paged_locs(positions: jax.Array, block_table: jax.Array, block: int) -> jax.Array:
    """Pool locations of per-request positions through a block table.

    Args:
      positions: int32[B, T] positions (-1 = none).
      block_table: int32[B, P] block ids (-1 = none).
      block: tokens per block (``block * N`` under DCP for a *global* loc).

    Returns:
      int32[B, T]: ``block_table[b, p // block] * block + p % block``; -1 where the position is -1,
      its block index is beyond ``P`` or the block id is negative (never clipped or wrapped).
    """
    pos = jnp.asarray(positions, jnp.int32)
    bt = jnp.asarray(block_table, jnp.int32)
    P = bt.shape[1]
    j = pos // block
    ok = (pos >= 0) & (j < P)
    ids = jnp.take_along_axis(bt, jnp.where(ok, j, 0), axis=1)
    ok = ok & (ids >= 0)
    return jnp.where(ok, ids * block + pos % block, -1)


class Placement(NamedTuple):
    """Where this computation runs in a DCP group (``n = 1``: a plain single-device cache).

    Attributes:
      n: DCP size N.
      rank: this rank (int or a traced int32 scalar, e.g. ``lax.axis_index``).
      interleave: per sharded pool, interleave I in that pool's tokens (``()`` = 1 everywhere).
    """

    n: int = 1
    rank: object = 0
    interleave: tuple[tuple[str, int], ...] = ()

    def inter(self, pool: str) -> int:
        return dict(self.interleave).get(pool, 1)


_SINGLE = Placement()


def _read_rows(cache: Cache, pool: str, layer: int, locs: jax.Array, impl: str):
    """Dequantized rows f32[B, T, W] of pool ``pool`` at int32[B, T] locations (-1 -> zeros)."""
    spec = cache.layout.pool(pool).spec
    B, T = locs.shape
    toks = get_tokens(cache, pool, spec.local_layer(layer), locs.reshape(-1), impl=impl)
    rows = F.dequantize(spec.fmt, toks)
    return rows.reshape(B, T, -1)


def _local_range(lo_len, hi_len, count: int):
    """Local positions ``[lo, hi)`` padded to ``count``: int32[B, count] (-1 beyond hi)."""
    j = lo_len[:, None] + jnp.arange(count, dtype=jnp.int32)[None, :]
    return jnp.where(j < hi_len[:, None], j, -1)


def _localize(pos, pl: Placement, pool: str):
    """Global positions -> this rank's local positions (-1 where not owned)."""
    if pl.n == 1:
        return pos
    I = pl.inter(pool)
    own = L.dcp_owner(pos, pl.n, I) == pl.rank
    # Local position inside this rank's own sequence: (p // (I*N)) * I + p % I.
    return jnp.where(own & (pos >= 0), (pos // (I * pl.n)) * I + pos % I, -1)


def _topk_positions(cache: Cache, layer: int, index_pool: str, cand_len, block_table, tpp: int,
                    n: int, index_q, index_w, topk: int, impl: str):
    """Global top-k positions chosen by the (replicated) indexer: int32[B, topk], -1 padded."""
    B, P = block_table.shape
    T = P * tpp * n
    pos = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = jnp.where(pos < cand_len[:, None], pos, -1)
    pos = jnp.broadcast_to(pos, (B, T))
    locs = paged_locs(pos, block_table, tpp * n)  # the replicated indexer holds global locs
    keys = _read_rows(cache, index_pool, layer, locs, impl)
    scores = indexer_scores(index_q, index_w, keys, locs >= 0)
    return select_topk(scores, topk)


def gather_kv(cache: Cache, layer: int, *, seq_lens: jax.Array, block_table: jax.Array,
              swa_block_table: jax.Array | None = None, index_q: jax.Array | None = None,
              index_w: jax.Array | None = None, topk: int | None = None,
              placement: Placement = _SINGLE, compact: bool = False, impl: str = "auto"):
    """The dequantized KV rows one decode step of ``layer`` attends to, and their validity.

    On a DCP rank (``placement.n > 1``) only the rank's own tokens are returned: dense segments as
    local ranges of the rank's *local lengths* (``dcp_local_len``), top-k segments through
    ``localize_topk``; the replicated indexer is read at global locations.

    Args:
      cache: a single-device cache (or one rank's local cache inside ``shard_map``).
      layer: model layer id.
      seq_lens: int32[B] full-position sequence lengths (positions ``[0, L)`` are attended).
      block_table: int32[B, P] (virtual) page ids of full pages (DSv4: for ``c4``, ``c128``,
        ``c4_indexer``; V3.2: for ``kv`` and ``indexer``).
      swa_block_table: int32[B, Ps] DSv4 only: ``swa`` pool page ids of full pages (entries of
        pages outside the window are not read).
      index_q: f32[B, Hi, Di] indexer queries (C4 layers / V3.2).
      index_w: f32[B, Hi] indexer head weights.
      topk: tokens the indexer keeps (default ``geo.indexer_topk``).
      placement: the DCP placement (default: single device).
      compact: compact top-k selections valid-first (as sparse kernels want).
      impl: kernel implementation for ``get_tokens``.

    Returns:
      ``(kv f32[B, T, W], valid bool[B, T], info)`` where ``info`` maps segment names
      (``"swa"``, ``"c4"``, ``"c128"``, ``"kv"``) to int32[B, t] local positions (-1 = none).
    """
    geo = cache.geometry
    lens = jnp.asarray(seq_lens, jnp.int32)
    bt = jnp.asarray(block_table, jnp.int32)
    if lens.ndim != 1 or bt.ndim != 2 or bt.shape[0] != lens.shape[0]:
        raise ValueError(f"seq_lens must be int32[B] and block_table int32[B, P]; got "
                         f"{lens.shape}, {bt.shape}")
    n, rank = placement.n, placement.rank
    B = lens.shape[0]
    segs = []  # (name, pool, local positions int32[B, t], block table)
    ratio = dict(zip(range(geo.num_layers), geo.compress_ratios)) if geo.is_dsv4 else {}
    if not 0 <= layer < geo.num_layers:
        raise ValueError(f"layer must be a model layer id in [0, {geo.num_layers}), got {layer}")

    def need_index():
        if index_q is None or index_w is None:
            raise ValueError(f"layer {layer} selects tokens with the indexer: index_q and "
                             "index_w are required")
        return geo.indexer_topk if topk is None else int(topk)

    def dense(pool, start, length, count):
        I = placement.inter(pool)
        lo = L.dcp_local_len(start, n, I, rank) if n > 1 else start
        hi = L.dcp_local_len(length, n, I, rank) if n > 1 else length
        return _local_range(lo, hi, count)

    def sparse(pool, index_pool, cand_len):
        k = need_index()
        tpp = cache.layout.pool(pool).tokens_per_page
        g = _topk_positions(cache, layer, index_pool, cand_len, bt, tpp, n, index_q, index_w, k,
                            impl)
        if n == 1:
            return _compact(g)[0] if compact else g
        return localize_topk(g, n, placement.inter(pool), rank, compact=compact)[0] \
            if compact else localize_topk(g, n, placement.inter(pool), rank)

    if geo.is_dsv4:
        if swa_block_table is None:
            raise ValueError("swa_block_table is required for a DSv4 cache")
        sbt = jnp.asarray(swa_block_table, jnp.int32)
        W = geo.swa_window
        segs.append(("swa", "swa", dense("swa", jnp.maximum(lens - W, 0), lens, W), sbt))
        r = ratio[layer]
        if r == geo.csa_ratio:
            segs.append(("c4", "c4", sparse("c4", "c4_indexer", lens // r), bt))
        elif r == geo.hca_ratio:
            tpp = cache.layout.pool("c128").tokens_per_page
            segs.append(("c128", "c128", dense("c128", jnp.zeros_like(lens), lens // r,
                                               bt.shape[1] * tpp), bt))
    else:
        segs.append(("kv", "kv", sparse("kv", "indexer", lens), bt))
    rows, valid, info = [], [], {}
    for name, pool, pos, table in segs:
        tpp = cache.layout.pool(pool).tokens_per_page
        locs = paged_locs(pos, table, tpp)
        rows.append(_read_rows(cache, pool, layer, locs, impl))
        valid.append(locs >= 0)
        info[name] = pos
    return jnp.concatenate(rows, axis=1), jnp.concatenate(valid, axis=1), info


def _compact(idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves the non-negative entries of each row to the front (stable): (int32[B, K], int32[B])."""
    ok = idx >= 0
    order = jnp.argsort(~ok, axis=1, stable=True)
    return jnp.take_along_axis(jnp.where(ok, idx, -1), order, axis=1), jnp.sum(ok, axis=1,
                                                                               dtype=jnp.int32)


def localize_topk(topk_idx: jax.Array, n: int, interleave: int, rank, *, compact: bool = False):
    """Keeps the top-k positions owned by ``rank``, as local positions (SPEC §9, DSA).

    Args:
      topk_idx: int32[B, K] global token positions (-1 = none).
      n: DCP size N.
      interleave: I.
      rank: this rank (int, or a traced scalar inside ``shard_map``).
      compact: move the kept entries to a valid-first prefix and also return per-row counts.

    Returns:
      int32[B, K] local positions ``(p // (I*N)) * I + p % I`` where ``owner(p) == rank``, else -1
      (the position of every entry kept); with ``compact=True`` the pair
      ``(compacted int32[B, K], counts int32[B])``.
    """
    idx = jnp.asarray(topk_idx, jnp.int32)
    if isinstance(rank, (int, np.integer)) and not 0 <= int(rank) < int(n):
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    I = int(interleave)
    if I < 1 or int(n) < 1:
        raise ValueError(f"n and interleave must be >= 1, got n={n}, interleave={interleave}")
    own = L.dcp_owner(idx, n, I) == rank
    out = jnp.where(own & (idx >= 0), (idx // (I * n)) * I + idx % I, -1)
    return _compact(out) if compact else out


def sparse_decode(q: jax.Array, cache: Cache, layer: int, *, seq_lens: jax.Array,
                  block_table: jax.Array, swa_block_table: jax.Array | None = None,
                  index_q: jax.Array | None = None, index_w: jax.Array | None = None,
                  topk: int | None = None, scale: float | None = None, base: str = "e",
                  impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Reference sparse MLA decode of one layer over a single-device cache.

    Args:
      q: float[B, h, W] (W = ``geo.mla.width``: 512 DSv4, 576 V3.2).
      cache: the cache.
      layer: model layer id.
      seq_lens, block_table, swa_block_table, index_q, index_w, topk: see ``gather_kv``.
      scale: softmax scale (default ``W ** -0.5``).
      base: ``"e"`` or ``"2"`` for the returned lse.
      impl: kernel implementation for the cache reads.

    Returns:
      ``(out f32[B, h, 512], lse f32[B, h])`` (see the module docstring).
    """
    _check_base(base)
    W = cache.geometry.mla.width
    if jnp.ndim(q) != 3 or jnp.shape(q)[2] != W:
        raise ValueError(f"q must be float[B, h, {W}] for {cache.geometry.name}, got "
                         f"{jnp.shape(q)}")
    kv, valid, _ = gather_kv(cache, layer, seq_lens=seq_lens, block_table=block_table,
                             swa_block_table=swa_block_table, index_q=index_q, index_w=index_w,
                             topk=topk, impl=impl)
    return attend(q, kv, valid, scale=scale, base=base)
