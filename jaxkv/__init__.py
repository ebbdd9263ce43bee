"""jaxkv: the KV-cache memory system of DeepSeek-V4 / V3.2 serving, in JAX.

Public surface (pure functions over immutable state)::

    geo    = jaxkv.dsv4_flash()                  # or dsv4_pro(), dsv32(), tiny(...)
    layout = jaxkv.layer_major(geo, pages)       # SGLang's layout, or jaxkv.packed(geo, blocks)
    cache  = jaxkv.init_cache(geo, layout)
    cache  = jaxkv.set_tokens(cache, "c4", layer, locs, tokens)
    tokens = jaxkv.get_tokens(cache, "c4", layer, locs)

Subsystems: ``jaxkv.alloc`` (functional page allocator), ``jaxkv.locs`` (index translations),
``jaxkv.sizing``, ``jaxkv.pages`` (page copies, layout conversion), ``jaxkv.offload`` (retract /
resume), ``jaxkv.host_pool``, ``jaxkv.attention`` (reference sparse decode), ``jaxkv.dcp``;
``jaxkv.interop`` is the torch side (DLPack bridge, torch pool, NIXL transfer).
"""
from jaxkv import formats
from jaxkv.cache import (Cache, get_rows, get_tokens, init_cache, page_addressing, read_pages,
                         set_rows, set_tokens, token_addressing)
from jaxkv.formats import (DSV4_INDEXER, DSV4_MLA, DSV32_MLA, dequantize, quantize,
                           state_format)
from jaxkv.geometry import Geometry, PoolSpec, dsv4_flash, dsv4_pro, dsv32, tiny
from jaxkv.layout import Layout, PoolLayout, layer_major, packed
# Subsystems, as modules: jaxkv.alloc, jaxkv.offload, ... (the torch side is jaxkv.interop,
# imported on demand: it needs torch).
from jaxkv import alloc, attention, dcp, host_pool, locs, offload, pages, sizing  # noqa: E402

__all__ = [
    "alloc", "attention", "dcp", "host_pool", "locs", "offload", "pages", "sizing",
    "Cache", "Geometry", "Layout", "PoolLayout", "PoolSpec", "DSV4_MLA", "DSV4_INDEXER",
    "DSV32_MLA", "dequantize", "dsv4_flash", "dsv4_pro", "dsv32", "formats", "get_rows",
    "get_tokens", "init_cache", "layer_major", "packed", "page_addressing", "quantize",
    "read_pages", "set_rows", "set_tokens", "state_format", "tiny", "token_addressing",
]
