"""One addressing rule for every memory layout.

A cache is a few ``uint8`` buffers shaped ``[rows, row_bytes]``.  For every (pool, layer) the layout
records a ``Placement``: page ``p`` of that layer lives at ``buffer[row_base + p * row_step,
col : col + page_bytes]``.  Inside a page, token ``t``'s value part is at ``t * V`` and its scale
part at ``tpp * V + t * S`` (``formats``).  Kernels receive these numbers, never pools or requests.

Two layouts:

* ``layer_major(geo, pages)`` — SGLang: one buffer per pool, ``row = layer * num_pages + p``,
  ``col = 0``.  Token pools use SGLang's page sizes (``page_size / ratio`` tokens); state pools are
  plain rows (one row per "page").
* ``packed(geo, num_blocks)`` — vLLM (SPEC §8): one buffer ``uint8[num_blocks, block_stride]``,
  ``row = block``, ``col = offset of the layer's slot``; every layer's page of block ``b`` is inside
  row ``b``, so one block is one contiguous byte range and the whole cache one region.

Rows are kept 2-D on purpose: a flat multi-GB byte buffer would need 64-bit offsets, which JAX
does not use with x64 off; ``[rows, row_bytes]`` keeps every index in int32.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Mapping, NamedTuple

from jaxkv.geometry import Geometry, PoolSpec

FLASHMLA_ALIGN = 576  # FlashMLA wants 576-byte aligned pages


class Placement(NamedTuple):
    """Where the pages of one (pool, layer) live: ``buffers[buffer][row_base + p*row_step, col:]``."""

    buffer: int
    row_base: int
    row_step: int
    col: int


class Region(NamedTuple):
    """A memory region a transfer engine registers.

    Attributes:
      buffer: index into ``Cache.buffers``.
      nbytes: bytes of the region (the whole buffer).
      item_bytes: bytes of the unit a transfer moves (a page, or a whole block when packed).
    """

    buffer: int
    nbytes: int
    item_bytes: int


class Slot(NamedTuple):
    """A per-block slot of the packed layout: ``(page_bytes, index)`` at byte ``offset``."""

    page_bytes: int
    index: int
    offset: int


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """The memory layout of one pool.

    Attributes:
      spec: the pool.
      tokens_per_page: tokens (or state rows) per page.
      page_bytes: bytes a page spans (payload + padding).
      num_pages: pages per layer; locations are ``0 .. num_pages * tokens_per_page - 1``.
      placements: one ``Placement`` per pool-local layer.
      stores_sentinel: the last row holds the state sentinel (layer-major state pools).
      groups: pool-local layers grouped by KV-cache group.  Layers of one group share a page
        table (one set of locations addresses them all); in the packed layout layers of
        *different* groups may share a slot, so they must be given different blocks.  Layer-major
        has one group holding every layer.
    """

    spec: PoolSpec
    tokens_per_page: int
    page_bytes: int
    num_pages: int
    placements: tuple[Placement, ...]
    groups: tuple[tuple[int, ...], ...] = ()
    stores_sentinel: bool = False

    def __post_init__(self):
        if not self.groups:
            object.__setattr__(self, "groups", (tuple(range(len(self.placements))),))

    def group_of(self, layer: int) -> int:
        """Index into ``groups`` of a pool-local layer."""
        for g, members in enumerate(self.groups):
            if layer in members:
                return g
        raise ValueError(f"layer {layer} is not a layer of pool {self.name!r}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capacity(self) -> int:
        """Number of locations (tokens or state rows) per layer."""
        return self.num_pages * self.tokens_per_page

    @property
    def sentinel(self) -> int | None:
        """Layer-major state pools: the last row, stored as ``[kv = 0 | score = -inf]`` (SGLang).

        None for token pools and for packed state pools: there layers of different KV-cache
        groups share every slot, so no row is free to hold a sentinel; invalid locations read the
        sentinel *value* in both layouts (``jaxkv.get_rows``).
        """
        return self.capacity - 1 if self.stores_sentinel else None

    @property
    def payload_bytes(self) -> int:
        return self.tokens_per_page * self.spec.fmt.token_bytes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of a cache's memory.

    Attributes:
      kind: ``"layer_major"`` or ``"packed"``.
      geometry: the model geometry.
      buffer_shapes: ``(rows, row_bytes)`` of each uint8 buffer.
      pools: one ``PoolLayout`` per pool, in ``geometry.pools()`` order.
      block_stride: packed only: bytes per block (``buffer_shapes[0][1]``).
      slots: packed only: the per-block slots in offset order.
    """

    kind: str
    geometry: Geometry
    buffer_shapes: tuple[tuple[int, int], ...]
    pools: tuple[PoolLayout, ...]
    block_stride: int | None = None
    slots: tuple[Slot, ...] | None = None

    def pool(self, name: str) -> PoolLayout:
        for p in self.pools:
            if p.name == name:
                return p
        raise ValueError(f"pool must be one of {[p.name for p in self.pools]}, got {name!r}")

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pools)

    @property
    def nbytes(self) -> int:
        return sum(r * c for r, c in self.buffer_shapes)

    def regions(self) -> tuple[Region, ...]:
        """Memory regions for a transfer engine: one per buffer (exactly one when packed).

        ``item_bytes`` is the block stride for packed, the page bytes for layer-major pools.
        """
        if self.kind == "packed":
            return (Region(0, self.nbytes, self.block_stride),)
        out = []
        for i, (rows, cols) in enumerate(self.buffer_shapes):
            out.append(Region(i, rows * cols, cols))
        return tuple(out)

    def describe(self) -> str:
        """Human-readable summary (used by the demo)."""
        lines = [f"{self.kind} layout of {self.geometry.name}: {len(self.buffer_shapes)} buffer(s), "
                 f"{self.nbytes / 2**30:.3f} GiB, {len(self.regions())} region(s)"]
        if self.kind == "packed":
            counts = defaultdict(int)
            for s in self.slots:
                counts[s.page_bytes] += 1
            per = " + ".join(f"{n} x {pb:,} B" for pb, n in counts.items())
            lines.append(f"  {len(self.slots)} slots per block = {per}; "
                         f"block_stride {self.block_stride:,} B")
        for p in self.pools:
            lines.append(f"  {p.name:<17} {p.spec.num_layers:>3} layers x {p.num_pages:>8,} pages"
                         f" x {p.page_bytes:>7,} B ({p.tokens_per_page} per page)")
        return "\n".join(lines)


def _check_pages(geo: Geometry, pages: Mapping[str, int] | int) -> dict[str, int]:
    names = [p.name for p in geo.pools()]
    if isinstance(pages, int):
        pages = {n: pages for n in names}
    unknown = set(pages) - set(names)
    if unknown:
        raise ValueError(f"pages names unknown pools {sorted(unknown)}; pools are {names}")
    missing = [n for n in names if n not in pages]
    if missing:
        raise ValueError(f"pages must give a page count for every pool; missing {missing}")
    for n, v in pages.items():
        if int(v) < 2:
            raise ValueError(f"pages[{n!r}] must be >= 2 (page 0 / the sentinel row is reserved), "
                             f"got {v}")
    return {n: int(v) for n, v in pages.items()}


def layer_major(geo: Geometry, pages: Mapping[str, int] | int,
                indexer_align: int | None = None) -> Layout:
    """SGLang's layout: one ``uint8[num_layers * num_pages, page_bytes]`` buffer per pool.

    Args:
      geo: the geometry.
      pages: per pool, pages per layer (token pools) or rows per layer (state pools, sentinel
        included); or one int for all pools.
      indexer_align: page alignment of the indexer pool (None: the format's, 1 as in SGLang).
    """
    pages = _check_pages(geo, pages)
    pools, shapes = [], []
    for i, spec in enumerate(geo.pools()):
        if spec.kind == "token":
            tpp = geo.page_size // spec.ratio
            align = indexer_align if spec.fmt is geo.indexer else None
            pb = spec.fmt.page_bytes(tpp, align)
        else:
            tpp, pb = 1, spec.fmt.token_bytes
        n = pages[spec.name]
        placements = tuple(Placement(i, layer * n, 1, 0) for layer in range(spec.num_layers))
        pools.append(PoolLayout(spec, tpp, pb, n, placements,
                                stores_sentinel=spec.kind == "state"))
        shapes.append((spec.num_layers * n, pb))
    _check_int32(shapes)
    return Layout("layer_major", geo, tuple(shapes), tuple(pools))


def _check_int32(shapes):
    for rows, cols in shapes:
        if rows >= 2**31 or cols >= 2**31:
            raise ValueError(f"buffer of shape {(rows, cols)} needs indices beyond int32")


def _packed_groups(geo: Geometry, align: int):
    """vLLM's KV-cache groups for the packed layout (SPEC §8).

    Returns a list of groups; each group is a list of ``(pool_name, local_layer, page_bytes)``.
    """
    page = {}
    specs = geo.pools()
    for spec in specs:
        tpp = geo.vllm_block_tokens(spec.name)
        page[spec.name] = (tpp, spec.fmt.page_bytes(tpp, align))
    full_sizes = sorted({page[s.name][1] for s in specs if not s.sliding}, reverse=True)

    def padded(name):  # sliding pools pad their pages up to a full-attention page size
        pb = page[name][1]
        fits = [s for s in full_sizes if s >= pb]
        return min(fits) if fits else pb

    g0 = [(s.name, i, page[s.name][1]) for s in specs if not s.sliding
          for i in range(s.num_layers)]
    # Sliding groups are keyed by (block size, window): SWA; C4 compressor states (both pools);
    # C128 compressor states.
    sliding = defaultdict(list)
    for s in specs:
        if s.sliding:
            key = (page[s.name][0], s.ring or geo.swa_window)
            sliding[key].append(s)

    def tuples(members):  # layers of a group zipped across its page sizes
        by_size = defaultdict(list)
        for m in members:
            by_size[m[2]].append(m)
        n = max(len(v) for v in by_size.values())
        return [[v[j] for v in by_size.values() if j < len(v)] for j in range(n)]

    slide_tuples = []
    for key, ss in sliding.items():
        members = [(s.name, i, padded(s.name)) for s in ss for i in range(s.num_layers)]
        slide_tuples.append(tuples(members))
    t0 = len(tuples(g0)) if g0 else 1
    hi = max([t0] + [len(t) for t in slide_tuples])
    # d: at least G0's tuples, minimising the padding of sliding groups split into d-tuple groups.
    d = min(range(t0, hi + 1),
            key=lambda d: (sum(math.ceil(len(t) / d) * d - len(t) for t in slide_tuples), d))
    groups = [g0] if g0 else []
    for t in slide_tuples:
        k = math.ceil(len(t) / d)
        for j in range(k):  # round-robin split
            groups.append([m for tup in t[j::k] for m in tup])
    return groups, page


def packed(geo: Geometry, num_blocks: int, align: int = FLASHMLA_ALIGN) -> Layout:
    """vLLM's packed per-block layout: ``uint8[num_blocks, block_stride]``.

    Layers are bucketed by page size; the i-th layer of a given page size inside each group takes
    slot ``(page_size, i)``; the slot count per page size is the largest number of layers of that
    size in one group; offsets are cumulative, larger pages first.  DSv4-Pro: 92 slots,
    ``block_stride`` 1,473,408 B; DSv4-Flash: 63 slots, 1,039,680 B.

    Every pool has ``num_blocks`` pages; a block id belongs to one group at a time (the allocator's
    job), so layers of different groups can share a slot.

    Args:
      geo: the geometry.
      num_blocks: blocks in the buffer (block 0 is reserved like page 0).
      align: page alignment (576 for FlashMLA fp8).
    """
    if int(num_blocks) < 2:
        raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
    groups, page = _packed_groups(geo, align)
    counts = defaultdict(int)
    slot_of = {}
    for g in groups:
        seen = defaultdict(int)
        for name, layer, pb in g:
            slot_of[(name, layer)] = (pb, seen[pb])
            seen[pb] += 1
        for pb, n in seen.items():
            counts[pb] = max(counts[pb], n)
    slots, offset, offsets = [], 0, {}
    for pb in sorted(counts, reverse=True):
        for i in range(counts[pb]):
            slots.append(Slot(pb, i, offset))
            offsets[(pb, i)] = offset
            offset += pb
    block_stride = offset
    group_of = {(name, layer): gi for gi, g in enumerate(groups) for name, layer, _ in g}
    pools = []
    for spec in geo.pools():
        tpp = page[spec.name][0]
        pb = slot_of[(spec.name, 0)][0]
        placements = tuple(Placement(0, 0, 1, offsets[slot_of[(spec.name, i)]])
                           for i in range(spec.num_layers))
        gids = sorted({group_of[(spec.name, i)] for i in range(spec.num_layers)})
        pgroups = tuple(tuple(i for i in range(spec.num_layers) if group_of[(spec.name, i)] == g)
                        for g in gids)
        pools.append(PoolLayout(spec, tpp, pb, int(num_blocks), placements, pgroups))
    shapes = ((int(num_blocks), block_stride),)
    _check_int32(shapes)
    return Layout("packed", geo, shapes, tuple(pools), block_stride, tuple(slots))
