"""The cache state and its accessors.

``Cache`` is an immutable pytree: a tuple of ``uint8[rows, row_bytes]`` buffers (children) plus the
static ``Layout``.  Every accessor is a pure function ``cache = f(cache, ...)``, jittable, and
donation-friendly::

    write = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"), donate_argnames="cache")
    cache = write(cache, "c4", 3, locs, tokens)          # updates the buffer in place

Locations
  ``locs`` are int32 pool locations (SPEC §4: a full loc for ``swa`` after translation, ``f // 4``
  for ``c4``, ...).  ``-1`` is padding: it is never written, and reads give zeros (token pools) or
  the sentinel row (state pools).  Any other location outside ``[0, capacity)`` is an error:
  a ``ValueError`` naming the argument when the call is made with concrete arrays (outside jit),
  and — inside jit — either masked (never clipped or wrapped onto another token's bytes) or, with
  ``check=True`` under ``jax.experimental.checkify.checkify``, reported as a checkify error.

Layers
  ``layer`` is the pool-local layer index (``Geometry.pool(name).local_layer(model_layer)``),
  a tuple of them, or ``None`` for all layers of the pool (tokens then carry a leading
  ``[L, ...]`` axis).  One call writes the same locations into every selected layer, so in the
  packed layout the layers must belong to one KV-cache group (``PoolLayout.groups``): layers of
  different groups can share a slot and take different blocks (vLLM splits the 43 SWA layers of
  Flash into groups of 22 + 21).  Selecting layers that share a slot is a ValueError.

State pools
  Rows of ``c4_state``, ``c4_indexer_state`` and ``c128_state``.  Invalid (-1) locations read the
  sentinel value ``[kv = 0 | score = -inf]``.  In the layer-major layout the last row stores it
  (SGLang's kernels read it there); a write aimed at that row is dropped, so it always holds its
  value (SGLang writes it and then restores it: same result).  Duplicate locations are legal when
  they carry identical rows.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxkv import formats as F
from jaxkv.geometry import Geometry
from jaxkv.kernels import dispatch
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing
from jaxkv.layout import Layout, PoolLayout


@functools.partial(jax.tree_util.register_dataclass, data_fields=["buffers"],
                   meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class Cache:
    """A KV cache: ``buffers[i]`` is ``uint8[layout.buffer_shapes[i]]``."""

    buffers: tuple[jax.Array, ...]
    layout: Layout

    @property
    def geometry(self) -> Geometry:
        return self.layout.geometry

    def pool(self, name: str) -> PoolLayout:
        return self.layout.pool(name)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def token_addressing(layout: Layout, pool: str,
                     layers: tuple[int, ...] | None = None) -> tuple[int, TokenAddressing]:
    """``(buffer index, TokenAddressing)`` of ``pool``'s layers (all when ``layers`` is None)."""
    p = layout.pool(pool)
    layers = tuple(range(p.spec.num_layers)) if layers is None else tuple(layers)
    pl = [p.placements[i] for i in layers]
    buf = {x.buffer for x in p.placements}
    assert len(buf) == 1, "a pool's layers share one buffer in every layout"
    fmt = p.spec.fmt
    return buf.pop(), TokenAddressing(
        row_base=tuple(x.row_base for x in pl), col_base=tuple(x.col for x in pl),
        row_step=p.placements[0].row_step, tpp=p.tokens_per_page, num_pages=p.num_pages,
        value_bytes=fmt.value_bytes, scale_stride=fmt.scale_stride, scale_bytes=fmt.scale_bytes)


def page_addressing(layout: Layout, pool: str,
                    layers: tuple[int, ...] | None = None) -> tuple[int, PageAddressing]:
    """``(buffer index, PageAddressing)`` of ``pool``'s layers (all when ``layers`` is None)."""
    p = layout.pool(pool)
    layers = tuple(range(p.spec.num_layers)) if layers is None else tuple(layers)
    pl = [p.placements[i] for i in layers]
    return p.placements[0].buffer, PageAddressing(
        row_base=tuple(x.row_base for x in pl), col_base=tuple(x.col for x in pl),
        row_step=p.placements[0].row_step, num_pages=p.num_pages, page_bytes=p.page_bytes)


# ---------------------------------------------------------------------------------------------
# Construction


def _sentinel_row(spec) -> np.ndarray:
    w = spec.fmt.width
    row = np.zeros(w, np.float32)
    row[w // 2:] = -np.inf
    return row.view(np.uint8)


def init_cache(geo: Geometry, layout: Layout) -> Cache:
    """A zero-filled cache for ``layout``, with every stored state sentinel row set.

    Args:
      geo: the geometry (must be the layout's).
      layout: from ``jaxkv.layer_major`` or ``jaxkv.packed``.
    """
    if layout.geometry != geo:
        raise ValueError(f"layout was built for geometry {layout.geometry.name}, "
                         f"not {geo.name}")
    return Cache(_init_buffers(layout), layout)


@functools.partial(jax.jit, static_argnums=0)
def _init_buffers(layout: Layout) -> tuple[jax.Array, ...]:
    # One compiled program for all buffers (eager zeros would compile once per buffer shape).
    buffers = [jnp.zeros(s, jnp.uint8) for s in layout.buffer_shapes]
    for p in layout.pools:
        if p.sentinel is None:
            continue
        b, a = token_addressing(layout, p.name)
        row = jnp.asarray(_sentinel_row(p.spec))
        value = jnp.broadcast_to(row, (a.num_layers, 1, row.shape[0]))
        locs = jnp.asarray([p.sentinel], jnp.int32)
        buffers[b] = dispatch.scatter_tokens(buffers[b], locs, value,
                                             jnp.zeros((a.num_layers, 1, 0), jnp.uint8), a,
                                             impl="reference")
    return tuple(buffers)


# ---------------------------------------------------------------------------------------------
# Validation


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_pool_layer(cache: Cache, pool: str, layer, kind: str | None = None):
    if not isinstance(cache, Cache):
        raise ValueError(f"cache must be a jaxkv Cache, got {type(cache).__name__}")
    p = cache.layout.pool(pool)
    if kind is not None and p.spec.kind != kind:
        raise ValueError(f"pool {pool!r} is a {p.spec.kind} pool; use the "
                         f"{'*_rows' if p.spec.kind == 'state' else '*_tokens'} accessors")
    n = p.spec.num_layers
    sel = (layer,) if not isinstance(layer, (tuple, list, type(None))) else layer
    for x in (sel if sel is not None else ()):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"layer must be an int pool-local layer index, a tuple of them or "
                             f"None, got {layer!r}")
        if not 0 <= x < n:
            raise ValueError(f"layer must be in [0, {n}) for pool {pool!r} (pool-local index; "
                             f"model layers {p.spec.layers}), got {x}")
    layers = tuple(range(n)) if sel is None else tuple(int(x) for x in sel)
    if len(layers) > 1:
        places = [p.placements[i] for i in layers]
        if len(set(places)) != len(places):
            raise ValueError(
                f"layer selects layers of pool {pool!r} that share a slot (groups "
                f"{[list(g) for g in p.groups]}): "
                "in the packed layout they belong to different KV-cache groups and take "
                "different blocks; write each group of PoolLayout.groups with its own locations")
    return p



def _check_locs(locs, p: PoolLayout, arg: str = "locs", check: bool = False) -> jax.Array:
    """int32[N] locations; ValueError on concrete bad values; checkify check when asked."""
    shape, dtype = jnp.shape(locs), jnp.result_type(locs)
    if len(shape) != 1:
        raise ValueError(f"{arg} must be 1-D int32[N], got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{arg} must be an integer array, got dtype {dtype}")
    cap = p.capacity
    if not _is_traced(locs):
        host = np.asarray(locs)
        bad = (host < -1) | (host >= cap)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{arg}[{i}] = {int(host[i])} is outside [0, {cap}) for pool "
                             f"{p.name!r} (-1 is the only allowed padding value)")
        return jnp.asarray(host.astype(np.int32))
    locs = jnp.asarray(locs).astype(jnp.int32)
    if check:
        checkify.check(jnp.all((locs >= -1) & (locs < cap)),
                       f"{arg} has a location outside [0, {cap}) for pool {p.name!r} "
                       "(-1 is the only allowed padding value)")
    return locs


def _check_impl(impl: str):
    if impl not in dispatch.IMPLS:
        raise ValueError(f"impl must be one of {dispatch.IMPLS}, got {impl!r}")


# ---------------------------------------------------------------------------------------------
# Token pools


def _layers(layer) -> tuple[int, ...] | None:
    if layer is None:
        return None
    return tuple(int(x) for x in layer) if isinstance(layer, (tuple, list)) else (int(layer),)


def _single(layer) -> bool:
    return layer is not None and not isinstance(layer, (tuple, list))


def set_tokens(cache: Cache, pool: str, layer: int | None, locs: jax.Array, tokens, *,
               impl: str = "auto", check: bool = False) -> Cache:
    """Writes tokens into a pool (SGLang's ``SetKAndS``).

    Args:
      cache: the cache.
      pool: a pool name (token or state pool).
      layer: pool-local layer index, a tuple of them, or None for all layers (see module doc).
      locs: int32[N] locations; -1 is skipped.
      tokens: the pool format's NamedTuple (``formats.MLATokens`` for MLA pools:
        nope fp8[N, 448], rope bf16[N, 64], scale uint8[N, 7]); with ``layer=None`` every field has
        a leading ``[L, ...]`` axis.
      impl: ``"auto" | "reference" | "pallas" | "triton"``.
      check: emit a ``checkify`` check of ``locs`` (use under ``checkify.checkify``).

    Returns:
      The new cache.  Only the written tokens' bytes change (never a scale slot's pad byte).
    """
    _check_impl(impl)
    p = _check_pool_layer(cache, pool, layer)
    locs = _check_locs(locs, p, check=check)
    fmt = p.spec.fmt
    lead = F.check_tokens(fmt, tokens)
    n_sel = p.spec.num_layers if layer is None else len(_layers(layer))
    want = (locs.shape[0],) if _single(layer) else (n_sel, locs.shape[0])
    if tuple(lead) != want:
        raise ValueError(f"tokens must have leading shape {want} "
                         f"({'[N]' if _single(layer) else '[L, N]'} with N = len(locs)), "
                         f"got {tuple(lead)}")
    value, scale = F.to_parts(fmt, tokens)
    if _single(layer):
        value, scale = value[None], scale[None]
    if p.sentinel is not None:  # the stored sentinel row is never overwritten
        locs = jnp.where(locs == p.sentinel, -1, locs)
    b, a = token_addressing(cache.layout, pool, _layers(layer))
    bufs = list(cache.buffers)
    bufs[b] = dispatch.scatter_tokens(bufs[b], locs, value, scale, a, impl=impl)
    return Cache(tuple(bufs), cache.layout)


def get_tokens(cache: Cache, pool: str, layer: int | None, locs: jax.Array, *,
               impl: str = "auto", check: bool = False):
    """Reads tokens from a pool (SGLang's ``GetKAndS``), the exact inverse of ``set_tokens``.

    Returns:
      The pool format's NamedTuple with leading shape ``[N]`` (or ``[L, N]`` for ``layer=None``).
      Padding locations (-1) read as zeros in token pools and as the sentinel row in state pools.
    """
    _check_impl(impl)
    p = _check_pool_layer(cache, pool, layer)
    locs = _check_locs(locs, p, check=check)
    b, a = token_addressing(cache.layout, pool, _layers(layer))
    value, scale = dispatch.gather_tokens(cache.buffers[b], locs, a, impl=impl)
    if p.spec.kind == "state":  # invalid locations read the sentinel value
        sentinel = jnp.asarray(_sentinel_row(p.spec))
        value = jnp.where((locs < 0)[None, :, None], sentinel, value)
    if _single(layer):
        value, scale = value[0], scale[0]
    return F.from_parts(p.spec.fmt, value, scale)


def set_rows(cache: Cache, pool: str, layer: int | None, locs: jax.Array, rows: jax.Array, *,
             impl: str = "auto", check: bool = False) -> Cache:
    """Writes float32 compress-state rows (``rows`` f32[N, W], or f32[L, N, W] for all layers)."""
    _check_pool_layer(cache, pool, layer, kind="state")
    return set_tokens(cache, pool, layer, locs, F.StateRows(rows), impl=impl, check=check)


def get_rows(cache: Cache, pool: str, layer: int | None, locs: jax.Array, *,
             impl: str = "auto", check: bool = False) -> jax.Array:
    """Reads float32 compress-state rows: f32[N, W] (or [L, N, W]); -1 reads the sentinel."""
    _check_pool_layer(cache, pool, layer, kind="state")
    return get_tokens(cache, pool, layer, locs, impl=impl, check=check).row


def read_pages(cache: Cache, pool: str, layer: int) -> jax.Array:
    """All pages of one pool layer as ``uint8[num_pages, page_bytes]`` (for inspection).

    State pools in the layer-major layout have one row per page.
    """
    if not _single(layer):
        raise ValueError(f"layer must be an int for read_pages, got {layer!r}")
    p = _check_pool_layer(cache, pool, layer)
    pl = p.placements[layer]
    buf = cache.buffers[pl.buffer]
    stop = pl.row_base + (p.num_pages - 1) * pl.row_step + 1
    return buf[pl.row_base:stop:pl.row_step, pl.col:pl.col + p.page_bytes]
