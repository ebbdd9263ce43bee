"""Pure-jnp reference kernels: the oracle every other implementation is tested against.

Gathers and scatters move whole byte windows with ``lax.gather`` / ``lax.scatter`` in
``FILL_OR_DROP`` mode: an invalid location is mapped to an out-of-bounds row, so its window is
dropped (scatter) or filled with zeros (gather) — never clipped onto another token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

_DROP = lax.GatherScatterMode.FILL_OR_DROP


def _rows_cols(buf, locs, a: TokenAddressing):
    """int32 rows[L, N], value cols[L, N], scale cols[L, N]; invalid -> row = buf rows (OOB)."""
    locs = jnp.asarray(locs, jnp.int32)
    valid = (locs >= 0) & (locs < a.capacity)
    safe = jnp.where(valid, locs, 0)
    page, t = safe // a.tpp, safe % a.tpp
    rb = jnp.asarray(a.row_base, jnp.int32)[:, None]
    cb = jnp.asarray(a.col_base, jnp.int32)[:, None]
    rows = jnp.where(valid[None], rb + page[None] * a.row_step, buf.shape[0])
    vcol = cb + t[None] * a.value_bytes
    scol = cb + a.tpp * a.value_bytes + t[None] * a.scale_stride
    return rows, vcol, scol


def _gather_windows(buf, rows, cols, width):
    idx = jnp.stack([rows, cols], axis=-1)  # [..., 2]
    dn = lax.GatherDimensionNumbers(offset_dims=(idx.ndim - 1,), collapsed_slice_dims=(0,),
                                    start_index_map=(0, 1))
    return lax.gather(buf, idx, dn, slice_sizes=(1, width), mode=_DROP, fill_value=0)


def _scatter_windows(buf, rows, cols, updates):
    idx = jnp.stack([rows, cols], axis=-1).reshape(-1, 2)
    upd = updates.reshape(-1, updates.shape[-1])
    dn = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                     scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(buf, idx, upd, dn, mode=_DROP, indices_are_sorted=False,
                       unique_indices=False)


def gather_tokens(buf: jax.Array, locs: jax.Array, a: TokenAddressing):
    """Reads tokens of every layer in ``a``.

    Args:
      buf: uint8[rows, row_bytes].
      locs: int32[N] token locations (invalid ones read as zeros).
      a: the addressing.

    Returns:
      ``(value uint8[L, N, V], scale uint8[L, N, scale_bytes])``.
    """
    rows, vcol, scol = _rows_cols(buf, locs, a)
    value = _gather_windows(buf, rows, vcol, a.value_bytes)
    if a.scale_bytes == 0:
        return value, jnp.zeros((*rows.shape, 0), jnp.uint8)
    return value, _gather_windows(buf, rows, scol, a.scale_bytes)


def scatter_tokens(buf: jax.Array, locs: jax.Array, value: jax.Array, scale: jax.Array,
                   a: TokenAddressing) -> jax.Array:
    """Writes tokens of every layer in ``a``; the inverse of ``gather_tokens``.

    Args:
      buf: uint8[rows, row_bytes].
      locs: int32[N]; invalid locations are skipped.
      value: uint8[L, N, V].
      scale: uint8[L, N, scale_bytes] (ignored when ``scale_bytes == 0``).
      a: the addressing.

    Returns:
      The updated buffer.  Bytes outside the written windows are unchanged (the pad byte of a
      DSv4 scale slot included).  With duplicate locations one of the writes wins (unspecified
      which); callers writing state rows pass identical rows for duplicates.
    """
    rows, vcol, scol = _rows_cols(buf, locs, a)
    buf = _scatter_windows(buf, rows, vcol, value)
    if a.scale_bytes:
        buf = _scatter_windows(buf, rows, scol, scale)
    return buf


def _page_rows(pages, a: PageAddressing, nrows):
    pages = jnp.asarray(pages, jnp.int32)
    valid = (pages >= 0) & (pages < a.num_pages)
    rb = jnp.asarray(a.row_base, jnp.int32)[:, None]
    rows = jnp.where(valid[None], rb + jnp.where(valid, pages, 0)[None] * a.row_step, nrows)
    cols = jnp.broadcast_to(jnp.asarray(a.col_base, jnp.int32)[:, None], rows.shape)
    return rows, cols


def gather_pages(buf: jax.Array, pages: jax.Array, a: PageAddressing) -> jax.Array:
    """uint8[L, P, page_bytes]: whole pages ``pages`` (int32[P]) of every layer (invalid -> 0)."""
    rows, cols = _page_rows(pages, a, buf.shape[0])
    return _gather_windows(buf, rows, cols, a.page_bytes)


def scatter_pages(buf: jax.Array, pages: jax.Array, data: jax.Array,
                  a: PageAddressing) -> jax.Array:
    """Writes ``data`` uint8[L, P, page_bytes] into pages ``pages`` (int32[P]; invalid skipped)."""
    rows, cols = _page_rows(pages, a, buf.shape[0])
    return _scatter_windows(buf, rows, cols, data)


def _masked_pair(src_idx, dst_idx, src_n, dst_n):
    """Both index arrays with -1 wherever either side of a pair is invalid."""
    s = jnp.asarray(src_idx, jnp.int32)
    d = jnp.asarray(dst_idx, jnp.int32)
    ok = (s >= 0) & (s < src_n) & (d >= 0) & (d < dst_n)
    return jnp.where(ok, s, -1), jnp.where(ok, d, -1)


def copy_pages(src: jax.Array, dst: jax.Array, src_pages: jax.Array, dst_pages: jax.Array,
               src_a: PageAddressing, dst_a: PageAddressing) -> jax.Array:
    """Copies page ``src_pages[i]`` of every layer of ``src_a`` to page ``dst_pages[i]`` of the same
    layer of ``dst_a`` (two buffers, different page numbering).

    Args:
      src, dst: uint8[rows, row_bytes] buffers (may have different shapes).
      src_pages, dst_pages: int32[P]; pairs with an invalid page on either side are skipped.
      src_a, dst_a: equal ``page_bytes`` and layer counts.

    Returns:
      The updated ``dst``.
    """
    s, d = _masked_pair(src_pages, dst_pages, src_a.num_pages, dst_a.num_pages)
    return scatter_pages(dst, d, gather_pages(src, s, src_a), dst_a)


def copy_tokens(src: jax.Array, dst: jax.Array, src_locs: jax.Array, dst_locs: jax.Array,
                src_a: TokenAddressing, dst_a: TokenAddressing) -> jax.Array:
    """Token-granular copy between paged buffers (SGLang's ``transfer_cache_dsv4_mla``).

    Token ``src_locs[i]`` of every layer is copied to ``dst_locs[i]``: its ``V``-byte value and its
    whole ``S``-byte scale slot (two byte ranges; the pad byte travels too).

    Args:
      src, dst: uint8[rows, row_bytes].
      src_locs, dst_locs: int32[N]; pairs with an invalid location on either side are skipped.
      src_a, dst_a: the same token format (V, S) and layer count; page sizes may differ.

    Returns:
      The updated ``dst``.
    """
    s, d = _masked_pair(src_locs, dst_locs, src_a.capacity, dst_a.capacity)
    sa = src_a._replace(scale_bytes=src_a.scale_stride)
    da = dst_a._replace(scale_bytes=dst_a.scale_stride)
    value, scale = gather_tokens(src, s, sa)
    return scatter_tokens(dst, d, value, scale, da)
