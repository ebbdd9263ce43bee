"""Pallas kernels with the signatures of ``kernels.reference``.

Every op handles all layers of the addressing in ONE ``pallas_call`` (grid = layers x blocks of
tokens or pages).  Buffers are passed whole (no BlockSpec): a program computes each token's row and
byte column from its location and moves the value / scale windows with dynamic ``pl.ds`` slices in
power-of-two chunks (the Triton lowering wants power-of-two shapes).  Invalid locations (< 0 or
>= capacity) are never written; gathers return zeros for them (the load is from a safe address and
then discarded).  Scatters and copies update the destination in place (``input_output_aliases``):
with donation the buffer is not copied.

Lowering: ``interpret=True`` when ``jax.default_backend() == "cpu"``; on GPU the Pallas Triton
lowering (``compiler_params=pallas.triton.CompilerParams``), which handles dynamic byte offsets
into a whole buffer.  That lowering computes 32-bit offsets: on GPU every array must be below
2 GiB (checked: ValueError), so multi-GB pools use ``impl="triton"``.  The choice lives in ``_call`` only, so another lowering (Mosaic GPU) can be
put behind the same functions.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

_MAX_CHUNK = 2048  # bytes per load/store of one program step


def _chunks(width: int, max_chunk: int = _MAX_CHUNK) -> tuple[tuple[int, int], ...]:
    """Static ``(offset, size)`` pieces covering ``[0, width)``, each a power of two."""
    out, off = [], 0
    while width - off >= max_chunk:
        out.append((off, max_chunk))
        off += max_chunk
    rest = width - off
    bit = max_chunk
    while rest:
        if rest >= bit:
            out.append((off, bit))
            off += bit
            rest -= bit
        bit //= 2
    return tuple(out)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


_MAX_GPU_BYTES = 2**31  # the Triton lowering's pointer offsets are 32-bit (measured on H100)


def _call(kernel, out_shape, grid, *, aliases=None, num_warps=4):
    kw = dict(out_shape=out_shape, grid=grid, input_output_aliases=aliases or {})
    if _interpret():
        kw["interpret"] = True
        return pl.pallas_call(kernel, **kw)
    from jax.experimental.pallas import triton as pltriton
    kw["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    call = pl.pallas_call(kernel, **kw)

    def checked(*args):
        outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
        for x in (*args, *outs):
            if math.prod(x.shape) * jnp.dtype(x.dtype).itemsize >= _MAX_GPU_BYTES:
                raise ValueError(
                    f"impl='pallas' on GPU handles arrays below 2 GiB (the Pallas Triton lowering "
                    f"computes 32-bit offsets; a {x.shape} array was given, and bytes past 2 GiB "
                    "were written to the wrong place on an H100); use impl='triton' or 'auto'")
        return call(*args)

    return checked


def _tables(a) -> tuple[jax.Array, jax.Array]:
    return (jnp.asarray(a.row_base, jnp.int32), jnp.asarray(a.col_base, jnp.int32))


def _copy_window(src_ref, src_idx, dst_ref, dst_idx, width, ok=None, zero_fill=False):
    """Moves ``width`` bytes from ``src_ref[*src_idx, col:]`` to ``dst_ref[*dst_idx, col:]``.

    ``src_idx`` / ``dst_idx``: (leading scalar indices..., start column).  With ``zero_fill`` the
    window is written with zeros where ``ok`` is false; otherwise the write is skipped there.
    """
    *slead, scol = src_idx
    *dlead, dcol = dst_idx
    n_full = width // _MAX_CHUNK
    rest = _chunks(width - n_full * _MAX_CHUNK)

    def move(off, size):
        x = src_ref[(*slead, pl.ds(scol + off, size))]
        if zero_fill:
            x = jnp.where(ok, x, jnp.zeros_like(x))
        dst_ref[(*dlead, pl.ds(dcol + off, size))] = x

    def body():
        if n_full == 1:
            move(0, _MAX_CHUNK)
        elif n_full > 1:
            def step(k, c):
                move(pl.multiple_of(k * _MAX_CHUNK, _MAX_CHUNK), _MAX_CHUNK)
                return c
            lax.fori_loop(0, n_full, step, 0)
        for off, size in rest:
            move(n_full * _MAX_CHUNK + off, size)

    if ok is None or zero_fill:
        body()
    else:
        pl.when(ok)(body)


def _token_block(a: TokenAddressing, n: int) -> int:
    return max(1, min(64, 4096 // max(a.value_bytes, 1), n))


# ---------------------------------------------------------------------------------------------
# Tokens


def _loc_rowcol(loc, rb, cb, a: TokenAddressing):
    ok = (loc >= 0) & (loc < a.capacity)
    safe = jnp.where(ok, loc, 0)
    page, t = safe // a.tpp, safe % a.tpp
    row = rb + page * a.row_step
    return ok, row, cb + t * a.value_bytes, cb + a.tpp * a.value_bytes + t * a.scale_stride


def gather_tokens(buf: jax.Array, locs: jax.Array, a: TokenAddressing):
    """See ``reference.gather_tokens``: ``(value u8[L, N, V], scale u8[L, N, scale_bytes])``."""
    locs = jnp.asarray(locs, jnp.int32)
    L, N = a.num_layers, locs.shape[0]
    V, SB = a.value_bytes, a.scale_bytes
    if L == 0 or N == 0:
        return jnp.zeros((L, N, V), jnp.uint8), jnp.zeros((L, N, SB), jnp.uint8)
    bt = _token_block(a, N)
    has_scale = SB > 0

    def kernel(locs_ref, rb_ref, cb_ref, buf_ref, val_ref, *maybe_scl):
        l, b = pl.program_id(0), pl.program_id(1)
        rb, cb = rb_ref[l], cb_ref[l]
        start = b * bt

        def step(k, c):
            i = start + k

            @pl.when(i < N)
            def _():
                ok, row, vcol, scol = _loc_rowcol(locs_ref[i], rb, cb, a)
                _copy_window(buf_ref, (row, vcol), val_ref, (l, i, 0), V, ok, zero_fill=True)
                if has_scale:
                    _copy_window(buf_ref, (row, scol), maybe_scl[0], (l, i, 0), SB, ok,
                                 zero_fill=True)
            return c

        lax.fori_loop(0, bt, step, 0)

    out_shape = [jax.ShapeDtypeStruct((L, N, V), jnp.uint8)]
    if has_scale:
        out_shape.append(jax.ShapeDtypeStruct((L, N, SB), jnp.uint8))
    outs = _call(kernel, out_shape, (L, pl.cdiv(N, bt)))(locs, *_tables(a), buf)
    if has_scale:
        return outs[0], outs[1]
    return outs[0], jnp.zeros((L, N, 0), jnp.uint8)


def scatter_tokens(buf: jax.Array, locs: jax.Array, value: jax.Array, scale: jax.Array,
                   a: TokenAddressing) -> jax.Array:
    """See ``reference.scatter_tokens``; updates ``buf`` in place (aliased output)."""
    locs = jnp.asarray(locs, jnp.int32)
    L, N = a.num_layers, locs.shape[0]
    V, SB = a.value_bytes, a.scale_bytes
    if L == 0 or N == 0:
        return buf
    bt = _token_block(a, N)
    has_scale = SB > 0
    if not has_scale:
        scale = jnp.zeros((1,), jnp.uint8)

    def kernel(locs_ref, rb_ref, cb_ref, val_ref, scl_ref, buf_in, buf_ref):
        del buf_in
        l, b = pl.program_id(0), pl.program_id(1)
        rb, cb = rb_ref[l], cb_ref[l]
        start = b * bt

        def step(k, c):
            i = jnp.minimum(start + k, N - 1)
            ok, row, vcol, scol = _loc_rowcol(locs_ref[i], rb, cb, a)
            ok = ok & (start + k < N)
            _copy_window(val_ref, (l, i, 0), buf_ref, (row, vcol), V, ok)
            if has_scale:
                _copy_window(scl_ref, (l, i, 0), buf_ref, (row, scol), SB, ok)
            return c

        lax.fori_loop(0, bt, step, 0)

    return _call(kernel, jax.ShapeDtypeStruct(buf.shape, buf.dtype), (L, pl.cdiv(N, bt)),
                 aliases={5: 0})(locs, *_tables(a), value, scale, buf)


def copy_tokens(src: jax.Array, dst: jax.Array, src_locs: jax.Array, dst_locs: jax.Array,
                src_a: TokenAddressing, dst_a: TokenAddressing) -> jax.Array:
    """See ``reference.copy_tokens`` (value + whole scale slot; ``dst`` updated in place)."""
    src_locs = jnp.asarray(src_locs, jnp.int32)
    dst_locs = jnp.asarray(dst_locs, jnp.int32)
    L, N = src_a.num_layers, src_locs.shape[0]
    V, S = src_a.value_bytes, src_a.scale_stride
    if L == 0 or N == 0:
        return dst
    bt = _token_block(src_a, N)

    def kernel(sl_ref, dl_ref, srb, scb, drb, dcb, src_ref, dst_in, dst_ref):
        del dst_in
        l, b = pl.program_id(0), pl.program_id(1)
        s_rb, s_cb, d_rb, d_cb = srb[l], scb[l], drb[l], dcb[l]
        start = b * bt

        def step(k, c):
            i = jnp.minimum(start + k, N - 1)
            sok, srow, svcol, sscol = _loc_rowcol(sl_ref[i], s_rb, s_cb, src_a)
            dok, drow, dvcol, dscol = _loc_rowcol(dl_ref[i], d_rb, d_cb, dst_a)
            ok = sok & dok & (start + k < N)
            _copy_window(src_ref, (srow, svcol), dst_ref, (drow, dvcol), V, ok)
            if S:
                _copy_window(src_ref, (srow, sscol), dst_ref, (drow, dscol), S, ok)
            return c

        lax.fori_loop(0, bt, step, 0)

    return _call(kernel, jax.ShapeDtypeStruct(dst.shape, dst.dtype), (L, pl.cdiv(N, bt)),
                 aliases={7: 0})(src_locs, dst_locs, *_tables(src_a), *_tables(dst_a), src, dst)


# ---------------------------------------------------------------------------------------------
# Pages


def _page_rowcol(p, rb, cb, a: PageAddressing):
    ok = (p >= 0) & (p < a.num_pages)
    return ok, rb + jnp.where(ok, p, 0) * a.row_step, cb


def gather_pages(buf: jax.Array, pages: jax.Array, a: PageAddressing) -> jax.Array:
    """See ``reference.gather_pages``: uint8[L, P, page_bytes] (invalid pages read zeros)."""
    pages = jnp.asarray(pages, jnp.int32)
    L, P = a.num_layers, pages.shape[0]
    if L == 0 or P == 0:
        return jnp.zeros((L, P, a.page_bytes), jnp.uint8)

    def kernel(pages_ref, rb_ref, cb_ref, buf_ref, out_ref):
        l, q = pl.program_id(0), pl.program_id(1)
        ok, row, col = _page_rowcol(pages_ref[q], rb_ref[l], cb_ref[l], a)
        _copy_window(buf_ref, (row, col), out_ref, (l, q, 0), a.page_bytes, ok, zero_fill=True)

    return _call(kernel, jax.ShapeDtypeStruct((L, P, a.page_bytes), jnp.uint8),
                 (L, P))(pages, *_tables(a), buf)


def scatter_pages(buf: jax.Array, pages: jax.Array, data: jax.Array,
                  a: PageAddressing) -> jax.Array:
    """See ``reference.scatter_pages``; updates ``buf`` in place (aliased output)."""
    pages = jnp.asarray(pages, jnp.int32)
    L, P = a.num_layers, pages.shape[0]
    if L == 0 or P == 0:
        return buf

    def kernel(pages_ref, rb_ref, cb_ref, data_ref, buf_in, buf_ref):
        del buf_in
        l, q = pl.program_id(0), pl.program_id(1)
        ok, row, col = _page_rowcol(pages_ref[q], rb_ref[l], cb_ref[l], a)
        _copy_window(data_ref, (l, q, 0), buf_ref, (row, col), a.page_bytes, ok)

    return _call(kernel, jax.ShapeDtypeStruct(buf.shape, buf.dtype), (L, P),
                 aliases={4: 0})(pages, *_tables(a), data, buf)


def copy_pages(src: jax.Array, dst: jax.Array, src_pages: jax.Array, dst_pages: jax.Array,
               src_a: PageAddressing, dst_a: PageAddressing) -> jax.Array:
    """See ``reference.copy_pages`` (all layers in one launch; ``dst`` updated in place)."""
    src_pages = jnp.asarray(src_pages, jnp.int32)
    dst_pages = jnp.asarray(dst_pages, jnp.int32)
    L, P = src_a.num_layers, src_pages.shape[0]
    if L == 0 or P == 0:
        return dst

    def kernel(sp_ref, dp_ref, srb, scb, drb, dcb, src_ref, dst_in, dst_ref):
        del dst_in
        l, q = pl.program_id(0), pl.program_id(1)
        sok, srow, scol = _page_rowcol(sp_ref[q], srb[l], scb[l], src_a)
        dok, drow, dcol = _page_rowcol(dp_ref[q], drb[l], dcb[l], dst_a)
        _copy_window(src_ref, (srow, scol), dst_ref, (drow, dcol), src_a.page_bytes, sok & dok)

    return _call(kernel, jax.ShapeDtypeStruct(dst.shape, dst.dtype), (L, P),
                 aliases={7: 0})(src_pages, dst_pages, *_tables(src_a), *_tables(dst_a), src, dst)
