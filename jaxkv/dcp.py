"""Decode context parallelism (DCP) over a JAX mesh axis (SPEC §9).

MLA / DSA have one latent KV head, so tensor parallelism replicates the cache on every rank.  DCP
splits the **token** dimension of the cache over the ``N`` devices of a mesh axis (``"dcp"``):

Placement
  Each sharded pool (DSv4: ``swa``, ``c4``, ``c128``; V3.2: ``kv``) is addressed with *global*
  locations in a space ``N`` times wider than one device's pool: a request's virtual block ``vb``
  covers ``B * N`` consecutive positions (``B`` = the pool's tokens per page), global loc
  ``g = vb * B * N + p mod (B * N)``.  The owner of ``g`` is ``(g // I) mod N`` and its slot on the
  owner is ``(g // (B*N)) * B + (o // (I*N)) * I + o mod I`` with ``o = g mod (B*N)``
  (``owner`` / ``local_index``, i.e. ``jaxkv.locs.dcp_owner`` / ``dcp_local_index``).  So every rank
  uses the same block table (the virtual block ids are its local page ids) and holds the positions
  ``p`` with ``owner(p) == rank`` as its local sequence ``j = (p // (I*N)) * I + p mod I``, of length
  ``local_len(L, N, I, rank)``.  ``I = 1`` is token round-robin (SGLang's widened loc space:
  owner ``g % N``, slot ``g // N``); ``interleave="page"`` uses ``I = B`` per pool (whole pages).

Replicated state
  The indexer pool (``c4_indexer`` / ``indexer``) stays replicated (every rank computes the same
  global top-k, SPEC §9); it is addressed with the same global locs, so each device holds ``N``
  times the indexer pages of its paired pool.  Compress-state pools are replicated too (per
  request rings, small).  ``capacity`` reports what this costs.

Memory
  ``DCPCache.buffers[i]`` is a global array: sharded pools ``uint8[N * rows, row_bytes]`` with
  ``PartitionSpec(axis)`` (device ``r`` holds rows ``[r * rows, (r+1) * rows)``: exactly its local
  layer-major buffer), replicated pools ``uint8[rows, row_bytes]`` with ``PartitionSpec()``.
  Inside ``shard_map`` a rank sees a plain ``jaxkv.Cache`` of the per-device ``layout``.
  Only the layer-major layout can be sharded this way (the packed layout puts the indexer inside
  every block).

Decode (``decode``): one ``shard_map``: ``all_gather`` of q over heads (tiled), local partial
attention over the rank's own tokens (``jaxkv.attention.attend``), then ``merge``.  SPEC §9's
merge (``method="reduce_scatter"``): all-gather of the LSEs, ``M = max``,
``LSE = M + log sum exp(lse_r - M)``, ``õ_r = exp(lse_r - LSE) * o_r`` (exactly 0 where
``lse_r = -inf``), ``psum_scatter`` over heads.  The default (``"auto"`` -> ``"packed"``) moves the
same bytes with one collective and no pass before it: the attention's output is written in the
chunk-major packed layout ``[N, B, h*(Dv+1)]`` (``pack_partials``: head chunk ``r`` with its LSEs
is one contiguous block), one ``all_to_all`` sends chunk ``r`` to rank ``r``, and the receiver
merges its ``N`` partials in one elementwise pass (``merge_packed``); same result to float32
rounding.  Two more transports of the same packed layout for tiny (latency-bound) decode batches:
``"packed_gather"`` (one ``all_gather`` of all of it, N x the bytes) and ``"packed_rs"`` (the
reduce-scatter collective as a transport: each rank puts its chunk for rank ``r`` into slot
``(r, own rank)`` of a zero ``[N, N, B, w]`` buffer, ``psum_scatter`` delivers every source's chunk
exactly, ``x + 0 = x``).  ``"auto"`` picks them below the per-N byte tables
``AUTO_RS_MAX_BYTES`` / ``AUTO_GATHER_MAX_BYTES`` (``auto_method``).  ``base="2"`` uses exp2/log2
throughout.

Speed (2 x H200, benchmarks/results/dcp-h200x2*; benchmarks/NOTES.md "DCP"): the packed merge is
0.84-1.13x a bare ``psum_scatter`` of the same partials for 2-256 tokens x 128 heads x 512.  For a
single token XLA's default runtime issues each collective from the host, and the all-to-all's
launch (grouped NCCL send/recv + a device copy of the own chunk) costs ~5-8 us more than the
reduce-scatter's, a third of a 20 us merge (1.16-1.75x over runs).  With collectives recorded into
CUDA graphs, as a decode step served from a graph runs them, that launch cost goes and the merge
is 0.84-1.08x at every size: set ``XLA_FLAGS=`` ``COMMAND_BUFFER_XLA_FLAG`` (before JAX starts).

Meshes: build them with ``make_mesh`` (axis type ``Auto``) so that ``shard_map`` may reshard
inputs; every public function here also ``device_put``s concrete inputs to the shardings it wants.
Works with ``jax.shard_map`` (jax >= 0.7) and falls back to ``jax.experimental.shard_map``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv import attention as A
from jaxkv import formats as F
from jaxkv import locs as L
from jaxkv.cache import Cache, get_tokens, init_cache, set_tokens
from jaxkv.geometry import Geometry
from jaxkv.layout import Layout, layer_major

__all__ = [
    "DCPCache", "make_mesh", "init_dcp_cache", "owner", "local_index", "local_len",
    "owner_widened", "physical_widened", "global_locs", "to_local", "local_cache", "set_tokens_dcp",
    "get_tokens_dcp", "merge", "merge_partials", "merge_packed", "pack_partials",
    "unpack_partials", "auto_method", "auto_gather_max_bytes", "auto_rs_max_bytes",
    "AUTO_GATHER_MAX_BYTES", "AUTO_RS_MAX_BYTES", "METHODS",
    "COLLECTIVES", "COMMAND_BUFFER_XLA_FLAG", "decode", "localize_topk", "reshard",
    "reshard_request", "capacity", "kv_capacity", "shard_map",
]

# Placement (SPEC §9): the formulas live in jaxkv.locs; these are the DCP-facing names.
owner = L.dcp_owner
local_index = L.dcp_local_index
local_len = L.dcp_local_len
owner_widened = L.dcp_owner_widened
physical_widened = L.dcp_physical_widened
localize_topk = A.localize_topk

# XLA flag that records collectives into command buffers (CUDA graphs) on GPU: removes the host
# launch cost of the merge's all-to-all (2 x H200, 1 token: 25.7-26.9 us -> 21.1 us, bare
# psum_scatter 21-24 us).  Read when JAX's GPU backend starts: put it in XLA_FLAGS before that.
# (Adding WHILE/CONDITIONAL as well failed to instantiate the graph of a fori_loop there.)
COMMAND_BUFFER_XLA_FLAG = "--xla_gpu_enable_command_buffer=+COLLECTIVES"


def shard_map(f, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.7, ``check_vma=False``) or the older experimental one."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as esm  # pragma: no cover (old jax)
    return esm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def make_mesh(n: int | None = None, devices=None, axis_name: str = "dcp") -> Mesh:
    """A 1-D mesh of ``n`` devices (default: all) over axis ``axis_name``, axis type Auto."""
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs) if n is None else int(n)
    if not 1 <= n <= len(devs):
        raise ValueError(f"n must be in [1, {len(devs)}] (available devices), got {n}")
    arr = np.array(devs[:n])
    at = getattr(jax.sharding, "AxisType", None)
    if at is not None:
        try:
            return Mesh(arr, (axis_name,), axis_types=(at.Auto,))
        except TypeError:  # pragma: no cover (older Mesh signature)
            pass
    return Mesh(arr, (axis_name,))


# ---------------------------------------------------------------------------------------------
# The sharded cache


def _sharded_pools(geo: Geometry) -> tuple[str, ...]:
    return ("swa", "c4", "c128") if geo.is_dsv4 else ("kv",)


def _index_pair(geo: Geometry) -> dict[str, str]:
    """Replicated indexer pool -> the sharded pool whose global locs it shares."""
    return {"c4_indexer": "c4"} if geo.is_dsv4 else {"indexer": "kv"}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["buffers"],
                   meta_fields=["layout", "mesh", "axis_name", "interleave"])
@dataclasses.dataclass(frozen=True)
class DCPCache:
    """A cache sharded over mesh axis ``axis_name`` (see the module docstring).

    Attributes:
      buffers: global uint8 arrays, one per pool (layer-major); sharded pools
        ``[N * rows, row_bytes]`` over ``axis_name``, replicated pools ``[rows, row_bytes]``.
      layout: the per-device layer-major layout (what a rank sees inside ``shard_map``).
      mesh: the device mesh.
      axis_name: the DCP axis.
      interleave: ``((pool, I), ...)`` for every sharded pool.
    """

    buffers: tuple[jax.Array, ...]
    layout: Layout
    mesh: Mesh
    axis_name: str
    interleave: tuple[tuple[str, int], ...]

    @property
    def n(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    @property
    def geometry(self) -> Geometry:
        return self.layout.geometry

    @property
    def sharded(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.interleave)

    def is_sharded(self, pool: str) -> bool:
        return pool in self.sharded

    def inter(self, pool: str) -> int:
        return dict(self.interleave)[pool]

    def specs(self) -> tuple[P, ...]:
        """PartitionSpec of every buffer."""
        return tuple(P(self.axis_name) if p.name in self.sharded else P()
                     for p in self.layout.pools)

    def shardings(self) -> tuple[NamedSharding, ...]:
        return tuple(NamedSharding(self.mesh, s) for s in self.specs())

    def placement(self, rank) -> A.Placement:
        return A.Placement(self.n, rank, self.interleave)

    def global_capacity(self, pool: str) -> int:
        """Global locations of ``pool`` (``N *`` the per-device capacity for sharded pools)."""
        c = self.layout.pool(pool).capacity
        return c * self.n if pool in self.sharded else c


def init_dcp_cache(geo: Geometry, pages: Mapping[str, int] | int, mesh: Mesh, *,
                   interleave: int | str = 1, axis_name: str = "dcp") -> DCPCache:
    """A zero DCP cache (state pools' sentinel rows set).

    Args:
      geo: the geometry.
      pages: per pool, pages per layer *on each device* (as ``layer_major``).  The replicated
        indexer pool is sized ``N *`` its paired pool's pages (it holds every global loc); its own
        entry, if given, is ignored.
      mesh: a mesh with axis ``axis_name`` (``make_mesh``).
      interleave: ``I`` in tokens of each sharded pool (must divide every sharded pool's tokens
        per page), or ``"page"`` for ``I`` = each pool's tokens per page.
      axis_name: the DCP mesh axis.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r} (axes {tuple(mesh.shape)})")
    n = int(mesh.shape[axis_name])
    names = [p.name for p in geo.pools()]
    pages = {k: int(pages) for k in names} if isinstance(pages, (int, np.integer)) else dict(pages)
    for idx, paired in _index_pair(geo).items():
        if paired not in pages:
            raise ValueError(f"pages must give a page count for pool {paired!r}")
        pages[idx] = pages[paired] * n
    layout = layer_major(geo, pages)
    inter = []
    for pool in _sharded_pools(geo):
        tpp = layout.pool(pool).tokens_per_page
        if interleave == "page":
            I = tpp
        elif isinstance(interleave, (int, np.integer)) and not isinstance(interleave, bool):
            I = int(interleave)
        else:
            raise ValueError(f"interleave must be a positive int or 'page', got {interleave!r}")
        if I < 1 or tpp % I:
            raise ValueError(f"interleave {I} must divide pool {pool!r}'s tokens per page ({tpp})")
        inter.append((pool, I))
    dc = DCPCache((), layout, mesh, axis_name, tuple(inter))

    def make():
        local = init_cache(geo, layout).buffers
        return tuple(jnp.zeros((n * b.shape[0], b.shape[1]), b.dtype) if p.name in dc.sharded
                     else b for p, b in zip(layout.pools, local))

    bufs = jax.jit(make, out_shardings=dc.shardings())()
    return dataclasses.replace(dc, buffers=tuple(bufs))


def local_cache(dc: DCPCache, buffers) -> Cache:
    """Inside ``shard_map``: the rank's local buffers as a plain ``Cache`` of ``dc.layout``."""
    return Cache(tuple(buffers), dc.layout)


def global_locs(dc: DCPCache, pool: str, positions: jax.Array, block_table: jax.Array) -> jax.Array:
    """Global locations of per-request positions: int32[B, T] (-1 where invalid).

    ``block_table`` int32[B, P] holds virtual block ids; each covers ``B * N`` positions of a
    sharded pool or of the replicated indexer (``B`` = the pool's tokens per page).  State pools
    have no block table.
    """
    p = dc.layout.pool(pool)
    if p.spec.kind != "token":
        raise ValueError(f"pool {pool!r} is a state pool: pass row locations directly")
    return A.paged_locs(positions, block_table, p.tokens_per_page * dc.n)


def to_local(dc: DCPCache, pool: str, locs: jax.Array, rank) -> jax.Array:
    """Global locs -> this rank's local locs (-1 where another rank owns the token).

    Replicated pools keep their (global) locs.
    """
    locs = jnp.asarray(locs, jnp.int32)
    if pool not in dc.sharded:
        return locs
    I, tpp = dc.inter(pool), dc.layout.pool(pool).tokens_per_page
    mine = L.dcp_owner(locs, dc.n, I) == rank
    return jnp.where(mine, L.dcp_local_index(locs, dc.n, I, tpp), -1)


def _traced(x) -> bool:
    tracer = getattr(jax.core, "Tracer", None)
    if tracer is not None:
        return isinstance(x, tracer)
    try:  # pragma: no cover (a jax without jax.core.Tracer)
        np.asarray(x)
        return False
    except Exception:  # noqa: BLE001
        return True


def _check_global_locs(dc: DCPCache, pool: str, locs, arg: str = "locs") -> jax.Array:
    shape = jnp.shape(locs)
    if len(shape) != 1:
        raise ValueError(f"{arg} must be 1-D int32[N], got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(locs), jnp.integer):
        raise ValueError(f"{arg} must be an integer array, got {jnp.result_type(locs)}")
    cap = dc.global_capacity(pool)
    if not _traced(locs):
        host = np.asarray(locs)
        bad = (host < -1) | (host >= cap)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{arg}[{i}] = {int(host[i])} is outside [0, {cap}) (the global "
                             f"locations of pool {pool!r}; -1 is padding)")
        return jnp.asarray(host.astype(np.int32))
    return jnp.asarray(locs, jnp.int32)


def _put(x, mesh, spec):
    """device_put a concrete array to ``NamedSharding(mesh, spec)`` (traced values pass through)."""
    if x is None or _traced(x):
        return x
    return jax.device_put(x, NamedSharding(mesh, spec))


def _put_tree(tree, mesh, spec=P()):
    return jax.tree_util.tree_map(lambda x: _put(x, mesh, spec), tree)


def set_tokens_dcp(dc: DCPCache, pool: str, layer: int | None, locs: jax.Array, tokens, *,
                   impl: str = "auto") -> DCPCache:
    """Writes tokens at global locations: each rank keeps only the tokens it owns, at its slot.

    Args:
      dc: the DCP cache.
      pool: any pool (sharded pools are localized; replicated ones are written on every rank).
      layer: pool-local layer index, or None for all layers (tokens with a leading ``[L]`` axis).
      locs: int32[N] global locations (``global_locs``); -1 is skipped.
      tokens: the pool format's NamedTuple (replicated).

    Returns:
      The new DCP cache (only owned slots of sharded pools change; nothing else).
    """
    locs = _check_global_locs(dc, pool, locs)
    F.check_tokens(dc.layout.pool(pool).spec.fmt, tokens)
    return _set_tokens_jit(dc, pool, layer, _put(locs, dc.mesh, P()), _put_tree(tokens, dc.mesh),
                           impl)


@functools.partial(jax.jit, static_argnames=("pool", "layer", "impl"))
def _set_tokens_jit(dc, pool, layer, locs, tokens, impl):
    specs = dc.specs()
    bi = dc.layout.pool(pool).placements[0].buffer

    def body(bufs, locs, tokens):
        rank = lax.axis_index(dc.axis_name)
        c = set_tokens(local_cache(dc, bufs), pool, layer, to_local(dc, pool, locs, rank),
                       tokens, impl=impl)
        return c.buffers[bi]

    new = shard_map(body, mesh=dc.mesh, in_specs=(specs, P(), P()), out_specs=specs[bi])(
        dc.buffers, locs, tokens)
    bufs = list(dc.buffers)
    bufs[bi] = new
    return dataclasses.replace(dc, buffers=tuple(bufs))


def get_tokens_dcp(dc: DCPCache, pool: str, layer: int | None, locs: jax.Array, *,
                   impl: str = "auto"):
    """Reads tokens at global locations, from whichever rank owns each (replicated result).

    Each rank reads its own tokens (others read as zeros), and a ``psum`` of the raw bytes over the
    DCP axis assembles them: exact, since exactly one rank contributes non-zero bytes per token.
    -1 reads zeros (token pools) or the sentinel row (state pools), as ``jaxkv.get_tokens``.
    """
    locs = _check_global_locs(dc, pool, locs)
    return _get_tokens_jit(dc, pool, layer, _put(locs, dc.mesh, P()), impl)


@functools.partial(jax.jit, static_argnames=("pool", "layer", "impl"))
def _get_tokens_jit(dc, pool, layer, locs, impl):
    fmt = dc.layout.pool(pool).spec.fmt
    sharded = pool in dc.sharded

    def body(bufs, locs):
        rank = lax.axis_index(dc.axis_name)
        toks = get_tokens(local_cache(dc, bufs), pool, layer, to_local(dc, pool, locs, rank),
                          impl=impl)
        value, scale = F.to_parts(fmt, toks)
        if sharded:
            value, scale = lax.psum(value, dc.axis_name), lax.psum(scale, dc.axis_name)
        return value, scale

    value, scale = shard_map(body, mesh=dc.mesh, in_specs=(dc.specs(), P()),
                             out_specs=(P(), P()))(dc.buffers, locs)
    return F.from_parts(fmt, value, scale)


# ---------------------------------------------------------------------------------------------
# The merge


def _axis_size(axis_name: str) -> int:
    size = getattr(lax, "axis_size", None)
    return int(size(axis_name)) if size is not None else int(lax.psum(1, axis_name))


def _exp_log(base: str):
    A._check_base(base)
    return (jnp.exp, jnp.log) if base == "e" else (jnp.exp2, jnp.log2)


def _combine(lses: jax.Array, base: str):
    """lses f32[N, ...] -> (LSE f32[...], weights f32[N, ...]) with weight 0 where lse = -inf."""
    exp, log = _exp_log(base)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    has = lses > -jnp.inf
    e = jnp.where(has, exp(jnp.where(has, lses, 0.0) - m_safe), 0.0)
    s = jnp.sum(e, axis=0)
    lse = jnp.where(s > 0, m_safe + log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
    w = jnp.where(has, exp(jnp.where(has, lses, 0.0) - jnp.where(s > 0, lse, 0.0)), 0.0)
    return lse, w


def merge_partials(outs: jax.Array, lses: jax.Array, base: str = "e"):
    """Merges N partial attentions held in one place (no collectives).

    Args:
      outs: f32[N, B, h, Dv] normalized partial outputs.
      lses: f32[N, B, h] their log-sum-exps (``-inf`` = no keys).
      base: ``"e"`` or ``"2"``.

    Returns:
      ``(out f32[B, h, Dv], lse f32[B, h])``; parts with ``lse = -inf`` contribute exactly 0.
    """
    lse, w = _combine(jnp.asarray(lses, jnp.float32), base)
    o = jnp.where((w > 0)[..., None], jnp.asarray(outs, jnp.float32) * w[..., None], 0.0)
    return jnp.sum(o, axis=0), lse


def _merge_sources(o_of, l_of, n: int, base: str):
    """Merge of ``n`` partials, written elementwise so that it can be one fused pass.

    ``o_of(r)`` -> f32[..., Dv] and ``l_of(r)`` -> f32[...]: output and lse of source ``r``.
    Everything is unrolled over the (static, small) ``n``: ``m = max_r lse_r``,
    ``e_r = base^(lse_r - m)`` (exactly 0 where ``lse_r = -inf``), ``s = sum_r e_r``,
    ``out = sum_r e_r / s * o_r`` over the sources with ``e_r > 0`` (a source with no keys is
    never multiplied, so NaN/inf garbage there cannot leak), ``LSE = m + log(s)``.  No reduce and
    no ``[n, ..., Dv]`` intermediate: XLA GPU can fuse the weights (f32 exp/divide count as cheap
    there) into the single elementwise pass that reads each received partial once and writes the
    output once; ``log`` only touches the small ``[...]`` LSE.
    """
    exp, log = _exp_log(base)
    lses = [l_of(r) for r in range(n)]
    m = lses[0]
    for x in lses[1:]:
        m = jnp.maximum(m, x)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    es = [jnp.where(x > -jnp.inf, exp(x - m_safe), 0.0) for x in lses]
    s = es[0]
    for e in es[1:]:
        s = s + e
    ok = s > 0
    inv = 1.0 / jnp.where(ok, s, 1.0)
    acc = None
    for r, e in enumerate(es):
        wr = (e * inv)[..., None]
        term = jnp.where(wr > 0, o_of(r) * wr, 0.0)
        acc = term if acc is None else acc + term
    return acc, jnp.where(ok, m_safe + log(jnp.where(ok, s, 1.0)), -jnp.inf)


def pack_partials(out: jax.Array, lse: jax.Array, n: int) -> jax.Array:
    """The producer's packed layout for ``merge_packed``: f32[N, B, h * (Dv + 1)].

    ``packed[r, b] = [out[b, r*h:(r+1)*h, :].ravel() | lse[b, r*h:(r+1)*h]]``: head chunk ``r``
    (the chunk rank ``r`` keeps) is contiguous and major, so the ``all_to_all`` moves whole
    contiguous blocks (no relayout), and ``o`` stays 16-byte aligned (``lse`` trails each row).
    Inside a jitted producer XLA writes this directly from the attention's last elementwise
    fusion (the concatenate fuses there), so emitting it costs no extra pass over ``out``.

    Args:
      out: f32[B, H, Dv] partial output, ``H = n * h``.
      lse: f32[B, H].
      n: the DCP size.
    """
    out = jnp.asarray(out, jnp.float32)
    lse = jnp.asarray(lse, jnp.float32)
    B, H, Dv = out.shape
    if lse.shape != (B, H):
        raise ValueError(f"lse must be f32[{B}, {H}] (out's [B, H]), got {lse.shape}")
    if n < 1 or H % n:
        raise ValueError(f"heads ({H}) must be a multiple of n ({n})")
    h = H // n
    packed = jnp.concatenate([out.reshape(B, n, h * Dv), lse.reshape(B, n, h)], axis=-1)
    return jnp.moveaxis(packed, 1, 0)


def unpack_partials(packed: jax.Array, dv: int = A.DV):
    """Inverse of ``pack_partials``.

    f32[N, B, h*(dv+1)] -> ``(out f32[B, N*h, dv], lse f32[B, N*h])``.
    """
    n, B, width = packed.shape
    if width % (dv + 1):
        raise ValueError(f"packed rows ({width}) must be a multiple of dv + 1 = {dv + 1}")
    h = width // (dv + 1)
    o = jnp.moveaxis(packed[..., :h * dv].reshape(n, B, h, dv), 0, 1).reshape(B, n * h, dv)
    lse = jnp.moveaxis(packed[..., h * dv:], 0, 1).reshape(B, n * h)
    return o, lse


COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter")


def _slot_buffer(packed: jax.Array, axis_name: str, n: int, h: int, dv: int) -> jax.Array:
    """The ``collective="reduce_scatter"`` send buffer: f32[N (dest), N (slot), B, h*(dv+1)].

    ``z[r, j] = packed[r]`` (sanitized) for ``j`` = this rank, zeros elsewhere, so the sum over
    ranks of ``z[r, j]`` is rank ``j``'s chunk ``r`` exactly (``x + 0 = x``, ``-inf + 0 = -inf``).
    Sanitized first, because ``NaN + 0 = NaN`` and an empty rank's output may be garbage: rows
    with ``lse = -inf`` (or NaN) send ``o = 0`` and ``lse = -inf``.  One elementwise fusion.
    """
    B = packed.shape[1]
    o = packed[..., :h * dv].reshape(n, B, h, dv)
    lse = packed[..., h * dv:]
    has = lse > -jnp.inf  # False for -inf and NaN
    o = jnp.where(has[..., None], o, 0.0).reshape(n, B, h * dv)
    clean = jnp.concatenate([o, jnp.where(has, lse, -jnp.inf)], axis=-1)
    mine = lax.broadcasted_iota(jnp.int32, (1, n, 1, 1), 1) == lax.axis_index(axis_name)
    return jnp.where(mine, clean[:, None], 0.0)


def merge_packed(packed: jax.Array, axis_name: str, base: str = "e", *, dv: int = A.DV,
                 collective: str = "all_to_all"):
    """The merge on the producer's packed layout; call inside ``shard_map``.

    ``collective="all_to_all"``: one ``all_to_all`` (split and concat dimension 0: chunk ``r`` of
    every rank goes to rank ``r`` as whole contiguous blocks).  Per rank it sends
    ``(N-1)/N * B*H*(dv+1)*4`` bytes (the bare ``psum_scatter`` of ``out`` sends
    ``(N-1)/N * B*H*dv*4``).

    ``collective="all_gather"``: one ``all_gather`` of the whole packed partials (every rank
    receives all ``N`` ranks' ``[N, B, h*(dv+1)]``, ``N`` times the all-to-all's bytes) and keeps
    only its own chunk of each.

    ``collective="reduce_scatter"``: the reduce-scatter collective used as a transport.  Each rank
    writes its (sanitized: ``o = 0``, ``lse = -inf`` where ``lse`` is ``-inf``/NaN) chunk ``r``
    into slot ``(r, own rank)`` of a zero ``f32[N, N, B, h*(dv+1)]`` buffer and ``psum_scatter``
    over the first dimension sums it: rank ``r`` receives ``[N (source), B, h*(dv+1)]``, every
    source's chunk exactly (all other addends are ``+0``).  Sends ``(N-1) * B*H*(dv+1)*4``
    bytes per rank (as the all-gather; ``H = N*h``), but through the collective that was the
    fastest at tiny sizes on 2 x H200.  Bit-identical to the other transports except that a
    ``-0.0`` in ``o`` arrives as ``+0.0``.

    The gather and reduce-scatter transports are for tiny decode batches, where the collective
    is latency-bound (``auto_method``).  Every transport then merges the ``N`` received partials
    in one elementwise pass (``_merge_sources``): HBM read ``B*H*(dv+1)*4`` (its chunks), write
    ``B*h*(dv+1)*4``.

    Args:
      packed: f32[N, B, h*(dv+1)] from ``pack_partials`` (or written so by the attention).
      axis_name: the DCP mesh axis (size ``N``).
      base: ``"e"`` or ``"2"``.
      dv: value width.
      collective: ``"all_to_all"``, ``"all_gather"`` or ``"reduce_scatter"``.

    Returns:
      ``(out f32[B, h, dv], lse f32[B, h])`` for this rank's heads ``[rank*h, (rank+1)*h)``.
    """
    packed = jnp.asarray(packed, jnp.float32)
    n = _axis_size(axis_name)
    if packed.ndim != 3 or packed.shape[0] != n or packed.shape[2] % (dv + 1):
        raise ValueError(f"packed must be f32[{n}, B, h*({dv}+1)] (pack_partials), got "
                         f"{packed.shape}")
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    _, B, width = packed.shape
    h = width // (dv + 1)
    if collective == "all_to_all":
        got = lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # [N (source), B, h*(dv+1)]
    elif collective == "all_gather":
        # gathered over the major dim (no relayout): [N (source), N (chunk), B, h*(dv+1)]; this
        # rank's chunk of every source is one contiguous block, read in place by the merge
        every = lax.all_gather(packed, axis_name, axis=0, tiled=False)
        got = lax.dynamic_index_in_dim(every, lax.axis_index(axis_name), 1, keepdims=False)
    else:
        # [N (dest), N (source slot), B, w] summed over ranks, dest dim scattered:
        # [N (source), B, h*(dv+1)], each slot written by exactly one rank
        got = lax.psum_scatter(_slot_buffer(packed, axis_name, n, h, dv), axis_name,
                               scatter_dimension=0, tiled=False)
    # per-source slices: each stays inside one received block
    return _merge_sources(lambda r: got[r, :, :h * dv].reshape(B, h, dv),
                          lambda r: got[r, :, h * dv:], n, base)


METHODS = ("auto", "reduce_scatter", "all_to_all", "all_to_all_packed", "packed",
           "packed_gather", "packed_rs")

# method="auto" for tiny (latency-bound) batches: the transport of the packed partials, by the
# bytes of partial output per rank, B * H * Dv * 4 (the bytes of the bare psum_scatter the
# target compares with).  auto picks "packed_rs" up to AUTO_RS_MAX_BYTES[N], else
# "packed_gather" up to AUTO_GATHER_MAX_BYTES[N], else the all-to-all ("packed" /
# "all_to_all_packed").  0 = never.
#
# AUTO_GATHER_MAX_BYTES, N = 2: never.  2 x H200 run 3 (/work/notes/gpu10, benchmarks/results/
# dcp-h200x2.md; 8 interleaved rounds, medians, 128 heads x 512): merge_gather lost to the
# all-to-all merge (merge_packed) at every T = 1..256 (T = 1: 30.2 vs 26.5 us; T = 2: 21.9 vs
# 19.4 us); its collective alone (bare_ag, 25.2 us at T = 1) was no faster than the all-to-all
# (bare_a2a, 28.0 us) by more than the noise, and it moves N x the bytes.
#
# AUTO_RS_MAX_BYTES, N = 2: never.  2 x H200 run 4 and session 3's runs: merge_prs lost to
# merge_packed at every T (T = 1: 32.5-41.7 vs 25.7-34.7 us): its zero-padded N x buffer and
# extra kernel cost more than the reduce-scatter's lower launch latency saves.
#
# Other N (not measured): both transports receive (N-1) x the packed bytes against (N-1)/N x
# for the all-to-all, so the N = 2 entry scaled to the same received bytes, / (N - 1).
AUTO_RS_MAX_BYTES = {2: 0}
AUTO_GATHER_MAX_BYTES = {2: 0}


def _auto_max(table: dict, n: int) -> int:
    return table[n] if n in table else table.get(2, 0) // max(n - 1, 1)


def auto_rs_max_bytes(n: int) -> int:
    """Largest per-rank partial bytes ``B*H*Dv*4`` at which ``auto`` uses ``packed_rs``."""
    return _auto_max(AUTO_RS_MAX_BYTES, n)


def auto_gather_max_bytes(n: int) -> int:
    """Largest per-rank partial bytes ``B*H*Dv*4`` at which ``auto`` uses ``packed_gather``."""
    return _auto_max(AUTO_GATHER_MAX_BYTES, n)


def auto_method(tokens: int, heads: int, dv: int, n: int, *, packed_input: bool = False) -> str:
    """The merge variant ``method="auto"`` uses for a ``[tokens, heads, dv]`` f32 merge over N.

    ``n = 1``: ``reduce_scatter`` (no collective: it degenerates to the local scaling).
    Partials of at most ``auto_rs_max_bytes(n)`` bytes per rank (``tokens*heads*dv*4``):
    ``packed_rs``; else at most ``auto_gather_max_bytes(n)``: ``packed_gather``; else one
    all-to-all, ``packed`` where the producer can emit the packed layout (no packing copy),
    else ``all_to_all_packed``.  From the 2 x H200 measurements (benchmarks/results/
    dcp-h200x2*.md, T = 1..256 x 128 heads x 512): the one-collective all-to-all merge was within
    1.15x of the bare reduce-scatter from T = 2 up and neither small-T transport ever beat it; at
    T = 1 the all-to-all's host launch cost is what is left (1.16-1.75x over runs), which
    ``COMMAND_BUFFER_XLA_FLAG`` removes (0.89x), not a different transport.
    """
    if n == 1:
        return "reduce_scatter"
    nbytes = tokens * heads * dv * 4
    if nbytes <= auto_rs_max_bytes(n):
        return "packed_rs"
    if nbytes <= auto_gather_max_bytes(n):
        return "packed_gather"
    return "packed" if packed_input else "all_to_all_packed"


_PACKED = {"packed": "all_to_all", "packed_gather": "all_gather", "packed_rs": "reduce_scatter"}


def merge(out: jax.Array, lse: jax.Array, axis_name: str, base: str = "e", *,
          method: str = "reduce_scatter"):
    """Merges partial attention across the DCP axis; call inside ``shard_map``.

    Args:
      out: f32[B, H, Dv] this rank's partial output for all ``H = N * h`` gathered heads.
      lse: f32[B, H] its log-sum-exp (``-inf`` where the rank holds no keys).
      axis_name: the DCP mesh axis.
      base: ``"e"`` or ``"2"`` (must match how ``lse`` was computed).
      method: ``"reduce_scatter"`` (SPEC §9: all-gather LSEs, scale, ``psum_scatter`` over heads)
        or ``"all_to_all"`` (``all_to_all`` of the head chunks of ``out`` and of ``lse``, merged
        locally on the receiving rank: no scaling pass before the collective), or
        ``"all_to_all_packed"`` (one ``all_to_all`` of ``[out | lse]`` rows: one collective, plus a
        packing copy), or ``"packed"`` (``pack_partials`` + ``merge_packed``: chunk-major packed
        layout, whole-block ``all_to_all``; the packing fuses into a jitted producer), or
        ``"packed_gather"`` (the same packed layout, one ``all_gather`` of all of it: N x the
        bytes, for tiny latency-bound batches), or ``"packed_rs"`` (the same packed layout,
        carried by one ``psum_scatter`` of a zero-padded ``[N, N, B, w]`` slot buffer: exact,
        N x the bytes, tiny batches), or ``"auto"`` (``auto_method``).  All give the
        same result (to float32 rounding); the receiving-side merges are one fused pass
        (``_merge_sources``).

    Returns:
      ``(out f32[B, h, Dv], lse f32[B, h])`` for this rank's heads ``[rank*h, (rank+1)*h)``.
    """
    out = jnp.asarray(out, jnp.float32)
    lse = jnp.asarray(lse, jnp.float32)
    n = _axis_size(axis_name)
    B, H, Dv = out.shape
    if H % n:
        raise ValueError(f"heads ({H}) must be a multiple of the DCP size ({n})")
    h = H // n
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = auto_method(B, H, Dv, n)
    if method in _PACKED:  # pack here (a jitted producer fuses the packing)
        return merge_packed(pack_partials(out, lse, n), axis_name, base, dv=Dv,
                            collective=_PACKED[method])
    if method == "reduce_scatter":
        lses = lax.all_gather(lse, axis_name)  # [N, B, H]
        total, w = _combine(lses, base)
        rank = lax.axis_index(axis_name)
        mine = lax.dynamic_index_in_dim(w, rank, 0, keepdims=False)
        scaled = jnp.where((mine > 0)[..., None], out * mine[..., None], 0.0)
        res = lax.psum_scatter(scaled, axis_name, scatter_dimension=1, tiled=True)
        return res, lax.dynamic_slice_in_dim(total, rank * h, h, axis=1)
    if method == "all_to_all":
        # head chunk r of every rank goes to rank r: [B, N, h, Dv] -> [B, N (source), h, Dv]
        got_o = lax.all_to_all(out.reshape(B, n, h, Dv), axis_name, 1, 1, tiled=True)
        got_l = lax.all_to_all(lse.reshape(B, n, h), axis_name, 1, 1, tiled=True)
        return _merge_sources(lambda r: got_o[:, r], lambda r: got_l[:, r], n, base)
    # all_to_all_packed
    packed = jnp.concatenate([out, lse[..., None]], axis=-1).reshape(B, n, h, Dv + 1)
    got = lax.all_to_all(packed, axis_name, 1, 1, tiled=True)  # [B, N (source rank), h, Dv + 1]
    return _merge_sources(lambda r: got[:, r, :, :Dv], lambda r: got[:, r, :, Dv], n, base)


# ---------------------------------------------------------------------------------------------
# Decode


def decode(dc: DCPCache, q: jax.Array, layer: int, *, seq_lens: jax.Array,
           block_table: jax.Array, swa_block_table: jax.Array | None = None,
           index_q: jax.Array | None = None, index_w: jax.Array | None = None,
           topk: int | None = None, scale: float | None = None, base: str = "e",
           compact: bool = False, method: str = "auto", impl: str = "auto"):
    """DCP sparse MLA decode of one layer: one ``shard_map`` over the DCP axis.

    Each rank all-gathers q over heads, attends over its own tokens (dense segments by local
    lengths, top-k segments localized), and ``merge`` returns its heads.

    Args:
      dc: the DCP cache.
      q: f32[B, H, W] queries, H a multiple of N; sharded (or to be sharded) over heads.
      layer: model layer id.
      seq_lens, block_table, swa_block_table, index_q, index_w, topk: as
        ``jaxkv.attention.sparse_decode`` (block tables hold virtual block ids of ``B * N``
        positions); replicated.
      scale, base: softmax scale and LSE base.
      compact: compact localized top-k lists valid-first.
      method: merge method (see ``merge``); ``"auto"`` for N > 1: the attention's output fusion
        writes the packed layout, then one ``all_to_all`` (``"packed"``) or, for tiny batches
        (``auto_method``'s tables), one ``psum_scatter`` of the slot buffer (``"packed_rs"``) or
        one ``all_gather`` (``"packed_gather"``), and one merge pass.

    Returns:
      ``(out f32[B, H, 512], lse f32[B, H])`` sharded over heads; equal (to float32 rounding) to
      ``sparse_decode`` on an unsharded cache holding the same tokens.
    """
    A._check_base(base)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    W = dc.geometry.mla.width
    if jnp.ndim(q) != 3 or jnp.shape(q)[2] != W or jnp.shape(q)[1] % dc.n:
        raise ValueError(f"q must be float[B, H, {W}] with H a multiple of N = {dc.n}, got "
                         f"{jnp.shape(q)}")
    rep = {"seq_lens": seq_lens, "block_table": block_table, "swa_block_table": swa_block_table,
           "index_q": index_q, "index_w": index_w}
    rep = {k: v for k, v in rep.items() if v is not None}
    qspec = P(None, dc.axis_name, None)
    return _decode_jit(dc, _put(jnp.asarray(q, jnp.float32), dc.mesh, qspec),
                       _put_tree(rep, dc.mesh), layer=layer, topk=topk, scale=scale, base=base,
                       compact=compact, method=method, impl=impl)


@functools.partial(jax.jit, static_argnames=("layer", "topk", "scale", "base", "compact",
                                             "method", "impl"))
def _decode_jit(dc, q, rep, *, layer, topk, scale, base, compact, method, impl):
    axis = dc.axis_name

    def body(bufs, q, rep):
        rank = lax.axis_index(axis)
        q_all = lax.all_gather(q, axis, axis=1, tiled=True)
        kv, valid, _ = A.gather_kv(local_cache(dc, bufs), layer, topk=topk,
                                   placement=dc.placement(rank), compact=compact, impl=impl, **rep)
        o, lse = A.attend(q_all, kv, valid, scale=scale, base=base)
        m = method
        if m == "auto":  # the producer is right here: it emits the packed layout
            m = auto_method(o.shape[0], o.shape[1], o.shape[2], dc.n, packed_input=True)
        return merge(o, lse, axis, base, method=m)

    qspec = P(None, axis, None)
    return shard_map(body, mesh=dc.mesh, in_specs=(dc.specs(), qspec, P()),
                     out_specs=(qspec, P(None, axis)))(dc.buffers, q, rep)


# ---------------------------------------------------------------------------------------------
# N -> M re-sharding


def reshard(src: DCPCache, dst: DCPCache, pool: str, src_locs: jax.Array, dst_locs: jax.Array,
            *, impl: str = "auto") -> DCPCache:
    """Copies tokens (all layers of ``pool``) between DCP caches of any widths N -> M, bit-exact.

    Works for N = M, 1 -> N, N -> 1 and N -> M, on the same or different meshes (one process):
    the tokens are assembled from their owners on ``src`` (raw bytes, ``get_tokens_dcp``), moved to
    ``dst``'s mesh and written to their new owners (``set_tokens_dcp``).

    Args:
      src, dst: DCP caches of the same geometry.
      pool: pool name (token or state pool).
      src_locs, dst_locs: int32[T] global locations (``global_locs``) in ``src`` / ``dst``; -1
        entries are skipped (and must be -1 in both).

    Returns:
      The new ``dst``.
    """
    if src.geometry != dst.geometry:
        raise ValueError("src and dst must have the same geometry")
    sl = _check_global_locs(src, pool, src_locs, "src_locs")
    dl = _check_global_locs(dst, pool, dst_locs, "dst_locs")
    if sl.shape != dl.shape:
        raise ValueError(f"src_locs and dst_locs must have the same shape, got {sl.shape} and "
                         f"{dl.shape}")
    if not _traced(sl) and not _traced(dl):
        if not np.array_equal(np.asarray(sl) < 0, np.asarray(dl) < 0):
            raise ValueError("src_locs and dst_locs must have -1 at the same entries")
    toks = get_tokens_dcp(src, pool, None, sl, impl=impl)
    fmt = src.layout.pool(pool).spec.fmt
    value, scale = F.to_parts(fmt, toks)  # raw bytes cross meshes, never converted values
    value, scale = _put(value, dst.mesh, P()), _put(scale, dst.mesh, P())
    return set_tokens_dcp(dst, pool, None, dl, F.from_parts(fmt, value, scale), impl=impl)


def _np_paged_locs(pos: np.ndarray, table, block: int, pool: str, which: str) -> np.ndarray:
    """Host version of ``attention.paged_locs`` that refuses uncovered positions: int32[B*T]."""
    table = np.asarray(table, np.int64)
    ok = pos >= 0
    j = np.where(ok, pos // block, 0)
    if (j >= table.shape[1]).any() or (np.take_along_axis(table, j, 1)[ok] < 0).any():
        raise ValueError(f"{which} block table does not cover every position of pool {pool!r}")
    locs = np.take_along_axis(table, j, 1) * block + np.where(ok, pos, 0) % block
    return np.where(ok, locs, -1).astype(np.int32).reshape(-1)


def reshard_request(src: DCPCache, dst: DCPCache, *, seq_lens, src_block_table, dst_block_table,
                    src_swa_block_table=None, dst_swa_block_table=None,
                    impl: str = "auto") -> DCPCache:
    """Moves requests' token KV (every token pool, all layers) from a DCP-N to a DCP-M cache.

    Positions ``[0, L)`` of ``kv``/``indexer`` (V3.2), ``[0, L//4)`` of ``c4``/``c4_indexer``,
    ``[0, L//128)`` of ``c128`` and the window ``[L - W, L)`` of ``swa`` (DSv4).  Compress-state
    rows are not token-addressed: copy them with ``reshard`` and explicit row locations.

    Args:
      src, dst: DCP caches (widths N and M).
      seq_lens: int32[B] (concrete) full-position lengths.
      src_block_table, dst_block_table: int32[B, P] virtual block ids in each cache.
      src_swa_block_table, dst_swa_block_table: DSv4 SWA block tables.
    """
    geo = src.geometry
    lens = np.asarray(seq_lens, np.int64)
    plan = []
    if geo.is_dsv4:
        W = geo.swa_window
        plan.append(("swa", np.maximum(lens - W, 0), lens, src_swa_block_table,
                     dst_swa_block_table))
        for pool in ("c4", "c4_indexer"):
            plan.append((pool, 0 * lens, lens // geo.csa_ratio, src_block_table, dst_block_table))
        plan.append(("c128", 0 * lens, lens // geo.hca_ratio, src_block_table, dst_block_table))
    else:
        for pool in ("kv", "indexer"):
            plan.append((pool, 0 * lens, lens, src_block_table, dst_block_table))
    for pool, lo, hi, sbt, dbt in plan:
        if sbt is None or dbt is None:
            raise ValueError(f"block tables for pool {pool!r} are required")
        T = max(int((hi - lo).max(initial=0)), 1)
        pos = lo[:, None] + np.arange(T)[None, :]
        pos = np.where(pos < hi[:, None], pos, -1)
        sl = _np_paged_locs(pos, sbt, src.layout.pool(pool).tokens_per_page * src.n, pool, "src")
        dl = _np_paged_locs(pos, dbt, dst.layout.pool(pool).tokens_per_page * dst.n, pool, "dst")
        dst = reshard(src, dst, pool, sl, dl, impl=impl)
    return dst


# ---------------------------------------------------------------------------------------------
# Capacity


def capacity(dc: DCPCache) -> dict:
    """Per-device memory of a DCP cache and the token capacity it buys.

    Returns:
      dict with ``n``, ``device_bytes`` (total per device), ``sharded_bytes`` (token pools split
      over the axis), ``indexer_bytes`` (replicated indexer, ``N *`` its paired pool's pages),
      ``state_bytes`` (replicated compress states), ``pools`` (per pool: ``local_tokens`` per
      layer on a device, ``global_tokens`` per layer, ``sharded``).
    """
    pools, out = {}, {"n": dc.n, "sharded_bytes": 0, "indexer_bytes": 0, "state_bytes": 0}
    idx = set(_index_pair(dc.geometry))
    for p in dc.layout.pools:
        b = p.spec.num_layers * p.num_pages * p.page_bytes
        key = ("sharded_bytes" if p.name in dc.sharded else
               "indexer_bytes" if p.name in idx else "state_bytes")
        out[key] += b
        pools[p.name] = {"local_tokens": p.capacity, "global_tokens": dc.global_capacity(p.name),
                         "sharded": p.name in dc.sharded, "bytes_per_device": b}
    out["device_bytes"] = out["sharded_bytes"] + out["indexer_bytes"] + out["state_bytes"]
    out["pools"] = pools
    return out


def kv_capacity(geo: Geometry, device_bytes: float, n: int) -> dict:
    """Context tokens a device budget holds under DCP N (token-proportional pools only).

    Per full token a device stores ``sharded / N + replicated`` bytes: DSv4 ``c4`` + ``c128``
    sharded (``584 * L4 / 4 + 584 * L128 / 128``) and the ``c4_indexer`` replicated
    (``132 * L4 / 4``); V3.2 ``kv`` sharded (``656 * L``), ``indexer`` replicated (``132 * L``).
    SWA and compress states are bounded per request (window), not per token, and are left out.

    Returns:
      dict: ``bytes_per_token_sharded``, ``bytes_per_token_replicated``,
      ``bytes_per_token_device`` (under DCP N), ``tokens`` (fit in ``device_bytes``), ``gain``
      (over N = 1) and ``ideal_gain`` (= N).
    """
    if geo.is_dsv4:
        L4, L128 = len(geo.c4_layers), len(geo.c128_layers)
        sh = geo.mla.token_bytes * (L4 / geo.csa_ratio + L128 / geo.hca_ratio)
        rep = geo.indexer.token_bytes * L4 / geo.csa_ratio
    else:
        sh = geo.mla.token_bytes * geo.num_layers
        rep = geo.indexer.token_bytes * geo.num_layers
    per = sh / n + rep
    return {"n": n, "bytes_per_token_sharded": sh, "bytes_per_token_replicated": rep,
            "bytes_per_token_device": per, "tokens": int(device_bytes // per),
            "gain": (sh + rep) / per, "ideal_gain": float(n)}
