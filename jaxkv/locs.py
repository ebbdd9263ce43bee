"""Index translations between the pools of a DSv4 cache, and DCP placement (SPEC §4, §9).

Every function here is pure, elementwise over its array arguments, jittable, and works on int32
arrays of any shape ``[...]`` (written ``[N]`` below).  Integer arguments named ``ratio``, ``ring``,
``swa_page``, ``n``, ``interleave`` and ``block`` are static Python ints.

Conventions
  * ``-1`` is the invalid location.  Every translation returns ``-1`` for an invalid input and,
    where it can be invalid for a valid input, a ``valid`` mask (``bool[N]``).
  * No translation ever clips or wraps an index: an out-of-range input maps to ``-1`` (invalid),
    never to another token's location.  (``jnp`` indexing wraps ``-1`` to the last entry and clips
    out-of-range indices; here every table lookup goes through an explicit bounds check.)

Index spaces (SPEC §4)
  * full loc ``f``: the request's token table holds these; ``f % page == position % page``.
  * SWA loc ``s = full_to_swa[f]``: table of ``full + page + 1`` int32 entries, last entry -1,
    0 = "no SWA slot".
  * compressed loc: ``f // r`` exactly when ``(f + 1) % r == 0`` (C4: r = 4, C128: r = 128; the C4
    indexer uses the C4 loc).
  * state rows: page-scoped ``(s // swa_page) * ring + s % ring``; request-scoped
    ``req_slot * ring + position % ring``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "swa_locs", "compressed_locs", "state_rows", "request_state_rows",
    "dcp_owner", "dcp_local_index", "dcp_local_len", "dcp_owner_widened", "dcp_physical_widened",
]


def _i32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"locations must be an integer array, got dtype {x.dtype}")
    return x.astype(jnp.int32)


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive Python int, got {v!r}")
    return v


def swa_locs(full_to_swa: jax.Array, full: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full locations -> SWA locations through the ``full_to_swa`` table (SPEC §4).

    Args:
      full_to_swa: int32[F] with ``F = full + page + 1``; last entry -1; 0 = no SWA slot.
      full: int32[N] full locations; -1 (padding) or anything outside ``[0, F)`` is invalid.

    Returns:
      ``(swa, valid)``: int32[N] SWA locations (-1 where invalid) and bool[N] (True where the token
      has an SWA slot: ``full_to_swa[f] > 0``).  An invalid ``full`` looks up the table's last
      entry (-1) as SGLang does, so it is invalid too.
    """
    table = _i32(full_to_swa)
    full = _i32(full)
    if table.ndim != 1:
        raise ValueError(f"full_to_swa must be 1-D int32[F], got shape {table.shape}")
    F = table.shape[0]
    idx = jnp.where((full >= 0) & (full < F), full, F - 1)
    s = table[idx]
    valid = s > 0
    return jnp.where(valid, s, -1), valid


def compressed_locs(full: jax.Array, ratio: int) -> tuple[jax.Array, jax.Array]:
    """Full locations -> compressed (C4 / C128 / C4-indexer) locations (SPEC §4).

    Args:
      full: int32[N] full locations (-1 = invalid).
      ratio: compress ratio (4 or 128; any positive int).

    Returns:
      ``(loc, valid)``: int32[N] ``f // ratio`` where ``f >= 0 and (f + 1) % ratio == 0``, else -1;
      bool[N] the mask.  Compressed page ``loc // (page / ratio) == f // page``.
    """
    ratio = _pos_int("ratio", ratio)
    f = _i32(full)
    valid = (f >= 0) & ((f + 1) % ratio == 0)
    return jnp.where(valid, f // ratio, -1), valid


def state_rows(swa: jax.Array, ring: int, swa_page: int) -> jax.Array:
    """SWA locations -> page-scoped compress-state rows (SPEC §4).

    Args:
      swa: int32[N] SWA locations (-1 = invalid).
      ring: state rows per SWA page (8 for C4 / C4-indexer, 128 for C128).
      swa_page: tokens per SWA page in the addressing (256 in SGLang).

    Returns:
      int32[N] ``(s // swa_page) * ring + s % ring``; -1 stays -1 (reads the sentinel row).
    """
    ring = _pos_int("ring", ring)
    swa_page = _pos_int("swa_page", swa_page)
    s = _i32(swa)
    return jnp.where(s >= 0, (s // swa_page) * ring + s % ring, -1)


def request_state_rows(req_slot: jax.Array, positions: jax.Array, ring: int) -> jax.Array:
    """Request slots + positions -> request-scoped compress-state rows (newer SGLang's C128 state).

    Args:
      req_slot: int32[N] request slot of each token (-1 = invalid).
      positions: int32[N] token positions (-1 = invalid).
      ring: state rows per request.

    Returns:
      int32[N] ``req_slot * ring + position % ring``; -1 where either input is negative.
    """
    ring = _pos_int("ring", ring)
    r, p = _i32(req_slot), _i32(positions)
    r, p = jnp.broadcast_arrays(r, p)
    return jnp.where((r >= 0) & (p >= 0), r * ring + p % ring, -1)


# ---------------------------------------------------------------------------------------------
# DCP (SPEC §9)


def dcp_owner(pos: jax.Array, n: int, interleave: int = 1) -> jax.Array:
    """DCP rank owning each position: ``(pos // interleave) % n`` (-1 stays -1).

    Equal to SPEC §9's ``((p mod B*N) // I) mod N`` for every block size ``B`` that is a multiple
    of ``I`` (the only valid ones, see ``dcp_local_index``).

    Args:
      pos: int32[N] positions (or full-space offsets); negative = invalid.
      n: DCP size N.
      interleave: I, consecutive tokens per rank (1 = token round-robin).

    Returns:
      int32[N] owner rank in ``[0, n)``, or -1.
    """
    n, interleave = _pos_int("n", n), _pos_int("interleave", interleave)
    p = _i32(pos)
    return jnp.where(p >= 0, (p // interleave) % n, -1)


def dcp_local_index(pos: jax.Array, n: int, interleave: int, block: int) -> jax.Array:
    """Local slot of each position on its owner rank (SPEC §9).

    Positions are grouped in virtual blocks of ``block * n`` tokens; each rank holds ``block`` of
    them.  With ``o = p mod (B*N)``: ``local = (p // (B*N)) * B + (o // (I*N)) * I + o mod I``.

    Args:
      pos: int32[N] positions; negative = invalid.
      n: DCP size N.
      interleave: I.
      block: B, local tokens per rank per virtual block; must be a multiple of ``interleave``.

    Returns:
      int32[N] local index on rank ``dcp_owner(pos, n, interleave)``, or -1.
    """
    n, interleave, block = (_pos_int("n", n), _pos_int("interleave", interleave),
                            _pos_int("block", block))
    if block % interleave:
        raise ValueError(f"block ({block}) must be a multiple of interleave ({interleave})")
    p = _i32(pos)
    vb = block * n
    o = p % vb
    local = (p // vb) * block + (o // (interleave * n)) * interleave + o % interleave
    return jnp.where(p >= 0, local, -1)


def dcp_local_len(length: jax.Array, n: int, interleave: int, rank) -> jax.Array:
    """Tokens of a length-``L`` sequence held by DCP rank ``rank`` (SPEC §9).

    ``base = (L // I // N) * I``; ``local_len = base + clip(L - base*N - rank*I, 0, I)``.

    Args:
      length: int32[N] sequence lengths (>= 0; negative is treated as 0).
      n: DCP size N.
      interleave: I.
      rank: int or int32[N] (broadcast), in ``[0, n)``.

    Returns:
      int32[N] local lengths; ``sum over ranks == length``.
    """
    n, interleave = _pos_int("n", n), _pos_int("interleave", interleave)
    if isinstance(rank, int) and not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    L = jnp.maximum(_i32(length), 0)
    r = _i32(rank)
    base = (L // interleave // n) * interleave
    return base + jnp.clip(L - base * n - r * interleave, 0, interleave)


def dcp_owner_widened(loc: jax.Array, n: int) -> jax.Array:
    """SGLang's widened-space form: owner rank ``loc % n`` of a widened loc (-1 stays -1).

    SGLang allocates in a loc space ``n`` times wider (size × N, page × N); loc ``w`` lives on rank
    ``w % n`` at physical slot ``w // n``.

    Args:
      loc: int32[N] widened locations; negative = invalid.
      n: DCP size N.

    Returns:
      int32[N] owner rank, or -1.
    """
    n = _pos_int("n", n)
    w = _i32(loc)
    return jnp.where(w >= 0, w % n, -1)


def dcp_physical_widened(loc: jax.Array, n: int) -> jax.Array:
    """SGLang's widened-space form: physical slot ``loc // n`` on the owner rank (-1 stays -1).

    Args:
      loc: int32[N] widened locations; negative = invalid.
      n: DCP size N.

    Returns:
      int32[N] physical local slot, or -1.
    """
    n = _pos_int("n", n)
    w = _i32(loc)
    return jnp.where(w >= 0, w // n, -1)
