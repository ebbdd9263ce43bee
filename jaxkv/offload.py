"""Retract -> resume: bit-exact offload of a request's cache to host memory, and back (SPEC §6).

When a decode server runs short of KV / SWA memory it *retracts* a request: copies all of its cache
to host memory, frees its device pages, and later *resumes* it into freshly allocated, different
pages.  This module does the copy, for every DSv4 pool, in both layouts (layer-major and packed).

Two layers
  * **Location level** — the pools' locations are given explicitly::

        copy  = save_locs(cache, {"swa": s, "c4": c, "c4_state": rows, ...})
        cache = load_locs(cache, copy, {"swa": s2, "c4": c2, ...})   # same lengths as saved

    ``save_locs`` gathers, on the device, every listed pool's locations for *all layers of the pool
    in one pass* into one ``uint8`` staging array and moves it to host memory with *one* transfer
    (``jax.device_put`` to the ``pinned_host`` memory kind).  ``load_locs`` moves it back with one
    transfer and scatters every pool.  ``-1`` locations are skipped on load (and read zeros on
    save); a load never writes into page 0 of a token pool nor into a state pool's sentinel row
    (``ValueError`` outside jit).

  * **Request level** — ``save(cache, alloc_state, request)`` / ``load(cache, alloc_state, copy,
    request)`` derive every pool's locations from the request's full locations (see
    ``request_locs``; the translation is ``jaxkv.alloc.translate``): SWA through ``full_to_swa``
    with its validity mask, C4 / C128 / C4-indexer by the ``(f + 1) % r == 0`` rule, the
    compress-state and indexer-state rows of every compressed layer (each distinct row saved
    once), request-scoped C128 state (``c128_state_scope="request"``).  On load the *new*
    locations are translated the same way and only entries valid before *and* after are restored
    (``new_mask[old_mask]``: a tail-only SWA allocation restores the rows it has and writes
    nothing into page 0); request-scoped rows of the new slot are reset to the sentinel first.
    ``retract`` / ``resume`` add the allocator steps (release after the copy; admit, then load);
    the ``*_batch`` forms do a whole batch with one translation and one budget charge, queuing
    every request's transfer back to back.  Request level needs every pool to have one KV-cache
    group, i.e. the layer-major layout (in the packed layout jaxkv.alloc does not allocate the
    split SWA groups nor vLLM's compressor-state blocks: use the location level there).

    Typical server use::

        handles = offload.start_save_batch(cache, alloc, victims)   # returns at once
        cache = decode_step(cache, ...)                              # overlaps the copies
        copies, alloc = offload.finish_save_batch(handles, alloc, victims)   # wait, then free
        ...
        cache, alloc, slots = offload.resume_batch(cache, alloc, copies, donate=True)

Asynchronous use
  ``start_save*`` returns a ``SaveHandle`` at once: the gather and the device-to-host copy are
  queued on the device and overlap whatever the caller dispatches next (the next decode step).
  ``handle.wait()`` blocks until the bytes are on the host and returns the ``HostCopy``.  The
  request's device pages may be released only after that; ``finish_save(handle, alloc_state,
  request)`` waits *then* releases them, and is the only function here that releases anything —
  the unsafe order (release, then copy) cannot be written with this API.  (Device-side ordering
  is JAX's: a later program that donates the cache buffers runs after the queued gather has read
  them, so the saved bytes are those of the moment ``start_save`` was called.)

Host memory
  Host copies live in JAX's ``pinned_host`` memory kind (page-locked: ~50 GB/s on an H100 against
  ~11 GB/s for SGLang's pageable copies).  Where a backend has no ``pinned_host`` memory, the copy
  falls back to ``unpinned_host`` and then to a NumPy array (``host_kind`` says which one a
  ``HostCopy`` uses).  Every copy is charged to a ``HostBudget`` *before* anything is dispatched:
  a save that does not fit raises ``HostBudgetExceeded`` and changes nothing (the device cache and
  the allocator are untouched; a save never modifies either).  ``HostCopy.free()`` (or loading
  with ``free=True``) returns the bytes.

  **XLA's cap:** on GPU, XLA's pinned-host allocator is limited to 64 GB per process unless the
  environment variable ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` is raised *before the backend
  starts*.  The default budget (``default_budget()``) is therefore
  ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` GB (64 GB when unset) so that a save fails with our clear
  error instead of an allocation failure deep inside XLA.  Raise both together for larger host
  pools.

Device memory
  A save's device staging is its saved bytes plus the size-bucket padding (``HostCopy.nbytes``).
  Each gather is compiled ahead of time and its device memory read from XLA's memory analysis
  before it runs (``SaveHandle.gather_memory``): above ``gather_bound(staging)`` (about twice
  the staging) ``impl="auto"`` falls back to the reference gather and an explicit impl raises
  ``GatherTooLarge`` (nothing dispatched).  Batches keep at most ``MAX_INFLIGHT_BYTES`` (1 GiB;
  ``max_inflight_bytes=``) of staging in flight, waiting for the oldest transfers first.  A batch
  load queues each request's host-to-device copy before the previous request's scatter: on GPU a
  copy into a new device array waits for the compute work queued before it, so the other order
  serialises copies and scatters.

Compilation
  Location counts are rounded up to size buckets (at most 1/8 padding, padded with ``-1``) so that
  requests of similar lengths share one compiled gather / scatter.
"""
from __future__ import annotations

import collections.abc as _abc
import dataclasses
import functools
import os
import threading
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv.cache import Cache, token_addressing
from jaxkv.kernels import dispatch
from jaxkv.layout import Layout, PoolLayout

__all__ = [
    "HostBudget", "HostBudgetExceeded", "HostCopy", "GatherTooLarge", "GatherMemory",
    "gather_bound", "PoolEntry", "SaveHandle", "default_budget",
    "host_kinds", "save_locs", "start_save_locs", "load_locs", "bucket", "request_locs",
    "start_save", "start_save_batch", "save", "finish_save", "finish_save_batch", "retract",
    "retract_batch", "load", "load_batch", "resume", "resume_batch",
]

HOST_KINDS = ("pinned_host", "unpinned_host", "numpy")
_GB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Host memory accounting


class HostBudgetExceeded(MemoryError):
    """A save needs more host bytes than its ``HostBudget`` has left (nothing was changed)."""


class HostBudget:
    """Host bytes available to offloaded copies (thread-safe).

    Args:
      limit_bytes: the budget in bytes (>= 0).

    ``reserve`` happens before a save dispatches anything; ``release`` when a ``HostCopy`` is
    freed.  ``used`` / ``available`` report the state.
    """

    def __init__(self, limit_bytes: int):
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, (int, np.integer)) \
                or limit_bytes < 0:
            raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
        self.limit = int(limit_bytes)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def available(self) -> int:
        return self.limit - self._used

    def reserve(self, nbytes: int, what: str = "a host copy") -> None:
        """Charges ``nbytes``; raises ``HostBudgetExceeded`` (charging nothing) if they don't fit."""
        with self._lock:
            if self._used + nbytes > self.limit:
                raise HostBudgetExceeded(
                    f"{what} needs {nbytes:,} host bytes but the host budget has "
                    f"{self.limit - self._used:,} of {self.limit:,} left; free host copies "
                    "(HostCopy.free) or raise the budget (and, on GPU, "
                    "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, XLA's pinned-host cap, 64 GB by default)")
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self._used:
                raise ValueError(f"releasing {nbytes:,} bytes but only {self._used:,} are used")
            self._used -= nbytes

    def __repr__(self):
        return f"HostBudget(used={self._used:,}, limit={self.limit:,})"


_DEFAULT_BUDGET: HostBudget | None = None
_DEFAULT_LOCK = threading.Lock()


def default_budget() -> HostBudget:
    """The process-wide budget: ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` GB (64 when unset).

    That variable is XLA's own cap on pinned host memory on GPU; matching it makes a save that
    would exceed XLA's allocator fail early with ``HostBudgetExceeded``.
    """
    global _DEFAULT_BUDGET
    with _DEFAULT_LOCK:
        if _DEFAULT_BUDGET is None:
            gb = float(os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "64"))
            _DEFAULT_BUDGET = HostBudget(int(gb * _GB))
        return _DEFAULT_BUDGET


# ---------------------------------------------------------------------------------------------
# Host memory kinds


def host_kinds(device: jax.Device | None = None) -> tuple[str, ...]:
    """Host memory kinds usable on ``device`` (best first); ``"numpy"`` is always last.

    GPU (jax 0.10 / 0.11) and CPU (jax 0.10.2) both expose ``pinned_host`` and ``unpinned_host``;
    a backend without memory kinds gets plain NumPy arrays (``jax.device_get``).
    """
    device = device or jax.devices()[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # backends without the memories API
        kinds = set()
    return tuple(k for k in HOST_KINDS[:2] if k in kinds) + ("numpy",)


def _host_kind(device, want: str | None) -> str:
    have = host_kinds(device)
    if want is None:
        return have[0]
    if want not in HOST_KINDS:
        raise ValueError(f"host_kind must be one of {HOST_KINDS} or None, got {want!r}")
    if want not in have:
        raise ValueError(f"host_kind {want!r} is not available on {device} (available: {have})")
    return want


# ---------------------------------------------------------------------------------------------
# The host copy


class PoolEntry(NamedTuple):
    """Where one (pool, KV-cache group)'s saved tokens sit in a host copy.

    The group's bytes are ``data[offset : offset + nbytes]`` viewed as ``uint8[len(layers),
    padded, item_bytes]``: for every layer and saved location, the token's value part followed by the
    written bytes of its scale part (``V + scale_bytes``: 583 for a DSv4 MLA token, 132 for an
    indexer key, ``4 * width`` for a state row).

    Attributes:
      pool: pool name.
      group: index into the pool's ``PoolLayout.groups`` (KV-cache group; 0 in layer-major).
      layers: the group's pool-local layers (all are saved).
      count: saved locations N.
      padded: N rounded up to its size bucket (entries past ``count`` are padding).
      item_bytes: bytes per (layer, location).
      offset: byte offset in the staging array.
    """

    pool: str
    group: int
    layers: tuple[int, ...]
    count: int
    padded: int
    item_bytes: int
    offset: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.pool, self.group)

    @property
    def nbytes(self) -> int:
        return len(self.layers) * self.padded * self.item_bytes


class _Lease:
    """Mutable part of a HostCopy: its data and its charge on the budget.

    ``code`` (request level): the saved request's plan code ``int32[C, W]`` in host memory (see
    ``_plan_fns``): per distinct location column, -1 where a token was not saved, else 0 (token
    pools) or the token's index among the saved distinct state rows (state pools).  Its bytes are
    charged with the data's."""

    def __init__(self, data, budget: HostBudget | None, nbytes: int, code=None):
        self.data = data
        self.code = code
        self.budget = budget
        self.nbytes = nbytes
        self.freed = False
        self.lock = threading.Lock()

    def host_code(self) -> np.ndarray:
        """The plan code as a host ndarray (fetched once)."""
        with self.lock:
            if self.freed:
                raise ValueError("this HostCopy was freed; its bytes are gone")
            if not isinstance(self.code, np.ndarray):
                self.code = np.asarray(self.code)
            return self.code

    def free(self):
        with self.lock:
            if self.freed:
                return
            self.freed = True
            self.data = None
            self.code = None
            if self.budget is not None and self.nbytes:
                self.budget.release(self.nbytes)


class _CodeView(_abc.Mapping):
    """Read-only ``{pool: ndarray[T]}`` derived from a request-level copy's plan code, on first
    access: ``"mask"`` gives ``bool[T]`` (saved where True), ``"index"`` the int32[T] index of
    each token's saved state row (-1: not saved).  The save never fetches the plan to the host
    itself; these views exist for inspection."""

    def __init__(self, lease: "_Lease", columns: Mapping[str, int], T: int, what: str):
        self._lease, self._columns, self._T, self._what = lease, dict(columns), T, what
        self._cache: dict = {}

    def __getitem__(self, name):
        if name not in self._cache:
            row = self._lease.host_code()[self._columns[name], :self._T]
            out = row >= 0 if self._what == "mask" else row.astype(np.int32)
            out.flags.writeable = False
            self._cache[name] = out
        return self._cache[name]

    def __iter__(self):
        return iter(self._columns)

    def __len__(self):
        return len(self._columns)


@dataclasses.dataclass(frozen=True, eq=False)
class HostCopy:
    """A request's (or a set of locations') cache bytes in host memory.

    Attributes:
      layout: the layout (and so the geometry) the bytes were saved from; a load checks it.
      entries: one ``PoolEntry`` per saved pool, in staging order.
      host_kind: ``"pinned_host"``, ``"unpinned_host"`` or ``"numpy"``.
      nbytes: bytes of the staging array held in host memory (padding included).  A
        request-level copy also holds its plan code ``int32[C, W]`` (what its load needs: which
        tokens were saved, each token's state row; W = next power of two >= the batch's longest
        request): the budget is charged ``nbytes`` plus those bytes (+~0.5 % for Flash).
      masks: request level: per pool, the saved validity mask over the request's tokens
        (``bool[T]``); the saved entries are the tokens where it is True, in token order.
      meta: request level: other facts of the saved request (token count, state-row maps...).
    """

    layout: Layout
    entries: tuple[PoolEntry, ...]
    host_kind: str
    nbytes: int
    _lease: _Lease = dataclasses.field(repr=False)
    masks: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def data(self):
        """The host array ``uint8[nbytes]`` (``pinned_host`` jax.Array or np.ndarray); None if empty."""
        if self._lease.freed:
            raise ValueError("this HostCopy was freed; its bytes are gone")
        return self._lease.data

    @property
    def freed(self) -> bool:
        return self._lease.freed

    def entry(self, pool: str, group: int = 0) -> PoolEntry | None:
        for e in self.entries:
            if e.key == (pool, group):
                return e
        return None

    def pool_bytes(self, pool: str, group: int = 0) -> np.ndarray:
        """uint8[len(layers), count, item_bytes]: the saved bytes of one (pool, group), on host."""
        e = self.entry(pool, group)
        if e is None:
            raise ValueError(f"({pool!r}, {group}) is not in this host copy "
                             f"(it has {[x.key for x in self.entries]})")
        flat = np.asarray(self.data)[e.offset:e.offset + e.nbytes]
        return flat.reshape(len(e.layers), e.padded, e.item_bytes)[:, :e.count]

    def free(self) -> None:
        """Drops the host bytes and returns them to the budget (idempotent)."""
        self._lease.free()


# ---------------------------------------------------------------------------------------------
# Validation


def bucket(n: int) -> int:
    """Size bucket of ``n`` locations: ``n`` rounded up to a multiple of ``2**(bitlen(n) - 4)``.

    At most 1/8 padding; 0 stays 0, ``n <= 16`` stays ``n``.
    """
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _concrete_locs(locs, arg: str) -> np.ndarray:
    if isinstance(locs, jax.core.Tracer):
        raise ValueError(f"{arg} must be concrete (save/load run outside jit; they dispatch "
                         "their own compiled gathers and transfers)")
    a = np.asarray(locs)
    if a.ndim != 1:
        raise ValueError(f"{arg} must be 1-D int32[N], got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{arg} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_range(a: np.ndarray, p: PoolLayout, arg: str) -> None:
    bad = (a < -1) | (a >= p.capacity)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{arg}[{i}] = {int(a[i])} is outside [0, {p.capacity}) for pool "
                         f"{p.name!r} (-1 is the only allowed padding value)")


def _reserved_page0(p: PoolLayout, layout: Layout) -> bool:
    """Whether page 0 of the pool is reserved: token pools, and every pool of the packed layout
    (block 0).  Layer-major state pools are plain rows: their reserved row is the sentinel."""
    return p.spec.kind == "token" or layout.kind == "packed"


def _check_targets(a: np.ndarray, p: PoolLayout, layout: Layout, arg: str) -> None:
    """Load targets: in range, never in a reserved page 0, never a stored sentinel row."""
    _check_range(a, p, arg)
    if _reserved_page0(p, layout):
        bad = (a >= 0) & (a < p.tokens_per_page)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{arg}[{i}] = {int(a[i])} for pool {p.name!r} is in page 0 "
                             f"(locations [0, {p.tokens_per_page})), which is reserved; an "
                             "allocator never hands it out")
    if p.sentinel is not None:
        bad = a == p.sentinel
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{arg}[{i}] = {int(a[i])} for pool {p.name!r} is the sentinel row, "
                             "which always holds [kv 0 | score -inf]")


def _check_cache(cache) -> None:
    if not isinstance(cache, Cache):
        raise ValueError(f"cache must be a jaxkv Cache, got {type(cache).__name__}")


def _pad(a: np.ndarray, n: int, fill: int = -1) -> np.ndarray:
    out = np.full(n, fill, np.int32)
    out[:a.shape[0]] = a
    return out


def _resolve_keys(layout: Layout, pool_locs: Mapping, arg: str) -> dict[tuple[str, int], Any]:
    """``{pool | (pool, group): locs}`` -> ``{(pool, group): locs}``, in the layout's order.

    A bare pool name stands for the pool's only KV-cache group; a pool whose layers are split
    into several groups (packed layout) needs ``(pool, group)`` keys, one set of locations each.
    """
    if not isinstance(pool_locs, Mapping):
        raise ValueError(f"{arg} must be a mapping {{pool or (pool, group): int32[N] locations}}")
    out = {}
    for k, v in pool_locs.items():
        if isinstance(k, str):
            name, g = k, None
        elif (isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], str)
              and isinstance(k[1], (int, np.integer)) and not isinstance(k[1], bool)):
            name, g = k[0], int(k[1])
        else:
            raise ValueError(f"{arg} keys must be pool names or (pool, group) tuples, got {k!r}")
        if name not in layout.pool_names:
            raise ValueError(f"{arg} names unknown pool {name!r}; the cache's pools are "
                             f"{list(layout.pool_names)}")
        p = layout.pool(name)
        if g is None:
            if len(p.groups) != 1:
                raise ValueError(
                    f"{arg}[{name!r}]: pool {name!r} has {len(p.groups)} KV-cache groups in the "
                    f"{layout.kind} layout (layers {[list(x) for x in p.groups]}), each with its "
                    f"own locations; key them as ({name!r}, group)")
            g = 0
        if not 0 <= g < len(p.groups):
            raise ValueError(f"{arg}[{k!r}]: group must be in [0, {len(p.groups)}) for pool "
                             f"{name!r}, got {g}")
        if (name, g) in out:
            raise ValueError(f"{arg} gives ({name!r}, {g}) twice")
        out[(name, g)] = v
    order = [(p.name, g) for p in layout.pools for g in range(len(p.groups))]
    return {key: out[key] for key in order if key in out}


def _item_bytes(layout: Layout, pool: str) -> tuple[int, int]:
    """(value bytes V, written scale bytes) of a pool's tokens."""
    _, a = token_addressing(layout, pool)
    return a.value_bytes, a.scale_bytes


# ---------------------------------------------------------------------------------------------
# Device programs


def _gather_impl(buffers, locs, *, layout: Layout, keys: tuple[tuple[str, tuple[int, ...]], ...],
                 impl: str, rows: tuple[tuple[int, int], ...] | None = None):
    """Every (pool, layers)'s tokens into one ``uint8[total]`` staging array.

    ``locs``: one int32[N_k] per key; or, with ``rows`` (request level), the request's device plan
    ``int32[C, W]`` of which key k reads the first ``rows[k][1]`` entries of row ``rows[k][0]``.
    """
    if rows is not None:
        locs = [locs[r, :n] for r, n in rows]
    parts = []
    for (pool, layers), loc in zip(keys, locs):
        b, a = token_addressing(layout, pool, layers)
        value, scale = dispatch.gather_tokens(buffers[b], loc, a, impl=impl)
        tok = jnp.concatenate([value, scale], axis=-1) if a.scale_bytes else value
        parts.append(tok.reshape(-1))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


_GATHER_STATIC = ("layout", "keys", "impl", "rows")
_gather = jax.jit(_gather_impl, static_argnames=_GATHER_STATIC)


@functools.lru_cache(maxsize=None)
def _gather_to(sharding):
    """The gather compiled with its output placed in host memory (``out_shardings``)."""
    return jax.jit(_gather_impl, static_argnames=_GATHER_STATIC, out_shardings=sharding)


# Device memory a save's gather program may use besides its cache arguments: the staging
# (``output``) plus XLA's temporaries (the per-pool [L, N, V] / [L, N, S] windows before they are
# concatenated: about one more staging).  A compiled gather above this bound is not run: "auto"
# tries the next implementation, an explicit ``impl`` raises ``GatherTooLarge`` (nothing
# dispatched, nothing charged).
STAGING_SLACK_BYTES = 64 << 20


def gather_bound(staging_bytes: int) -> int:
    """Most device bytes (temp + output) a save's gather of ``staging_bytes`` may use."""
    return 2 * staging_bytes + staging_bytes // 4 + STAGING_SLACK_BYTES


class GatherTooLarge(MemoryError):
    """A save's compiled gather would need far more device memory than its staging (nothing was
    dispatched or charged)."""


class GatherMemory(NamedTuple):
    """Device memory of one save's compiled gather (XLA's ``memory_analysis``), in bytes.

    Attributes:
      staging: the staging array (``HostCopy.nbytes``: saved bytes plus bucket padding).
      output: the program's output bytes (the staging; 0 where it is placed in host memory).
      temp: XLA's temporary buffers.
      impl: the kernel implementation compiled.
    """

    staging: int
    output: int
    temp: int
    impl: str

    @property
    def device_bytes(self) -> int:
        return self.output + self.temp


_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


def _impl_candidates(impl: str) -> tuple[str, ...]:
    if impl != "auto":
        return (impl,)
    first = dispatch._resolve("auto", "gather_tokens")
    return tuple(dict.fromkeys((first, "reference")))


def _compiled_gather(cache: Cache, keys, locs, impl: str, staging: int, out_sharding=None,
                     rows=None):
    """``(compiled gather, GatherMemory)`` within ``gather_bound(staging)``; raises GatherTooLarge.

    Compiled ahead of time (cached per layout, keys, location shapes / plan rows, implementation
    and output placement) so that its device memory is known before anything runs.
    """
    tried = []
    shapes = (tuple(int(x.shape[0]) for x in locs) if rows is None
              else (tuple(locs.shape), rows))
    for name in _impl_candidates(impl):
        key = (cache.layout, keys, shapes, name, out_sharding,
               tuple(b.sharding for b in cache.buffers))
        with _COMPILED_LOCK:
            hit = _COMPILED.get(key)
        if hit is None:
            fn = _gather if out_sharding is None else _gather_to(out_sharding)
            compiled = fn.lower(cache.buffers, locs, layout=cache.layout, keys=keys,
                                impl=name, rows=rows).compile()
            try:
                m = compiled.memory_analysis()
                out_b = 0 if out_sharding is not None else int(m.output_size_in_bytes)
                mem = GatherMemory(staging, out_b, int(m.temp_size_in_bytes), name)
            except Exception:  # backends without memory analysis: trust the program
                mem = GatherMemory(staging, staging, 0, name)
            hit = (compiled, mem)
            with _COMPILED_LOCK:
                _COMPILED[key] = hit
        if hit[1].device_bytes <= gather_bound(staging):
            return hit
        tried.append(hit[1])
    raise GatherTooLarge(
        f"the gather of a {staging:,}-byte save would use "
        + ", ".join(f"{m.device_bytes:,} device bytes with impl={m.impl!r} (temp {m.temp:,})"
                    for m in tried)
        + f"; the bound is {gather_bound(staging):,} (2x staging + 1/4 + slack); nothing was "
        "dispatched")


TRANSFERS = ("device_put", "jit")


def _sentinel_bytes(width: int) -> np.ndarray:
    """uint8[4 * width]: the state sentinel ``[kv = 0 | score = -inf]`` as float32 bytes."""
    row = np.zeros(width, np.float32)
    row[width // 2:] = -np.inf
    return row.view(np.uint8)


def _scatter_impl(buffers, staging, dst, src, reset, *, layout: Layout,
                  entries: tuple[PoolEntry, ...], resets: tuple[tuple[str, tuple[int, ...]], ...],
                  impl: str, rows: tuple[tuple[int, int, int], ...] | None = None):
    """Resets, then every entry's saved tokens from ``staging`` to its target locations.

    ``dst`` / ``src``: one int32 array per entry (``src`` None: entry i goes to ``dst[i]``); or,
    with ``rows`` (request level), ``dst`` is the request's device load plan ``int32[K, W]`` and
    entry k's targets are its row ``rows[k][0]``, sources row ``rows[k][1]`` (-1: none), both cut
    to ``rows[k][2]`` entries (``src`` unused).
    """
    if rows is not None:
        plan = dst
        dst = [plan[d, :n] for d, _, n in rows]
        src = [None if s < 0 else plan[s, :n] for _, s, n in rows]
    buffers = list(buffers)
    for (pool, layers), rows in zip(resets, reset):  # request-scoped state: reset first
        b, a = token_addressing(layout, pool, layers)
        row = jnp.asarray(_sentinel_bytes(layout.pool(pool).spec.fmt.width))
        value = jnp.broadcast_to(row, (len(layers), rows.shape[0], row.shape[0]))
        scale = jnp.zeros((len(layers), rows.shape[0], 0), jnp.uint8)
        buffers[b] = dispatch.scatter_tokens(buffers[b], rows, value, scale, a, impl=impl)
    for e, d, s in zip(entries, dst, src):
        b, a = token_addressing(layout, e.pool, e.layers)
        piece = lax.slice(staging, (e.offset,), (e.offset + e.nbytes,))
        piece = piece.reshape(len(e.layers), e.padded, e.item_bytes)
        if s is not None:  # entry s[i] goes to location d[i] (padding: d = -1)
            piece = jnp.take(piece, s, axis=1, mode="clip")
        value = piece[..., :a.value_bytes]
        scale = piece[..., a.value_bytes:]
        buffers[b] = dispatch.scatter_tokens(buffers[b], d, value, scale, a, impl=impl)
    return tuple(buffers)


_STATIC = ("layout", "entries", "resets", "impl", "rows")
_scatter = jax.jit(_scatter_impl, static_argnames=_STATIC)
_scatter_donate = jax.jit(_scatter_impl, static_argnames=_STATIC, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Save


class SaveHandle:
    """A save in flight: the gather and the device-to-host copy are queued on the device.

    ``wait()`` blocks until the bytes are in host memory and returns the ``HostCopy``; ``done()``
    polls.  Release the saved request's device pages only after ``wait()`` — ``finish_save`` does
    both in that order.
    """

    def __init__(self, copy: HostCopy, pending, gather_memory: "GatherMemory | None" = None):
        self._copy = copy
        #: device memory of this save's gather program (None for an empty save)
        self.gather_memory = gather_memory
        self._pending = pending  # device staging array for the numpy fallback, else None
        self._done = copy.entries == () or pending is None and copy.data is None

    @property
    def copy_in_flight(self) -> HostCopy:
        """The HostCopy, possibly not yet complete (for inspection of its geometry only)."""
        return self._copy

    def done(self) -> bool:
        if self._done:
            return True
        if self._pending is not None:
            return self._pending.is_ready()
        data = self._copy._lease.data
        return data is None or data.is_ready()

    def wait(self) -> HostCopy:
        """Blocks until the host copy is complete; returns it."""
        if not self._done:
            lease = self._copy._lease
            if self._pending is not None:  # NumPy fallback: the copy lands in a host ndarray
                lease.data = np.asarray(self._pending)
                self._pending = None
                if lease.code is not None:
                    lease.code = np.asarray(lease.code)
            elif lease.data is not None:
                jax.block_until_ready(lease.data if lease.code is None
                                      else (lease.data, lease.code))
            self._done = True
        return self._copy


def _prepare(cache: Cache, pool_locs: Mapping):
    """Validated ``(gather keys, padded locs, entries, total bytes)`` for a save."""
    _check_cache(cache)
    layout = cache.layout
    keys, locs, entries, offset = [], [], [], 0
    for (pool, g), v in _resolve_keys(layout, pool_locs, "pool_locs").items():
        p = layout.pool(pool)
        arg = f"pool_locs[{(pool, g)!r}]"
        a = _concrete_locs(v, arg)
        _check_range(a, p, arg)
        if a.shape[0] == 0:
            continue
        n = a.shape[0]
        npad = bucket(n)
        vb, sb = _item_bytes(layout, pool)
        layers = tuple(p.groups[g])
        e = PoolEntry(pool, g, layers, n, npad, vb + sb, offset)
        offset += e.nbytes
        keys.append((pool, layers))
        locs.append(_pad(a, npad))
        entries.append(e)
    return tuple(keys), locs, tuple(entries), offset


class _SavePlan(NamedTuple):
    keys: tuple
    locs: list
    entries: tuple
    total: int
    masks: dict
    meta: dict


def _dispatch_save(cache: Cache, plan: _SavePlan, budget: HostBudget, kind: str, impl: str,
                   reserved: bool, transfer: str = "device_put", rows=None, code=None,
                   lease_bytes: int | None = None) -> SaveHandle:
    """Queues the gather and the device-to-host copy of a validated plan (budget charged).

    Request level: ``plan.locs`` is the request's device plan ``int32[C, W]`` read through
    ``rows`` (see ``_gather_impl``), and ``code`` (device ``int32[C, W]``) is copied to host
    memory next to the staging; ``lease_bytes`` is what the copy holds on the budget."""
    lease_bytes = plan.total if lease_bytes is None else lease_bytes
    if not plan.entries:  # empty: short-circuit, no device work, no host bytes
        copy = HostCopy(cache.layout, (), kind, 0, _Lease(None, budget, 0), plan.masks,
                        plan.meta)
        return SaveHandle(copy, None)
    if not reserved:
        budget.reserve(plan.total, f"saving {sum(e.count for e in plan.entries):,} locations of "
                                   f"{sorted({e.pool for e in plan.entries})}")
    try:
        if rows is None:
            locs = list(jax.device_put(list(plan.locs)))  # one batched host-to-device call
        else:
            locs = plan.locs  # already on the device (the request's plan)
        pending = None
        if transfer == "jit" and kind != "numpy":  # one program: gather, then write to host
            sh = cache.buffers[0].sharding.with_memory_kind(kind)
            fn, mem = _compiled_gather(cache, plan.keys, locs, impl, plan.total, sh, rows)
            data = fn(cache.buffers, locs)
            staging = None
        else:
            fn, mem = _compiled_gather(cache, plan.keys, locs, impl, plan.total, None, rows)
            staging = fn(cache.buffers, locs)
        if staging is None:
            pass
        elif kind == "numpy":
            staging.copy_to_host_async()
            pending, data = staging, None
        else:
            data = jax.device_put(staging, staging.sharding.with_memory_kind(kind))
        if code is not None:
            if kind == "numpy":
                code.copy_to_host_async()
            else:
                code = jax.device_put(code, code.sharding.with_memory_kind(kind))
    except BaseException:
        if not reserved:
            budget.release(plan.total)
        raise
    lease = _Lease(data, budget, lease_bytes, code)
    masks, meta = plan.masks, plan.meta
    if code is not None:  # request level: masks / state rows are views of the host code
        T = meta["length"]
        masks = _CodeView(lease, meta["columns"], T, "mask")
        meta = dict(meta, state_index=_CodeView(lease, meta["state_columns"], T, "index"))
    copy = HostCopy(cache.layout, plan.entries, kind, plan.total, lease, masks, meta)
    return SaveHandle(copy, pending, mem)


# Device staging a batch save keeps in flight at most (bytes): before request i's gather is
# queued, the oldest transfers are awaited until the staging of the requests still in flight plus
# request i's fits (one request is always allowed, whatever its size).  Without a bound every
# request of a batch is gathered at once while the transfers drain at PCIe speed, and the whole
# batch's staging is alive on the device together.
MAX_INFLIGHT_BYTES = 1 << 30


def _check_inflight(max_inflight_bytes) -> int:
    if max_inflight_bytes is None:
        return MAX_INFLIGHT_BYTES
    if isinstance(max_inflight_bytes, bool) or not isinstance(max_inflight_bytes,
                                                              (int, np.integer)) \
            or max_inflight_bytes < 0:
        raise ValueError(f"max_inflight_bytes must be an int >= 0 or None, got "
                         f"{max_inflight_bytes!r}")
    return int(max_inflight_bytes)


def _throttle(inflight: list, nbytes: int, limit: int) -> None:
    """Waits for the oldest saves of ``inflight`` ([(handle, bytes)]) until ``nbytes`` more fit."""
    while inflight and sum(b for _, b in inflight) + nbytes > limit:
        h, _ = inflight.pop(0)
        h.wait()


def _start_plans(cache: Cache, plans: list[_SavePlan], budget, host_kind, impl, what: str,
                 transfer: str = "device_put", max_inflight_bytes: int | None = None):
    """Charges the budget for every plan at once (all or nothing), then dispatches them all."""
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
    budget = default_budget() if budget is None else budget
    device = next(iter(cache.buffers[0].devices()))
    kind = _host_kind(device, host_kind)
    limit = _check_inflight(max_inflight_bytes)
    total = sum(pl.total for pl in plans)
    if total:
        budget.reserve(total, what)
    handles, inflight = [], []
    try:
        for pl in plans:
            _throttle(inflight, pl.total, limit)
            handles.append(_dispatch_save(cache, pl, budget, kind, impl, reserved=True,
                                          transfer=transfer))
            inflight.append((handles[-1], pl.total))
    except BaseException:
        budget.release(sum(pl.total for pl in plans[len(handles):]))
        for h in handles:
            h.copy_in_flight.free()
        raise
    return handles


def start_save_locs(cache: Cache, pool_locs: Mapping[str, Any], *,
                    budget: HostBudget | None = None, host_kind: str | None = None,
                    impl: str = "auto", masks: Mapping[str, np.ndarray] | None = None,
                    meta: Mapping[str, Any] | None = None,
                    transfer: str = "device_put") -> SaveHandle:
    """Starts saving the given locations of every listed pool; returns at once.

    Args:
      cache: the cache (not modified).
      pool_locs: ``{pool | (pool, group): int32[N]}`` locations to save (every layer of the
        pool's KV-cache group); ``-1`` entries are saved as zeros (placeholders).
      budget: host budget to charge (default: ``default_budget()``).
      host_kind: ``"pinned_host"`` | ``"unpinned_host"`` | ``"numpy"``; None = the best available.
      impl: gather kernel implementation (``jaxkv.kernels.dispatch``).
      masks, meta: stored in the HostCopy as given (used by the request level).
      transfer: ``"device_put"`` (default): a jitted gather into a device staging array, then
        ``jax.device_put`` to the host memory kind; ``"jit"``: one program whose output lives in
        host memory (``out_shardings``), XLA inserting the copy.  Same bytes; the benchmark
        measures both.

    Returns:
      A ``SaveHandle``; ``handle.wait()`` gives the ``HostCopy``.

    Raises:
      ValueError: bad pool name or locations (nothing dispatched).
      HostBudgetExceeded: the copy does not fit the budget (nothing dispatched).
    """
    keys, locs, entries, total = _prepare(cache, pool_locs)
    plan = _SavePlan(keys, locs, entries, total, dict(masks or {}), dict(meta or {}))
    what = (f"saving {sum(e.count for e in entries):,} locations of "
            f"{sorted({e.pool for e in entries})}")
    return _start_plans(cache, [plan], budget, host_kind, impl, what, transfer)[0]


def save_locs(cache: Cache, pool_locs: Mapping[str, Any], **kw) -> HostCopy:
    """Synchronous ``start_save_locs(...).wait()``: the HostCopy of the given locations."""
    return start_save_locs(cache, pool_locs, **kw).wait()


# ---------------------------------------------------------------------------------------------
# Load


def load_locs(cache: Cache, host_copy: HostCopy, pool_locs: Mapping, *,
              sources: Mapping | None = None, reset: Mapping | None = None,
              impl: str = "auto", donate: bool = False, free: bool = False) -> Cache:
    """Writes a host copy back into (new) locations: one host-to-device transfer, one scatter.

    Called in a loop, each call's transfer is queued after the previous call's scatter and (on a
    GPU) waits for it on the device, so copies and scatters serialise; ``load_batch`` queues the
    copies ahead of the scatters instead.

    Args:
      cache: the cache to write into.
      host_copy: from ``save_locs`` / ``save`` (completed: ``SaveHandle.wait()``).
      pool_locs: ``{pool | (pool, group): int32[M]}`` target locations per saved (pool, group)
        (one left out is not restored).  Without ``sources``, ``M`` must equal the saved count and
        entry ``i`` goes to location ``i``.  ``-1`` targets are skipped.  A target in a reserved
        page 0 (token pools; every pool of the packed layout) or on a stored sentinel row is a
        ValueError.
      sources: optional ``{pool | (pool, group): int32[M]}``: saved entry ``sources[k][i]`` goes
        to ``pool_locs[k][i]`` (the request level restores deduplicated state rows this way).
      reset: optional ``{state pool | (pool, group): int32[R]}`` rows set to the sentinel value
        ``[kv 0 | score -inf]`` *before* the restore, in the same program (request-scoped state
        of a resumed request).
      impl: scatter kernel implementation.
      donate: donate the cache buffers (in-place update; the ``cache`` argument is then invalid).
      free: free the host copy once the load is dispatched.

    Returns:
      The new cache.  Only the targeted tokens' bytes change (value part and written scale bytes;
      a DSv4 scale slot's pad byte and page padding are never written).

    Raises:
      ValueError: wrong layout, freed copy, bad targets or sources (nothing changed).
    """
    plan = _load_plan(cache, host_copy, pool_locs, sources, reset)
    return _dispatch_load(cache, host_copy, plan, impl=impl, donate=donate, free=free)


class _LoadPlan(NamedTuple):
    entries: list
    dst: list
    src: list
    resets: list
    reset_rows: list


def _load_plan(cache: Cache, host_copy: HostCopy, pool_locs: Mapping, sources, reset) -> _LoadPlan:
    """Validates a load (raises ValueError, changing nothing) and returns what to dispatch."""
    _check_cache(cache)
    if not isinstance(host_copy, HostCopy):
        raise ValueError(f"host_copy must be a HostCopy, got {type(host_copy).__name__}")
    if host_copy.layout != cache.layout:
        raise ValueError("host_copy was saved from a cache with a different layout "
                         f"({host_copy.layout.kind} of {host_copy.layout.geometry.name}); "
                         f"this cache is {cache.layout.kind} of {cache.layout.geometry.name}")
    if host_copy.freed:
        raise ValueError("host_copy was freed; its bytes are gone")
    layout = cache.layout
    targets = _resolve_keys(layout, pool_locs, "pool_locs")
    srcs = _resolve_keys(layout, sources or {}, "sources")
    saved = {e.key: e for e in host_copy.entries}
    for name, got in (("pool_locs", targets), ("sources", srcs)):
        extra = [k for k in got if k not in saved and _concrete_locs(got[k], name).size]
        if extra:
            raise ValueError(f"{name} gives locations for {extra}, which the host copy does not "
                             f"hold (it holds {list(saved)})")
    extra = [k for k in srcs if k not in targets]
    if extra:
        raise ValueError(f"sources gives {extra} without pool_locs for them")
    entries, dst, src = [], [], []
    for e in host_copy.entries:
        if e.key not in targets:
            continue
        p = layout.pool(e.pool)
        arg = f"pool_locs[{e.key!r}]"
        d = _concrete_locs(targets[e.key], arg)
        _check_targets(d, p, layout, arg)
        if e.key in srcs:
            s = _concrete_locs(srcs[e.key], f"sources[{e.key!r}]")
            if s.shape != d.shape:
                raise ValueError(f"sources[{e.key!r}] has {s.shape[0]} entries but "
                                 f"{arg} has {d.shape[0]}")
            bad = (s < 0) | (s >= e.count)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"sources[{e.key!r}][{i}] = {int(s[i])} is not a saved entry "
                                 f"(the copy holds {e.count} for {e.key!r})")
            if d.shape[0] == 0:
                continue
            m = bucket(d.shape[0])
            entries.append(e)
            dst.append(_pad(d, m))
            src.append(_pad(s, m, fill=0))
        else:
            if d.shape[0] != e.count:
                raise ValueError(f"{arg} has {d.shape[0]} locations but the host copy saved "
                                 f"{e.count} for {e.key!r} (pass sources= to pick entries)")
            entries.append(e)
            dst.append(_pad(d, e.padded))
            src.append(None)
    resets, reset_rows = [], []
    for key, rows in _resolve_keys(layout, reset or {}, "reset").items():
        p = layout.pool(key[0])
        arg = f"reset[{key!r}]"
        if p.spec.kind != "state":
            raise ValueError(f"{arg}: only state pools can be reset, {key[0]!r} is a token pool")
        r = _concrete_locs(rows, arg)
        _check_targets(r, p, layout, arg)
        if r.shape[0]:
            resets.append((key[0], tuple(p.groups[key[1]])))
            reset_rows.append(_pad(r, bucket(r.shape[0])))
    return _LoadPlan(entries, dst, src, resets, reset_rows)


def _dispatch_load(cache: Cache, host_copy: HostCopy, plan: _LoadPlan, *, impl: str,
                   donate: bool, free: bool, stagings: list | None = None) -> Cache:
    """Queues the host-to-device copy and the scatter of a validated load.

    ``stagings``: if given, the device staging array (the host-to-device copy's destination) is
    appended to it, so that a caller can bound the copies in flight by awaiting the oldest one
    (``_LoadWindow``) instead of the whole cache."""
    entries, dst, src, resets, reset_rows = plan
    layout = cache.layout
    has_restore = any((d >= 0).any() for d in dst)
    if not has_restore and not resets:  # nothing to write
        if free:
            host_copy.free()
        return cache
    sharding = cache.buffers[0].sharding
    if getattr(sharding, "memory_kind", None) is not None:
        sharding = sharding.with_memory_kind("device")
    # the small index arrays first, in one batched call: they are queued ahead of the (large)
    # staging copy on the host-to-device path instead of behind it
    idx = jax.device_put([np.asarray(x) for x in dst] + [np.asarray(s) for s in src
                                                           if s is not None]
                         + [np.asarray(r) for r in reset_rows])
    n_dst, n_src = len(dst), sum(s is not None for s in src)
    dst_d, src_it, reset_d = idx[:n_dst], iter(idx[n_dst:n_dst + n_src]), idx[n_dst + n_src:]
    src_d = [None if s is None else next(src_it) for s in src]
    if has_restore:
        staging = jax.device_put(host_copy.data, sharding)
        if stagings is not None:
            stagings.append(staging)
    else:
        entries, dst, src = [], [], []
        staging = jnp.zeros((0,), jnp.uint8)
    fn = _scatter_donate if donate else _scatter
    if not has_restore:
        dst_d, src_d = [], []
    buffers = fn(cache.buffers, staging, dst_d, src_d, reset_d,
                 layout=layout, entries=tuple(e._replace(count=0) for e in entries),
                 resets=tuple(resets), impl=impl)  # count is not static: fewer compilations
    if free:
        host_copy.free()
    return Cache(tuple(buffers), layout)


class _LoadWindow:
    """Bounds the host-to-device copies of a batch load in flight (a sliding window).

    Before a copy of ``nbytes`` is queued, the oldest queued copies are awaited (their device
    staging arrays ``block_until_ready``) until the ones still in flight plus this one fit in
    ``limit`` (one copy always goes).  Unlike awaiting the whole cache, this never drains the
    pipeline: the next transfer is queued while the previous ones still run.  (A staging whose
    transfer has landed is freed once its scatter ran.)
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.inflight: list = []  # [(staging, nbytes)]
        self._new: list = []

    def room(self, nbytes: int) -> bool:
        """Whether a copy of ``nbytes`` fits now without awaiting anything."""
        return not self.inflight or sum(b for _, b in self.inflight) + nbytes <= self.limit

    def before(self, nbytes: int) -> None:
        while self.inflight and sum(b for _, b in self.inflight) + nbytes > self.limit:
            staging, _ = self.inflight.pop(0)
            jax.block_until_ready(staging)

    def add(self, staging, nbytes: int) -> None:
        self.inflight.append((staging, nbytes))

    def stagings(self) -> list:
        self._new = []
        return self._new

    def after(self, nbytes: int) -> None:
        for st in self._new:
            self.inflight.append((st, nbytes))
        self._new = []


# ---------------------------------------------------------------------------------------------
# Request level (jaxkv.alloc)

TOKEN_POOLS = ("swa", "c4", "c128", "c4_indexer")
STATE_POOLS = ("c4_state", "c4_indexer_state", "c128_state")
SCOPES = ("page", "request")


def _alloc():
    from jaxkv import alloc  # imported lazily: the location level does not need it
    return alloc


def _check_slots(alloc_state, requests, arg: str = "requests") -> tuple[list[int], list[int]]:
    """``(slots, lengths)`` of distinct live request slots (ValueError otherwise)."""
    A = _alloc()
    if not isinstance(alloc_state, A.AllocState):
        raise ValueError(f"alloc_state must be a jaxkv.alloc.AllocState, got "
                         f"{type(alloc_state).__name__}")
    R = alloc_state.cfg.max_requests
    lengths = np.asarray(alloc_state.lengths)
    slots, lens = [], []
    for r in requests:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise ValueError(f"{arg} must hold int request slots, got {r!r}")
        if not 0 <= r < R:
            raise ValueError(f"{arg}: slot {r} is outside the allocator's slots [0, {R})")
        if lengths[r] < 0:
            raise ValueError(f"{arg}: slot {r} is not a live request (its slot is free)")
        slots.append(int(r))
        lens.append(int(lengths[r]))
    if len(set(slots)) != len(slots):
        raise ValueError(f"{arg} names a slot twice: {slots}")
    return slots, lens


def _check_slot(alloc_state, request, arg: str = "request") -> tuple[int, int]:
    if isinstance(request, bool) or not isinstance(request, (int, np.integer)):
        raise ValueError(f"{arg} must be an int request slot, got {request!r}")
    slots, lens = _check_slots(alloc_state, [request], arg)
    return slots[0], lens[0]


def _pools_of(layout: Layout, pools, scope: str) -> tuple[str, ...]:
    geo = layout.geometry
    if not geo.is_dsv4:
        raise ValueError("request-level offload is defined for DSv4 geometries (V3.2: use "
                         "save_locs / load_locs with the kv / indexer locations)")
    if scope not in SCOPES:
        raise ValueError(f"c128_state_scope must be one of {SCOPES}, got {scope!r}")
    names = layout.pool_names if pools is None else tuple(pools)
    for n in names:
        if n not in layout.pool_names:
            raise ValueError(f"pools names unknown pool {n!r}; the cache's pools are "
                             f"{list(layout.pool_names)}")
    if layout.kind == "packed":
        bad = [n for n in names if len(layout.pool(n).groups) != 1
               or (layout.pool(n).spec.kind == "state")]
        if bad and pools is None:
            raise ValueError(
                f"in the packed layout jaxkv.alloc does not allocate pools {bad} per KV-cache "
                "group (SWA split into groups, vLLM's compressor-state blocks), so their "
                "locations cannot be derived from the request; pass pools= with the derivable "
                f"ones ({[n for n in names if n not in bad]}) and move the others with "
                "save_locs / load_locs")
        if bad:
            raise ValueError(f"pools {bad} cannot be derived from jaxkv.alloc in the packed "
                             "layout (several KV-cache groups, or vLLM compressor-state blocks)")
    return tuple(n for n in layout.pool_names if n in names)


_BIG = np.iinfo(np.int32).max


def _pool_locations(t, scope: str) -> dict:
    """``{pool: (locs, valid)}`` from ``jaxkv.alloc.translate``'s result ``t`` (SPEC §4, §6): the
    one place that says which translation column and validity mask each DSv4 pool uses
    (``scope``: the C128 compress-state rows, ``"page"`` or ``"request"``)."""
    return {
        "swa": (t.swa, t.swa_valid),
        "c4": (t.c4, t.c4_valid),
        "c4_indexer": (t.c4, t.c4_valid),
        "c128": (t.c128, t.c128_valid),
        "c4_state": (t.c4_state, t.swa_valid),
        "c4_indexer_state": (t.c4_state, t.swa_valid),
        "c128_state": ((t.c128_state, t.swa_valid) if scope == "page" else
                       (t.c128_state_req, t.full >= 0)),
    }


@functools.lru_cache(maxsize=None)
def _pack_fn(layout: Layout, names: tuple[str, ...], scope: str):
    """A jitted translation of a batch of requests into every pool's locations, packed.

    Returns ``(f, column)``: ``column[k]`` is pool ``names[k]``'s column of ``locs`` (pools
    that share their locations share a column: C4 / C4 indexer, C4 / C4-indexer state).

    ``f(alloc_state, slots int32[B], width=W) -> (locs int32[B, C, W], counts int32[B, P],
    bad_range bool[B, P], bad_target bool[B, P])``: ``locs`` is -1 where a position is not valid
    in a pool; ``counts`` the entries a save keeps (valid tokens; distinct rows for state pools);
    ``bad_range`` a valid location outside the pool; ``bad_target`` one in a reserved page 0 or
    on a stored sentinel row (allocator bugs: checked before anything is dispatched).
    """
    A = _alloc()
    geo = layout.geometry
    column_of_first, column = _shared_columns(names)  # names[k]'s column in the fetched array
    limits = []
    for n in names:
        p = layout.pool(n)
        limits.append((p.capacity, p.tokens_per_page if _reserved_page0(p, layout) else 0,
                       -2 if p.sentinel is None else p.sentinel, p.spec.kind == "state"))

    def f(alloc_state, slots, *, width):
        t = A.translate(alloc_state, slots[:, None], jnp.arange(width, dtype=jnp.int32)[None, :],
                        csa_ratio=geo.csa_ratio, hca_ratio=geo.hca_ratio, c4_ring=geo.c4_ring,
                        c128_ring=geo.c128_ring)
        table = _pool_locations(t, scope)
        per_pool = [jnp.where(table[n][1] & (table[n][0] >= 0), table[n][0], -1)
                    for n in names]
        locs = jnp.stack(per_pool, axis=1)
        # the distinct columns only (c4 / c4_indexer and c4_state / c4_indexer_state share
        # their locations): the host fetches this smaller array once for the whole batch
        distinct = jnp.stack([per_pool[k] for k in column_of_first], axis=1)
        counts, bad_range, bad_target = [], [], []
        for i, (cap, low, sentinel, is_state) in enumerate(limits):
            loc = locs[:, i]
            v = loc >= 0
            if is_state:  # distinct rows among the valid ones
                srt = jnp.sort(jnp.where(v, loc, _BIG), axis=-1)
                first = jnp.concatenate([srt[:, :1] != _BIG,
                                         (srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] != _BIG)], 1)
                counts.append(jnp.sum(first, axis=1, dtype=jnp.int32))
            else:
                counts.append(jnp.sum(v, axis=1, dtype=jnp.int32))
            bad_range.append(jnp.any(v & (loc >= cap), axis=1))
            bad_target.append(jnp.any(v & ((loc < low) | (loc == sentinel)), axis=1))
        return distinct, jnp.stack(counts, 1), jnp.stack(bad_range, 1), jnp.stack(bad_target, 1)

    return jax.jit(f, static_argnames=("width",)), column

_SAME_LOCS = {"c4_indexer": "c4", "c4_indexer_state": "c4_state"}


def _shared_columns(names: tuple[str, ...]) -> tuple[list[int], tuple[int, ...]]:
    """Columns of a per-pool location table where pools with the same locations share one:
    ``(firsts, column)``, ``firsts[c]`` = index in ``names`` of column ``c``'s first pool,
    ``column[k]`` = pool ``names[k]``'s column."""
    firsts, column = [], []
    for k, n in enumerate(names):
        same = _SAME_LOCS.get(n)
        if same in names:
            column.append(column[names.index(same)])
        else:
            column.append(len(firsts))
            firsts.append(k)
    return firsts, tuple(column)


PLAN_MIN_WIDTH = 128


def _plan_width(T: int) -> int:
    """Width of a request's device plan: the next power of two >= T (at least
    ``PLAN_MIN_WIDTH``), so that few planning programs are compiled."""
    return max(PLAN_MIN_WIDTH, 1 << max(T - 1, 0).bit_length())


def _compact(values, keep, width: int):
    """``values[keep]`` packed to the front of ``int32[width]`` in order, -1 after (one cumsum
    and one scatter: a fixed-size ``nonzero``)."""
    pos = jnp.cumsum(keep.astype(jnp.int32)) - 1
    idx = jnp.where(keep, pos, width)
    return jnp.full((width,), -1, jnp.int32).at[idx].set(values.astype(jnp.int32), mode="drop",
                                                          unique_indices=True)


def _first_of_runs(srt):
    """bool mask of the first entry of each run of equal values of sorted ``srt`` (``_BIG``:
    not an entry)."""
    return jnp.concatenate([srt[:1] != _BIG, (srt[1:] != srt[:-1]) & (srt[1:] != _BIG)])


class _PlanFns(NamedTuple):
    """The request level's device planning programs for ``(layout, names, scope)``.

    One jitted program per batch (the per-request functions below, ``vmap``-ed over the batch;
    compiled per batch size and width W = ``_plan_width(longest request)``).  Per request:

    ``save(alloc_state, slot, length) -> (plan int32[C, W], code int32[C, W], info
    int32[2P])``: per *distinct* location column c (pools with the same locations share one:
    C4 / C4 indexer, C4 / C4-indexer state), ``plan[c]`` holds the locations a save gathers,
    packed to the front, -1 after — the valid tokens' locations in token order for a token
    column, the distinct valid rows in ascending order for a state column — and ``code[c]``
    what a load needs of the saved request (``_Lease.code``); ``info`` = per pool the number of
    saved entries, then per pool whether a valid location is outside the pool.

    ``load(alloc_state, slot, length, code) -> (plan int32[K, W], info int32[C + 2P])``: the
    new locations combined with the saved code (``new_mask[old_mask]``): a token column's
    targets (row ``load_rows[c][0]``) are the new locations of the saved tokens in save order,
    -1 where the token is not valid now; a state column's targets are the distinct new rows of
    tokens valid before and after, ascending, and row ``load_rows[c][1]`` the saved entry each
    one restores (its first token's: ``np.unique(..., return_index=True)``); ``info`` = per
    column the number of entries restored, then per pool bad-range and bad-target flags (a
    valid new location in a reserved page 0 or on a sentinel row).

    The batched programs return one plan array per request and the batch's ``info`` stacked,
    which is all the host fetches (one small transfer per batch): no location array ever
    leaves the device.  Positions ``>= length`` are invalid everywhere.
    """

    save: Any
    load: Any
    column: tuple[int, ...]
    state_col: tuple[bool, ...]
    load_rows: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def _plan_fns(layout: Layout, names: tuple[str, ...], scope: str) -> _PlanFns:
    A = _alloc()
    geo = layout.geometry
    firsts, column = _shared_columns(names)
    state_col = tuple(layout.pool(names[k]).spec.kind == "state" for k in firsts)
    load_rows, r = [], len(firsts)
    for c, st in enumerate(state_col):
        load_rows.append((c, r if st else -1))
        r += bool(st)
    limits = []
    for n in names:
        p = layout.pool(n)
        limits.append((p.capacity, p.tokens_per_page if _reserved_page0(p, layout) else 0,
                       -2 if p.sentinel is None else p.sentinel))

    def translate(alloc_state, slot, length, width):
        pos = jnp.arange(width, dtype=jnp.int32)
        t = A.translate(alloc_state, jnp.broadcast_to(slot.astype(jnp.int32), (width,)), pos,
                        csa_ratio=geo.csa_ratio, hca_ratio=geo.hca_ratio, c4_ring=geo.c4_ring,
                        c128_ring=geo.c128_ring)
        table = _pool_locations(t, scope)
        inside = pos < length
        cols = [jnp.where(inside & table[names[k]][1] & (table[names[k]][0] >= 0),
                          table[names[k]][0], -1).astype(jnp.int32) for k in firsts]
        bad_range, bad_target = [], []
        for k, (cap, low, sentinel) in enumerate(limits):
            loc = cols[column[k]]
            v = loc >= 0
            bad_range.append(jnp.any(v & (loc >= cap)))
            bad_target.append(jnp.any(v & ((loc < low) | (loc == sentinel))))
        return cols, jnp.stack(bad_range), jnp.stack(bad_target)

    def save(alloc_state, slot, length, *, width):
        cols, bad_range, _ = translate(alloc_state, slot, length, width)
        plan, code, counts = [], [], []
        iota = jnp.arange(width, dtype=jnp.int32)
        for loc, st in zip(cols, state_col):
            v = loc >= 0
            if st:  # distinct rows, ascending; each token's index among them
                srt, perm = lax.sort((jnp.where(v, loc, _BIG), iota), num_keys=1)
                first = _first_of_runs(srt)
                rank = jnp.cumsum(first.astype(jnp.int32)) - 1
                plan.append(_compact(srt, first, width))
                code.append(jnp.full((width,), -1, jnp.int32).at[perm].set(
                    jnp.where(srt != _BIG, rank, -1), unique_indices=True))
                counts.append(jnp.sum(first, dtype=jnp.int32))
            else:
                plan.append(_compact(loc, v, width))
                code.append(jnp.where(v, 0, -1).astype(jnp.int32))
                counts.append(jnp.sum(v, dtype=jnp.int32))
        info = jnp.concatenate([jnp.stack([counts[column[k]] for k in range(len(names))]),
                                bad_range.astype(jnp.int32)])
        return jnp.stack(plan), jnp.stack(code), info

    def load(alloc_state, slot, length, code, *, width):
        cols, bad_range, bad_target = translate(alloc_state, slot, length, width)
        dst_rows, src_rows, restored = [], [], []
        for c, (new, st) in enumerate(zip(cols, state_col)):
            old = code[c]
            old_v = old >= 0
            both = old_v & (new >= 0)
            if st:  # np.unique(new[both], return_index=True) with the saved index of each
                srt, src = lax.sort((jnp.where(both, new, _BIG), old), num_keys=1,
                                    is_stable=True)
                first = _first_of_runs(srt)
                dst_rows.append(_compact(srt, first, width))
                src_rows.append(_compact(src, first, width))
                restored.append(jnp.sum(first, dtype=jnp.int32))
            else:  # new_mask[old_mask]: the saved tokens' new locations, -1 where not valid now
                dst_rows.append(_compact(jnp.where(both, new, -1), old_v, width))
                restored.append(jnp.sum(both, dtype=jnp.int32))
        info = jnp.concatenate([jnp.stack(restored), bad_range.astype(jnp.int32),
                                bad_target.astype(jnp.int32)])
        return jnp.stack(dst_rows + src_rows), info

    def save_batch(alloc_state, slots, lengths, *, width):
        plan, code, info = jax.vmap(lambda s, n: save(alloc_state, s, n, width=width))(
            slots, lengths)
        B = slots.shape[0]  # one output array per request: each gather reads its own
        return tuple(plan[b] for b in range(B)), tuple(code[b] for b in range(B)), info

    def load_batch(alloc_state, slots, lengths, codes, *, width):
        plan, info = jax.vmap(lambda s, n, c: load(alloc_state, s, n, c, width=width))(
            slots, lengths, jnp.stack(codes))
        return tuple(plan[b] for b in range(slots.shape[0])), info

    return _PlanFns(jax.jit(save_batch, static_argnames=("width",)),
                    jax.jit(load_batch, static_argnames=("width",)), column, state_col,
                    tuple(load_rows))


class _Translated:
    """A batch's packed translation: computed on the device in one program, fetched to the host
    in *one* transfer before anything of the batch is dispatched.

    (Fetching request by request — the earlier design — put a device-to-host sync inside the
    per-request loop: each fetch queued behind the previous request's gather / scatter and
    transfer, so no request's host planning overlapped any transfer.  That was the request-level
    gap to the location level on the H100: 14.3 ms / request against ~5 ms of transfer.)
    """

    def __init__(self, layout: Layout, alloc_state, slots, lengths, scope, names, target: bool):
        self.names, self.lengths = names, lengths
        width = bucket(max(max(lengths, default=1), 1))
        fn, self.column = _pack_fn(layout, names, scope)
        out = fn(alloc_state, jnp.asarray(slots, jnp.int32), width=width)
        self.locs, self.counts, bad_range, bad_target = jax.device_get(out)
        for what, bad in (("outside its pool", bad_range),
                          ("inside a reserved page 0 or on a sentinel row", bad_target)):
            if not target and what != "outside its pool":
                continue
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"the allocator maps a token of request {slots[i]} to a "
                                 f"{names[j]!r} location {what}; nothing was dispatched")

    def request(self, i: int, share: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{pool: (locs int32[T], valid bool[T])}`` of the i-th request (host only: no sync).

        ``share=False``: every pool gets its own arrays (public ``request_locs``: callers may
        modify them).  ``share=True`` (internal planning): pools with the same locations share
        one read-only ``(locs, valid)`` pair, so the planning derives each column once."""
        T = self.lengths[i]
        row = self.locs[i][:, :T]
        cols = {}
        for c in set(self.column):
            locs = np.array(row[c], np.int32)
            valid = locs >= 0
            if share:
                locs.flags.writeable = False
                valid.flags.writeable = False
            cols[c] = (locs, valid)
        out = {}
        for k, n in enumerate(self.names):
            locs, valid = cols[self.column[k]]
            out[n] = (locs, valid) if share else (locs.copy(), valid.copy())
        return out


def _request_locs_batch(layout: Layout, alloc_state, slots: list[int], lengths: list[int],
                        scope: str, names: tuple[str, ...]) -> list[dict]:
    if not slots:
        return []
    tr = _Translated(layout, alloc_state, slots, lengths, scope, names, target=False)
    return [tr.request(i) for i in range(len(slots))]


def request_locs(layout: Layout, alloc_state, request: int, *,
                 c128_state_scope: str = "page",
                 pools=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every pool's locations of a request's tokens ``0 .. T-1`` (SPEC §4, §6).

    Args:
      layout: the cache layout.
      alloc_state: a ``jaxkv.alloc.AllocState``.
      request: the request's slot.
      c128_state_scope: ``"page"`` — C128 compress-state rows follow the SWA loc (SGLang) — or
        ``"request"`` — newer SGLang's request-scoped rows ``slot * ring + position % ring``.
      pools: restrict to these pools (default: all).

    Returns:
      ``{pool: (locs int32[T], valid bool[T])}``: SWA via ``full_to_swa`` (valid where > 0);
      C4 / C4-indexer / C128 by ``(f + 1) % r == 0``; C4 and C4-indexer state rows from the SWA
      loc (valid with it); C128 state rows from the SWA loc or the request slot.  (Computed by
      ``jaxkv.alloc.translate``.)
    """
    slot, T = _check_slot(alloc_state, request)
    names = _pools_of(layout, pools, c128_state_scope)
    return _request_locs_batch(layout, alloc_state, [slot], [T], c128_state_scope, names)[0]


def start_save_batch(cache: Cache, alloc_state, requests, *, c128_state_scope: str = "page",
                     pools=None, budget: HostBudget | None = None,
                     host_kind: str | None = None, impl: str = "auto",
                     transfer: str = "device_put",
                     max_inflight_bytes: int | None = None) -> list[SaveHandle]:
    """Starts saving several requests' whole caches to host memory; returns at once.

    All requests are planned first, on the device, by one program (translation, masks and
    compaction into each request's gather index array; the host fetches only the per-pool
    counts, once for the batch: ``_plan_fns``), the budget is charged
    for the whole batch (all or nothing), then every request's gather and device-to-host copy is
    queued back to back, so the copy of one request overlaps the gather of the next.

    Token pools save the request's tokens valid in each pool (the masks are recorded in the
    HostCopy); state pools save each distinct row once.  An empty request short-circuits (no
    transfer, no host bytes).  Neither the cache nor the allocator is modified.

    Args:
      cache: the cache.
      alloc_state: the allocator state (``jaxkv.alloc``); the requests must be live.
      requests: request slots (distinct ints).
      c128_state_scope: see ``request_locs``.
      pools: restrict to these pools (default: every pool of the cache).
      budget, host_kind, impl, transfer: as for ``start_save_locs``.
      max_inflight_bytes: device staging kept in flight at most (default
        ``MAX_INFLIGHT_BYTES``, 1 GiB): before a request's gather is queued, the oldest transfers
        are awaited until its staging fits, so the call returns once at most this many bytes
        are still being copied (one request always goes; 0 makes the batch synchronous).  Each
        request's gather program uses at most ``gather_bound(staging)`` device bytes (checked on
        the compiled program before it runs; ``SaveHandle.gather_memory`` reports it).

    Returns:
      One ``SaveHandle`` per request.  Release the requests' pages with ``finish_save_batch``
      (which waits first).

    Raises:
      ValueError: bad requests / arguments.  HostBudgetExceeded: the batch does not fit (nothing
      changed, nothing dispatched).  GatherTooLarge: a gather would need far more device memory
      than its staging (the requests not yet dispatched are not charged).
    """
    _check_cache(cache)
    limit = _check_inflight(max_inflight_bytes)
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
    layout = cache.layout
    names = _pools_of(layout, pools, c128_state_scope)
    slots, lens = _check_slots(alloc_state, list(requests))
    budget = default_budget() if budget is None else budget
    kind = _host_kind(next(iter(cache.buffers[0].devices())), host_kind)
    if not slots:
        return []
    # One device program per request plans it (translation + masks + compaction, on the device);
    # the host fetches only the per-pool counts of the whole batch, in one transfer.
    plans = _plan_saves(cache, alloc_state, slots, lens, c128_state_scope, names)
    sizes = [pl.total + pl.code_bytes for pl in plans]
    total = sum(sizes)
    if total:  # the whole batch, all or nothing, before anything is dispatched
        budget.reserve(total, f"saving requests {slots} ({sum(lens):,} tokens)")
    handles, inflight = [], []
    try:  # queued request after request: request i's copy overlaps request i+1's gather
        for pl, size in zip(plans, sizes):
            _throttle(inflight, pl.total, limit)
            handles.append(_dispatch_save(cache, pl.plan, budget, kind, impl, reserved=True,
                                          transfer=transfer, rows=pl.rows, code=pl.code,
                                          lease_bytes=size))
            inflight.append((handles[-1], pl.total))
    except BaseException:
        budget.release(sum(sizes[len(handles):]))
        for h in handles:
            h.copy_in_flight.free()
        raise
    return handles


class _RequestSave(NamedTuple):
    plan: _SavePlan  # locs: the device plan int32[C, W] (None: empty request)
    rows: tuple | None  # per gather key: (plan row, padded count)
    code: Any  # device int32[C, W] or None
    total: int  # staging bytes
    code_bytes: int  # host bytes of the code


def _plan_saves(cache: Cache, alloc_state, slots, lens, scope: str,
                names: tuple[str, ...]) -> list[_RequestSave]:
    """Plans a batch of request saves on the device; fetches only the counts (one transfer).

    Raises ValueError (nothing dispatched but the pure planning programs) if the allocator maps a
    token outside its pool."""
    layout = cache.layout
    fns = _plan_fns(layout, names, scope)
    live = [i for i, T in enumerate(lens) if T]
    outs, infos = {}, []
    if live:
        width = _plan_width(max(lens[i] for i in live))
        plans_d, codes_d, info_d = fns.save(
            alloc_state, np.asarray([slots[i] for i in live], np.int32),
            np.asarray([lens[i] for i in live], np.int32), width=width)
        outs = {i: (plans_d[j], codes_d[j]) for j, i in enumerate(live)}
        infos = np.asarray(jax.device_get(info_d))  # the batch's one device->host fetch
    P = len(names)
    item = [sum(_item_bytes(layout, n)) for n in names]
    columns = {n: fns.column[k] for k, n in enumerate(names)}
    state_columns = {n: fns.column[k] for k, n in enumerate(names)
                     if fns.state_col[fns.column[k]]}
    out = []
    for i, (slot, T) in enumerate(zip(slots, lens)):
        meta = {"length": T, "slot": slot, "c128_state_scope": scope, "pools": names,
                "columns": columns, "state_columns": state_columns}
        if not T:
            masks = {n: np.zeros(0, bool) for n in names}
            out.append(_RequestSave(_SavePlan((), None, (), 0, masks,
                                              dict(meta, state_index={})), None, None, 0, 0))
            continue
        info = np.asarray(infos[live.index(i)])
        counts, bad = info[:P], info[P:2 * P]
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"the allocator maps a token of request {slot} to a {names[j]!r} "
                             "location outside its pool; nothing was dispatched")
        keys, rows, entries, offset = [], [], [], 0
        for k, n in enumerate(names):
            c = int(counts[k])
            if not c:
                continue
            layers = tuple(layout.pool(n).groups[0])
            e = PoolEntry(n, 0, layers, c, bucket(c), item[k], offset)
            offset += e.nbytes
            keys.append((n, layers))
            rows.append((fns.column[k], e.padded))
            entries.append(e)
        plan_d, code_d = outs[i]
        if not entries:  # nothing valid anywhere: an empty copy
            masks = {n: np.zeros(T, bool) for n in names}
            out.append(_RequestSave(_SavePlan((), None, (), 0, masks,
                                              dict(meta, state_index={})), None, None, 0, 0))
            continue
        plan = _SavePlan(tuple(keys), plan_d, tuple(entries), offset, {}, meta)
        out.append(_RequestSave(plan, tuple(rows), code_d, offset,
                                int(np.prod(code_d.shape)) * 4))
    return out


def start_save(cache: Cache, alloc_state, request: int, **kw) -> SaveHandle:
    """Starts saving one request's whole cache; returns at once (see ``start_save_batch``)."""
    _check_slot(alloc_state, request)
    return start_save_batch(cache, alloc_state, [request], **kw)[0]


def save(cache: Cache, alloc_state, request: int, **kw) -> HostCopy:
    """Synchronous save of a request's whole cache: ``start_save(...).wait()`` (SGLang's
    ``get_cpu_copy``).  Does not release the request's pages (see ``finish_save``)."""
    return start_save(cache, alloc_state, request, **kw).wait()


def finish_save_batch(handles, alloc_state, requests):
    """Waits for saves to land in host memory, *then* releases the requests' device pages.

    This order is the only one the API offers: the pages are handed back to the allocator only
    once the bytes are safe on the host.

    Args:
      handles: from ``start_save_batch`` (or ``start_save``), one per request.
      alloc_state: the allocator state.
      requests: the slots that were saved, in the handles' order.

    Returns:
      ``(host_copies, alloc_state)``.

    Raises:
      ValueError: a slot is not the request its handle saved, or the allocator refused the
        release (the host copies are then freed and the allocator state is unchanged).
    """
    handles, requests = list(handles), list(requests)
    if len(handles) != len(requests):
        raise ValueError(f"{len(handles)} handles but {len(requests)} requests")
    for h, r in zip(handles, requests):
        if not isinstance(h, SaveHandle):
            raise ValueError(f"handles must be SaveHandles, got {type(h).__name__}")
        saved_slot = h.copy_in_flight.meta.get("slot")
        if saved_slot is None or saved_slot != r:
            raise ValueError(f"request {r!r} is not the request its handle saved "
                             f"({saved_slot!r})")
    _check_slots(alloc_state, requests)
    copies = [h.wait() for h in handles]
    A = _alloc()
    if not requests:
        return copies, alloc_state
    new_state, status = A.release(alloc_state, jnp.asarray(requests, jnp.int32))
    st = np.asarray(status)
    if (st != A.OK).any():
        for c in copies:
            c.free()
        raise ValueError(f"the allocator refused to release requests {requests} (status "
                         f"{st.tolist()}); their pages are untouched and the host copies were "
                         "dropped")
    return copies, new_state


def finish_save(handle: SaveHandle, alloc_state, request: int):
    """``finish_save_batch`` for one request: returns ``(host_copy, alloc_state)``."""
    copies, state = finish_save_batch([handle], alloc_state, [request])
    return copies[0], state


def retract(cache: Cache, alloc_state, request: int, **kw):
    """Save + release in the safe order: ``finish_save(start_save(...))``.

    Returns ``(host_copy, alloc_state)``; the cache is unchanged (its bytes stay until reused).
    """
    return finish_save(start_save(cache, alloc_state, request, **kw), alloc_state, request)


def retract_batch(cache: Cache, alloc_state, requests, **kw):
    """``finish_save_batch(start_save_batch(...))``: returns ``(host_copies, alloc_state)``."""
    requests = list(requests)
    return finish_save_batch(start_save_batch(cache, alloc_state, requests, **kw), alloc_state,
                             requests)


def _plan_loads(cache: Cache, alloc_state, host_copies, slots, lens, early=None):
    """Plans a batch of request loads on the device (nothing written): validates on the host,
    uploads every small input in one call, runs one planning program per (pools, scope, width)
    group and fetches only its counts / checks.  Raises ValueError (nothing written: only the
    pure planning programs and, with ``early``, copies into fresh device staging were queued)
    for a bad reset row or an allocator bug.

    ``early``: ``(window, staged)`` (a ``_LoadWindow`` and a dict): the host-to-device copies of
    the first planned requests that fit in the window are queued *before* the planning program
    (``staged[i]`` = request i's device staging), so that the transfers run while the batch is
    planned (a copy's destination allocation waits for the work already queued on the compute
    stream, see ``load_batch``).

    Returns ``(device sharding, resets {i: (reset keys, rows)}, outs {i: (device plan, None)},
    infos {i: int32 info}, small (uploaded inputs), reset_at {i: index in small})``."""
    layout = cache.layout
    sharding = cache.buffers[0].sharding
    if getattr(sharding, "memory_kind", None) is not None:
        sharding = sharding.with_memory_kind("device")
    # Validate everything on the host first (nothing dispatched): pools / scope of each copy and
    # the request-scoped rows to reset.
    resets = {}
    for i, (c, s) in enumerate(zip(host_copies, slots)):
        if not lens[i]:
            continue
        names, scope = c.meta["pools"], c.meta["c128_state_scope"]
        _pools_of(layout, names, scope)
        if scope == "request" and "c128_state" in names:
            ring = layout.geometry.c128_ring
            r = (s * ring + np.arange(ring)).astype(np.int32)
            p = layout.pool("c128_state")
            _check_targets(r.astype(np.int64), p, layout, "reset['c128_state']")
            resets[i] = ((("c128_state", tuple(p.groups[0])),), r)
    # Every small input of the batch in one host-to-device call, queued before any staging:
    # the saved plan codes, slots, lengths and reset rows.  Then one planning program per
    # request (translation of the new locations + new_mask[old_mask] + compaction, on the
    # device) and one fetch of all their counts / checks.
    planned = [i for i in range(len(slots)) if lens[i] and host_copies[i].entries]
    groups = {}  # one planning program per (pools, scope, plan width)
    for i in planned:
        c = host_copies[i]
        key = (c.meta["pools"], c.meta["c128_state_scope"], int(c._lease.code.shape[1]))
        groups.setdefault(key, []).append(i)
    small, where = [], {}
    for key, idx in groups.items():
        where[key] = len(small)
        small += [host_copies[i]._lease.code for i in idx]
        small += [np.asarray([slots[i] for i in idx], np.int32),
                  np.asarray([lens[i] for i in idx], np.int32)]
    reset_at = {}
    for i, (_, r) in resets.items():
        reset_at[i] = len(small)
        small.append(r)
    small = jax.device_put(small, sharding) if small else []
    if early is not None:  # the first transfers now: before the planning program is queued
        window, staged = early
        for i in planned:
            c = host_copies[i]
            if not window.room(c.nbytes):
                break
            staged[i] = jax.device_put(c.data, sharding)
            window.add(staged[i], c.nbytes)
    outs, infos = {}, {}
    for (names, scope, width), idx in groups.items():
        at, B = where[(names, scope, width)], len(idx)
        fns = _plan_fns(layout, names, scope)
        plans_d, info_d = fns.load(alloc_state, small[at + B], small[at + B + 1],
                                   tuple(small[at:at + B]), width=width)
        for j, i in enumerate(idx):
            outs[i] = (plans_d[j], None)
        infos[(names, scope, width)] = (idx, info_d)
    fetched = jax.device_get([v[1] for v in infos.values()])  # one fetch per group
    infos = {i: np.asarray(got[j]) for (idx, _), got in zip(infos.values(), fetched)
             for j, i in enumerate(idx)}
    for i in planned:
        names = host_copies[i].meta["pools"]
        P, C = len(names), len(infos[i]) - 2 * len(names)
        info = infos[i]
        for what, bad in (("outside its pool", info[C:C + P]),
                          ("inside a reserved page 0 or on a sentinel row", info[C + P:])):
            if bad.any():
                k = int(np.argmax(bad))
                raise ValueError(f"the allocator maps a token of request {slots[i]} to a "
                                 f"{names[k]!r} location {what}; nothing was dispatched")
    return sharding, resets, outs, infos, small, reset_at


def load_batch(cache: Cache, alloc_state, host_copies, requests, *, impl: str = "auto",
               donate: bool = False, free: bool = False,
               max_inflight_bytes: int | None = None) -> Cache:
    """Restores saved requests into their new pages (SGLang's ``load_cpu_copy``, batched).

    The new locations are translated from each request's new full locations exactly as on save
    (one device round trip for the batch); an entry is restored only where it was valid when
    saved *and* is valid now (``new_mask[old_mask]``): a tail-only SWA allocation restores the
    rows it holds and writes nothing into page 0.  Request-scoped state rows of the new slot are
    reset to the sentinel value ``[kv 0 | score -inf]`` first, then the saved rows are restored
    (same program).  Empty requests short-circuit.  Before anything is dispatched, the copies are
    checked on the host and the new locations of the whole batch on the device (one translation:
    a location outside its pool, in a reserved page 0 or on a sentinel row is an allocator bug and
    a ValueError).  That check is part of the batch's device planning program (``_plan_fns``:
    translation, ``new_mask[old_mask]`` and compaction into each request's target / source index
    array, all on the device; the host fetches only counts and flags, once).  Then request after
    request only its pinned host-to-device copy and its scatter are queued, the copies one request
    ahead of the scatters and the first ones before the planning program (a copy queued after a
    scatter would wait for it on the device: see ``_load_batch``), so that the host-to-device
    copies run back to back.

    Args:
      cache: the cache.
      alloc_state: the allocator state holding the resumed requests (``jaxkv.alloc.admit`` with
        the saved lengths: ``host_copy.meta["length"]``).
      host_copies: from ``save`` / ``finish_save_batch``, one per request.
      requests: the requests' *new* slots.
      impl, donate, free: as for ``load_locs``.
      max_inflight_bytes: device staging of queued host-to-device copies at most (default
        ``MAX_INFLIGHT_BYTES``): before a request's copy is queued, the oldest queued copies
        are awaited until the ones still in flight plus this one fit (one request always goes;
        a sliding window: the pipeline is never drained).

    Returns:
      The new cache.

    Raises:
      ValueError: a copy is not a request-level copy, a length differs, bad slots, freed copy,
        wrong layout (nothing changed).
    """
    _check_cache(cache)
    limit = _check_inflight(max_inflight_bytes)
    host_copies, requests = list(host_copies), list(requests)
    if len(host_copies) != len(requests):
        raise ValueError(f"{len(host_copies)} host copies but {len(requests)} requests")
    slots, lens = _check_slots(alloc_state, requests)
    for c, s, T in zip(host_copies, slots, lens):
        if not isinstance(c, HostCopy) or "length" not in c.meta:
            raise ValueError("host_copies must be request-level HostCopies (from save / "
                             "start_save)")
        if c.freed:
            raise ValueError("a host copy was freed; its bytes are gone")
        if T != c.meta["length"]:
            raise ValueError(f"request {s} holds {T} tokens but its host copy saved "
                             f"{c.meta['length']}; resume with the saved length "
                             "(jaxkv.alloc.admit(state, [host_copy.meta['length']]))")
    for c in host_copies:
        if c.layout != cache.layout:
            raise ValueError("a host copy was saved from a cache with a different layout")
    return _load_batch(cache, alloc_state, host_copies, slots, lens, impl=impl, donate=donate,
                       free=free, limit=limit)


def _request_scatter(layout: Layout, c: HostCopy, i: int, outs, infos, resets, small, reset_at):
    """What request i's scatter program needs, from the batch plan of ``_plan_loads``:
    ``(entries, rows, restore, reset_keys, reset_rows)``, or None when nothing is written (an
    empty request, or nothing restored and no reset)."""
    reset = resets.get(i)
    if i not in outs and reset is None:  # empty request, or nothing saved and no reset
        return None
    entries, rows, restore = [], [], False
    if i in outs:
        fns = _plan_fns(layout, c.meta["pools"], c.meta["c128_state_scope"])
        names = c.meta["pools"]
        restored = np.asarray(infos[i])[:len(fns.state_col)]
        for e in c.entries:
            col = fns.column[names.index(e.pool)]
            n = int(restored[col])
            d_row, s_row = fns.load_rows[col]
            if fns.state_col[col]:
                if not n:
                    continue
                rows.append((d_row, s_row, bucket(n)))
            else:
                rows.append((d_row, -1, e.padded))
            entries.append(e)
            restore = restore or n > 0
    if not restore and reset is None:
        return None
    if not restore:
        entries, rows = [], []
    reset_keys = reset[0] if reset else ()
    reset_rows = [small[reset_at[i]]] if reset else []
    return tuple(e._replace(count=0) for e in entries), tuple(rows), restore, reset_keys, \
        reset_rows


def _load_batch(cache: Cache, alloc_state, host_copies, slots, lens, *, impl: str,
                donate: bool, free: bool, limit: int, ahead: bool = True, early: bool = True):
    """``load_batch`` after its argument checks.

    Queue order (the point of it): a host-to-device copy into a new device array waits, on the
    device, for *everything already queued on the compute stream* (PJRT's GPU client allocates
    device memory in compute-stream order, so the copy stream waits for the compute stream when
    the destination is allocated).  Queuing request i's scatter before request i+1's copy
    therefore makes copy i+1 wait for scatter i, which waits for copy i: copies and scatters
    serialise and the copy engine idles for one scatter per request (run 3: ~0.6 ms x 16).
    With ``ahead`` request i's scatter is queued only after request i+1's copy (copy i+1 then
    waits for scatter i-1 at most, which ran while copy i was transferring); with ``early`` the
    first copies (as many as the window holds) are queued before the batch's planning program.
    ``ahead=False, early=False`` is the run-3 order (kept for the benchmark's A/B row).
    """
    layout = cache.layout
    window = _LoadWindow(limit)  # bounds the device staging in flight, without draining
    staged: dict = {}
    sharding, resets, outs, infos, small, reset_at = _plan_loads(
        cache, alloc_state, host_copies, slots, lens,
        early=(window, staged) if early else None)
    fn = _scatter_donate if donate else _scatter
    pending: list = []  # requests whose copy is queued and whose scatter is not yet

    def flush(keep: int):
        nonlocal cache
        while len(pending) > keep:
            c, staging, plan_d, (entries, rows, _, reset_keys, reset_rows) = pending.pop(0)
            buffers = fn(cache.buffers, staging, plan_d, [], reset_rows, layout=layout,
                         entries=entries, resets=reset_keys, impl=impl, rows=rows)
            cache = Cache(tuple(buffers), layout)
            if free:
                c.free()

    for i, c in enumerate(host_copies):
        item = _request_scatter(layout, c, i, outs, infos, resets, small, reset_at)
        staging = staged.pop(i, None)  # an early copy not needed (nothing restored) is dropped
        if item is None:
            if free:
                c.free()
            continue
        if item[2]:  # restore: its staging copy
            if staging is None:
                window.before(c.nbytes)
                staging = jax.device_put(c.data, sharding)
                window.add(staging, c.nbytes)
            plan_d = outs[i][0]
        else:
            staging = jnp.zeros((0,), jnp.uint8)
            plan_d = jnp.zeros((1, 1), jnp.int32)
        pending.append((c, staging, plan_d, item))
        flush(1 if ahead else 0)  # request i-1's scatter goes after request i's copy
    flush(0)
    return cache


def load(cache: Cache, alloc_state, host_copy: HostCopy, request: int, **kw) -> Cache:
    """Restores one saved request into its new pages (see ``load_batch``)."""
    if not isinstance(host_copy, HostCopy) or "length" not in host_copy.meta:
        raise ValueError("host_copy must be a request-level HostCopy (from save / start_save)")
    _check_slot(alloc_state, request)
    return load_batch(cache, alloc_state, [host_copy], [request], **kw)


def resume_batch(cache: Cache, alloc_state, host_copies, *, impl: str = "auto",
                 donate: bool = False, free: bool = True,
                 max_inflight_bytes: int | None = None):
    """Admits saved requests again (fresh, different pages; tail-only SWA) and loads them.

    Returns:
      ``(cache, alloc_state, slots)``; when the allocator has no room for the whole batch: the
      inputs unchanged and every slot -1 (the host copies are kept for a later try).
    """
    host_copies = list(host_copies)
    _check_inflight(max_inflight_bytes)
    for c in host_copies:
        if not isinstance(c, HostCopy) or "length" not in c.meta:
            raise ValueError("host_copies must be request-level HostCopies (from save / "
                             "start_save)")
        if c.freed:
            raise ValueError("a host copy was freed; its bytes are gone")
    if not host_copies:
        return cache, alloc_state, []
    A = _alloc()
    new_state, slots, status = A.admit(
        alloc_state, jnp.asarray([c.meta["length"] for c in host_copies], jnp.int32))
    if (np.asarray(status) != A.OK).any():
        return cache, alloc_state, [-1] * len(host_copies)
    slots = [int(x) for x in np.asarray(slots)]
    cache = load_batch(cache, new_state, host_copies, slots, impl=impl, donate=donate,
                       free=free, max_inflight_bytes=max_inflight_bytes)
    return cache, new_state, slots


def resume(cache: Cache, alloc_state, host_copy: HostCopy, **kw):
    """``resume_batch`` for one request: returns ``(cache, alloc_state, slot)`` (slot -1: no
    room; nothing changed)."""
    cache, state, slots = resume_batch(cache, alloc_state, [host_copy], **kw)
    return cache, state, slots[0]
