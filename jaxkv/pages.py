"""Cache-level page moves: whole-page copies, token-granular copies, layout conversion.

All three are pure functions over ``Cache`` values (jittable with the pool / layers / layout
static) and run through ``jaxkv.kernels.dispatch`` (``impl = "auto" | "reference" | "pallas" |
"triton"``)::

    dst = jaxkv.pages.copy_pages(src, dst, "c4", src_pages, dst_pages)     # every layer of c4
    dst = jaxkv.pages.copy_tokens(src, dst, "swa", src_locs, dst_locs)     # 576-B value + 8-B scale
    new = jaxkv.pages.convert_layout(cache, jaxkv.packed(geo, blocks))

Indices are int32; ``-1`` is padding (the pair is skipped).  Anything else outside the pool is a
``ValueError`` naming the argument when the arrays are concrete, and masked (never clipped) inside
jit.  Copies never write a layer-major state pool's sentinel row.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import Cache, init_cache, page_addressing, token_addressing
from jaxkv.kernels import dispatch
from jaxkv.layout import Layout, PoolLayout

__all__ = ["convert_layout", "copy_pages", "copy_tokens", "equivalent_layer_major_pages"]


def _check_cache(c, arg):
    if not isinstance(c, Cache):
        raise ValueError(f"{arg} must be a jaxkv Cache, got {type(c).__name__}")


def _check_impl(impl):
    if impl not in dispatch.IMPLS:
        raise ValueError(f"impl must be one of {dispatch.IMPLS}, got {impl!r}")


def _check_index(x, bound: int, arg: str, what: str) -> jax.Array:
    """int32[N]; concrete values must be -1 or in [0, bound)."""
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    if len(shape) != 1:
        raise ValueError(f"{arg} must be 1-D int32[N], got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{arg} must be an integer array, got dtype {dtype}")
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x).astype(jnp.int32)
    host = np.asarray(x)
    bad = (host < -1) | (host >= bound)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{arg}[{i}] = {int(host[i])} is outside [0, {bound}) {what} "
                         "(-1 is the only allowed padding value)")
    return jnp.asarray(host.astype(np.int32))


def _check_layers(p: PoolLayout, layers, arg="layers") -> tuple[int, ...]:
    n = p.spec.num_layers
    if layers is None:
        return tuple(range(n))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = (layers,)
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < n:
            raise ValueError(f"{arg} must be pool-local layer indices in [0, {n}) of pool "
                             f"{p.name!r}, or None for all, got {layers!r}")
        out.append(int(x))
    if len(set(out)) != len(out):
        raise ValueError(f"{arg} has a repeated layer: {layers!r}")
    return tuple(out)


def _check_distinct_slots(p: PoolLayout, layers, arg: str):
    places = [p.placements[i] for i in layers]
    if len(set(places)) != len(places):
        raise ValueError(
            f"{arg}: layers {list(layers)} of pool {p.name!r} include layers of different "
            f"KV-cache groups that share a slot in the {arg} layout (groups "
            f"{[list(g) for g in p.groups]}); copy one group at a time (layers=...) with that "
            "group's own indices")


def _pools(src: Cache, dst: Cache, pool: str):
    _check_cache(src, "src_cache")
    _check_cache(dst, "dst_cache")
    sp, dp = src.layout.pool(pool), dst.layout.pool(pool)
    if sp.spec != dp.spec:
        raise ValueError(f"pool {pool!r} differs between src_cache ({sp.spec.fmt.name}, "
                         f"{sp.spec.num_layers} layers) and dst_cache ({dp.spec.fmt.name}, "
                         f"{dp.spec.num_layers} layers)")
    return sp, dp


def _replace(cache: Cache, b: int, buf) -> Cache:
    bufs = list(cache.buffers)
    bufs[b] = buf
    return Cache(tuple(bufs), cache.layout)


def copy_pages(src_cache: Cache, dst_cache: Cache, pool: str, src_pages, dst_pages, *,
               layers=None, impl: str = "auto") -> Cache:
    """Copies whole pages of one pool between two caches (different page numbering).

    Page ``src_pages[i]`` of every selected layer is copied byte for byte (padding included) to
    page ``dst_pages[i]`` of the same layer of ``dst_cache``.  All layers move in one kernel launch.

    Args:
      src_cache, dst_cache: caches holding ``pool`` with the same page size (both layer-major, both
        packed, or any pair whose pool pages have equal ``page_bytes``).  They may be the same
        cache; then source and destination pages must not overlap.
      pool: the pool name.
      src_pages, dst_pages: int32[P] page indices; -1 pairs are skipped.
      layers: pool-local layers (None: all).  Layers that share a packed slot (different
        KV-cache groups) cannot be copied in one call.
      impl: ``"auto" | "reference" | "pallas" | "triton"``.

    Returns:
      The new ``dst_cache``; bytes outside the destination pages are unchanged.
    """
    _check_impl(impl)
    sp, dp = _pools(src_cache, dst_cache, pool)
    if sp.page_bytes != dp.page_bytes or sp.tokens_per_page != dp.tokens_per_page:
        raise ValueError(f"pool {pool!r} pages differ: src {sp.tokens_per_page} tokens / "
                         f"{sp.page_bytes} B, dst {dp.tokens_per_page} tokens / {dp.page_bytes} B; "
                         "whole-page copies need equal pages (use copy_tokens)")
    sel = _check_layers(sp, layers)
    _check_distinct_slots(sp, sel, "src_cache")
    _check_distinct_slots(dp, sel, "dst_cache")
    s = _check_index(src_pages, sp.num_pages, "src_pages", f"(pages of pool {pool!r} in src)")
    d = _check_index(dst_pages, dp.num_pages, "dst_pages", f"(pages of pool {pool!r} in dst)")
    if s.shape != d.shape:
        raise ValueError(f"src_pages and dst_pages must have the same length, got {s.shape[0]} "
                         f"and {d.shape[0]}")
    if dp.sentinel is not None:  # one row per page: never overwrite the sentinel row
        d = jnp.where(d == dp.sentinel, -1, d)
    sb, sa = page_addressing(src_cache.layout, pool, sel)
    db, da = page_addressing(dst_cache.layout, pool, sel)
    out = dispatch.copy_pages(src_cache.buffers[sb], dst_cache.buffers[db], s, d, sa, da,
                              impl=impl)
    return _replace(dst_cache, db, out)


def _raw_token_addressing(layout: Layout, pool: str, layers):
    """Token addressing moving the whole scale slot (pad byte included)."""
    b, a = token_addressing(layout, pool, layers)
    return b, a._replace(scale_bytes=a.scale_stride)


def copy_tokens(src_cache: Cache, dst_cache: Cache, pool: str, src_locs, dst_locs, *,
                layers=None, impl: str = "auto") -> Cache:
    """Token-granular copy of one pool between two caches (SGLang's ``transfer_cache_dsv4_mla``).

    Token ``src_locs[i]`` of every selected layer is copied to ``dst_locs[i]`` of the same layer:
    its value bytes and its whole scale slot (DSv4: 576 B + 8 B, two byte ranges).  Page sizes may
    differ (layer-major SWA 256/page -> packed 64/page).

    Args:
      src_cache, dst_cache: caches holding ``pool`` (same format and layer count).
      pool: the pool name (token or state pool).
      src_locs, dst_locs: int32[N] locations; pairs with a -1 are skipped.
      layers: pool-local layers (None: all); see ``copy_pages``.
      impl: ``"auto" | "reference" | "pallas" | "triton"``.

    Returns:
      The new ``dst_cache``.  A layer-major state pool's sentinel row is never written.
    """
    _check_impl(impl)
    sp, dp = _pools(src_cache, dst_cache, pool)
    sel = _check_layers(sp, layers)
    _check_distinct_slots(sp, sel, "src_cache")
    _check_distinct_slots(dp, sel, "dst_cache")
    s = _check_index(src_locs, sp.capacity, "src_locs", f"(locations of pool {pool!r} in src)")
    d = _check_index(dst_locs, dp.capacity, "dst_locs", f"(locations of pool {pool!r} in dst)")
    if s.shape != d.shape:
        raise ValueError(f"src_locs and dst_locs must have the same length, got {s.shape[0]} "
                         f"and {d.shape[0]}")
    if dp.sentinel is not None:
        d = jnp.where(d == dp.sentinel, -1, d)
    sb, sa = _raw_token_addressing(src_cache.layout, pool, sel)
    db, da = _raw_token_addressing(dst_cache.layout, pool, sel)
    out = dispatch.copy_tokens(src_cache.buffers[sb], dst_cache.buffers[db], s, d, sa, da,
                               impl=impl)
    return _replace(dst_cache, db, out)


def equivalent_layer_major_pages(layout: Layout) -> dict[str, int]:
    """Per pool, the layer-major page count whose capacity equals ``layout``'s (for
    ``jaxkv.layer_major(geo, pages)``).  Raises ValueError if a capacity is not a whole number of
    layer-major pages (SWA: packed blocks must be a multiple of 4 for 256-token pages)."""
    geo = layout.geometry
    out = {}
    for p in layout.pools:
        tpp = geo.page_size // p.spec.ratio if p.spec.kind == "token" else 1
        if p.capacity % tpp:
            raise ValueError(f"pool {p.name!r}: capacity {p.capacity} is not a multiple of the "
                             f"layer-major page ({tpp} tokens)")
        out[p.name] = p.capacity // tpp
    return out


def _group_split(sp: PoolLayout, dp: PoolLayout) -> tuple[tuple[int, ...], ...]:
    """The layer groups a conversion copies one at a time (the side with several groups)."""
    if len(sp.groups) > 1 and len(dp.groups) > 1 and sp.groups != dp.groups:
        raise ValueError(f"pool {sp.name!r}: both layouts split the layers into different "
                         "KV-cache groups; convert through a layer-major cache")
    return sp.groups if len(sp.groups) > 1 else dp.groups


def _shared_groups(layout: Layout) -> set[str]:
    """Pools with a KV-cache group whose slots are also used by another group (of any pool)."""
    cols = {}
    for p in layout.pools:
        for gi, g in enumerate(p.groups):
            for i in g:
                pl = p.placements[i]
                cols.setdefault((pl.buffer, pl.col), set()).add((p.name, gi))
    out = set()
    for owners in cols.values():
        if len(owners) > 1:
            out |= {name for name, _ in owners}
    return out


def _check_disjoint_blocks(layout: Layout, loc_maps: Mapping[str, object]):
    """Concrete per-group maps into ``layout``: groups sharing a slot must use disjoint pages."""
    owners: dict[tuple[int, int], list[tuple[str, int, np.ndarray]]] = {}
    for p in layout.pools:
        maps = loc_maps.get(p.name)
        if not isinstance(maps, (list, tuple)) or len(maps) != len(p.groups):
            continue
        for gi, (g, m) in enumerate(zip(p.groups, maps)):
            if isinstance(m, jax.core.Tracer):
                continue
            host = np.asarray(m)
            pages_ = np.unique(host[host >= 0] // p.tokens_per_page)
            for i in g:
                pl = p.placements[i]
                owners.setdefault((pl.buffer, pl.col), []).append((p.name, gi, pages_))
    for users in owners.values():
        seen = {}
        for name, gi, pages_ in users:
            if (name, gi) in seen:
                continue
            for (n2, g2), other in seen.items():
                both = np.intersect1d(pages_, other)
                if both.size:
                    raise ValueError(
                        f"loc_maps: group {gi} of pool {name!r} and group {g2} of pool {n2!r} "
                        f"share a packed slot and both map tokens into block(s) "
                        f"{both[:4].tolist()}: they would overwrite each other; give every group "
                        "its own blocks")
            seen[(name, gi)] = pages_


def convert_layout(cache: Cache, new_layout: Layout, *,
                   loc_maps: Mapping[str, object] | None = None, impl: str = "auto") -> Cache:
    """The same tokens in another layout (layer-major <-> packed, or a re-sized one).

    Every pool's tokens / state rows are copied token by token (value + whole scale slot) into a
    fresh ``init_cache(geo, new_layout)``; page padding stays zero.

    Location mapping: by default location ``loc`` of every layer goes to the same ``loc``, which
    requires equal capacities per pool (``equivalent_layer_major_pages`` gives the layer-major
    page counts matching a packed layout: state pools have one row per layer-major page and
    4 / 8 rows per packed block, so the row count is what must match).  ``loc_maps[pool]`` gives
    instead an int32[src capacity] array of destination locations (-1 drops the token), or one
    such array per KV-cache group of the layout that has several groups.  In the packed layout,
    layers of different groups share slots (Flash SWA: 22 + 21 layers), so a packed side with
    several groups needs one map per group, and since packed groups (of all pools) share the
    slots of a block, every group must be mapped to its own blocks: the identity map is refused
    for any pool whose packed slots another group also uses (all DSv4 pools; V3.2's are not).

    Args:
      cache: the cache to convert.
      new_layout: a layout of the same geometry.
      loc_maps: optional per-pool location maps (see above).
      impl: kernel implementation.

    Returns:
      A new cache with ``new_layout``.
    """
    _check_cache(cache, "cache")
    _check_impl(impl)
    if not isinstance(new_layout, Layout):
        raise ValueError(f"new_layout must be a jaxkv Layout, got {type(new_layout).__name__}")
    if new_layout.geometry != cache.geometry:
        raise ValueError(f"new_layout is for geometry {new_layout.geometry.name}, the cache for "
                         f"{cache.geometry.name}")
    loc_maps = dict(loc_maps or {})
    unknown = set(loc_maps) - set(new_layout.pool_names)
    if unknown:
        raise ValueError(f"loc_maps names unknown pools {sorted(unknown)}")
    shared = _shared_groups(cache.layout) | _shared_groups(new_layout)
    _check_disjoint_blocks(new_layout, loc_maps)
    out = init_cache(cache.geometry, new_layout)
    for dp in new_layout.pools:
        sp = cache.layout.pool(dp.name)
        groups = _group_split(sp, dp)
        maps = loc_maps.get(dp.name)
        if maps is None:
            if sp.capacity != dp.capacity:
                raise ValueError(
                    f"pool {dp.name!r}: capacities differ ({sp.capacity} locations in the cache, "
                    f"{dp.capacity} in new_layout); equal capacities are needed for the identity "
                    "mapping (see equivalent_layer_major_pages), or pass loc_maps")
            if dp.name in shared:
                raise ValueError(
                    f"pool {dp.name!r} has KV-cache groups ({len(groups)} here) whose packed "
                    "slots are shared with other groups (of this or other pools): the identity "
                    "mapping would overlap; pass loc_maps[pool] with one location map per group, "
                    "every group of every pool on disjoint blocks")
            maps = [jnp.arange(sp.capacity, dtype=jnp.int32)]
        elif isinstance(maps, (list, tuple)):
            if len(maps) != len(groups):
                raise ValueError(f"loc_maps[{dp.name!r}] must hold {len(groups)} maps (one per "
                                 f"group {[list(g) for g in groups]}), got {len(maps)}")
        else:
            if len(groups) > 1:
                raise ValueError(f"loc_maps[{dp.name!r}] must be one map per KV-cache group "
                                 f"({len(groups)} groups)")
            maps = [maps]
        for g, m in zip(groups, maps):
            if jnp.shape(m) != (sp.capacity,):
                raise ValueError(f"loc_maps[{dp.name!r}] must be int32[{sp.capacity}] (one "
                                 f"destination per source location), got shape {jnp.shape(m)}")
            src_locs = jnp.arange(sp.capacity, dtype=jnp.int32)
            if sp.sentinel is not None:  # the source sentinel is not data
                src_locs = src_locs.at[sp.sentinel].set(-1)
            out = copy_tokens(cache, out, dp.name, src_locs, m, layers=g, impl=impl)
    return out
