"""A functional, batched, jittable page allocator for DSv4 / V3.2 caches (SPEC §3, §4, §8).

The allocator state is one immutable pytree (``AllocState``, a frozen registered dataclass in the
manner of MaxText's ``PageState``); every transition ``state, status = f(state, ...)`` is pure,
works inside ``jax.jit`` (and is donation-friendly: ``jax.jit(extend, donate_argnums=0, ...)``),
and touches only arrays sized by the batch, never a host round trip.

What it tracks
  * **Full pages** (``page_size`` tokens): the per-request page table ``page_table[slot, k]``; the
    full location of position ``p`` of request ``slot`` is ``page_table[slot, p // ps] * ps +
    p % ps`` (so ``f % ps == p % ps``).  Page 0 is reserved (``0`` in a table means "none").
    In the layer-major layout the C4 / C128 / C4-indexer pools are addressed by the same page id
    (``c4 = f // 4`` lies in page ``f // 256``), so they need no allocation of their own.
  * **SWA pages** (``swa_page`` tokens): a request holds only the SWA pages overlapping its window
    ``[len - window, len)``, in a ring ``swa_ring[slot, k % K]`` (``K = (window-1)//swa_page + 2``
    pages at most).  Pages that fall out of the window are freed as ``extend`` moves it, so SWA
    memory is bounded by the window, not the sequence (SPEC §8's pitfall).
  * **full_to_swa** (SPEC §4): ``int32[num_pages * page_size + 1]`` (= full + page + 1 with
    ``full`` the usable tokens), last entry -1, 0 = no SWA slot.  Invariant: ``full_to_swa[f] > 0``
    exactly for the tokens inside their request's window; then it is ``swa_page_id * swa_page +
    p % swa_page``.  Tokens leaving the window are set back to 0.
  * **Request slots** ``0 .. max_requests-1`` (``lengths[slot] = -1`` when free), used for
    request-scoped state rows (``jaxkv.locs.request_state_rows``).

SWA allocation is *tail-only*: ``extend`` (and ``admit``, which is also the resume path) give SWA
slots only to the tokens that are inside the window at the new length.  After the step the state
is what SGLang reaches after its out-of-window eviction pass; an engine that writes SWA KV for
the earlier tokens of a long extend gets ``-1`` locations for them (writes are skipped).

Layouts (``config_from_layout``)
  * ``layer_major`` (SGLang): full pages and SWA pages are separate page spaces (two free lists);
    SWA pages have ``page_size`` tokens, and page-scoped state rows follow from the SWA loc
    (``jaxkv.locs.state_rows(swa, ring, page_size)``; state pools need ``num_swa_pages * ring + 1``
    rows).
  * ``packed`` (vLLM): one free list of block ids; full blocks (``page_size`` tokens, covering the
    C4 / C128 / indexer pages of that block) and SWA blocks (``swa_page = 64`` tokens) are drawn
    from it.  The compressor-state groups of vLLM (blocks of 4 / 8 rows) are *not* allocated here.

Failure
  Each batched call returns ``status: int32[B]`` (``OK``, ``NO_SPACE``, ``BAD`` — invalid slot,
  length, duplicate slot in the batch, double release, page not owned —, ``SKIPPED`` — would fit,
  but the batch was not applied, ``PAD`` — padding row).  Requests are served in batch order: a
  request fits when it and every valid request before it fit in the pages free *before* the call
  (pages freed by a call are available from the next call).  With ``atomic=True`` (default) any
  failure leaves the whole state unchanged (byte-identical); with ``atomic=False`` the fitting
  requests are applied and the others left untouched.  Nothing is ever half-applied to a request.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import locs as _locs
from jaxkv.layout import Layout

__all__ = [
    "OK", "NO_SPACE", "BAD", "SKIPPED", "PAD", "AllocConfig", "AllocState", "Locs",
    "config_from_layout", "dcp_widen", "init_state", "admit", "resume", "extend", "release",
    "full_locs", "token_table", "request_swa_locs", "translate", "num_free", "check_invariants",
]

OK, NO_SPACE, BAD, SKIPPED, PAD = 0, 1, 2, 3, 4


def _cdiv(a, b):
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class AllocConfig:
    """Static sizes of an allocator (hashable; a static field of ``AllocState``).

    Attributes:
      page_size: full tokens per full page (256 DSv4, 64 V3.2).
      num_pages: full pages, page 0 (reserved) included.
      max_requests: request slots.
      max_len: most tokens one request may hold.
      window: SWA tokens kept per request (128), or None (no SWA: V3.2).
      swa_page: tokens per SWA page (``page_size`` layer-major, 64 packed).
      num_swa_pages: SWA pages, page 0 included (== ``num_pages`` when ``shared``).
      shared: full and SWA pages come from one free list (the packed layout).
      dcp: DCP size the page space was widened for (1 = no DCP; see ``dcp_widen``).
    """

    page_size: int
    num_pages: int
    max_requests: int
    max_len: int
    window: int | None = 128
    swa_page: int = 256
    num_swa_pages: int = 0
    shared: bool = False
    dcp: int = 1

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_requests", "max_len", "swa_page", "dcp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")
        if self.window is not None:
            if not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"window must be a positive int or None, got {self.window!r}")
            if not self.shared and self.num_swa_pages < 2:
                raise ValueError("num_swa_pages must be >= 2 (page 0 is reserved), got "
                                 f"{self.num_swa_pages}")
        if self.num_pages * self.page_size + 1 >= 2**31:
            raise ValueError("num_pages * page_size exceeds int32 locations")

    @property
    def has_swa(self) -> bool:
        return self.window is not None

    @property
    def max_pages(self) -> int:
        """Page-table width: ``ceil(max_len / page_size)``."""
        return _cdiv(self.max_len, self.page_size)

    @property
    def ring(self) -> int:
        """Most SWA pages a request holds at once: ``(window - 1) // swa_page + 2`` (0 w/o SWA)."""
        return (self.window - 1) // self.swa_page + 2 if self.has_swa else 0

    @property
    def table_size(self) -> int:
        """Entries of ``full_to_swa``: ``num_pages * page_size + 1`` (last = -1)."""
        return self.num_pages * self.page_size + 1

    @property
    def swa_space(self) -> int:
        """Index of the page space SWA pages come from (0 = the full pages' when shared)."""
        return 0 if self.shared else 1

    @property
    def space_sizes(self) -> tuple[int, ...]:
        if not self.has_swa or self.shared:
            return (self.num_pages,)
        return (self.num_pages, self.num_swa_pages)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["page_table", "swa_ring", "lengths", "full_to_swa", "owners",
                                "stacks", "nfree"],
                   meta_fields=["cfg"])
@dataclasses.dataclass(frozen=True)
class AllocState:
    """Allocator state (a pytree; ``cfg`` is static).

    Attributes:
      page_table: int32[R, max_pages] full page ids per request (0 = none).
      swa_ring: int32[R, ring] SWA page of live logical SWA page ``k`` at ``k % ring`` (0 = none).
      lengths: int32[R] tokens held per request slot; -1 = slot free.
      full_to_swa: int32[table_size] (SPEC §4), last entry -1.
      owners: per page space (full[, swa]): int32[P] owning slot; -1 free, -2 reserved page 0.
      stacks: per page space: int32[P] free-page stack; entries ``[0, nfree)`` are the free pages.
      nfree: int32[S] free pages per space.
      cfg: the static ``AllocConfig``.
    """

    page_table: jax.Array
    swa_ring: jax.Array
    lengths: jax.Array
    full_to_swa: jax.Array
    owners: tuple[jax.Array, ...]
    stacks: tuple[jax.Array, ...]
    nfree: jax.Array
    cfg: AllocConfig


class Locs(NamedTuple):
    """Every pool location of a batch of tokens (all int32[...] of the positions' shape).

    Attributes:
      full: full locations (-1 where the position is not held).
      swa, swa_valid: SWA locations (-1 outside the window) and their mask.
      c4, c4_valid: C4 / C4-indexer locations (``(f+1) % csa == 0``) and mask.
      c128, c128_valid: C128 locations and mask.
      c4_state: page-scoped C4 (and C4-indexer) state rows from the SWA loc (-1 = sentinel).
      c128_state: page-scoped C128 state rows.
      c128_state_req: request-scoped C128 state rows ``slot * c128_ring + p % c128_ring``.
    """

    full: jax.Array
    swa: jax.Array
    swa_valid: jax.Array
    c4: jax.Array
    c4_valid: jax.Array
    c128: jax.Array
    c128_valid: jax.Array
    c4_state: jax.Array
    c128_state: jax.Array
    c128_state_req: jax.Array


# ---------------------------------------------------------------------------------------------
# Construction


def config_from_layout(layout: Layout, max_requests: int, max_len: int,
                       window: int | None = None) -> AllocConfig:
    """The allocator config of a cache layout.

    * layer_major DSv4: full pages = the C4 pool's pages (C128 and C4-indexer must have the
      same count: their pages line up 1:1); SWA pages = the SWA pool's (``page_size`` tokens).
    * layer_major V3.2: full pages = the ``kv`` pool's (the indexer must match); no SWA.
    * packed: one space of ``num_blocks`` blocks; full blocks of ``page_size`` tokens, SWA blocks
      of the SWA pool's block size (64), ``shared=True``.

    Args:
      layout: from ``jaxkv.layer_major`` or ``jaxkv.packed``.
      max_requests: request slots.
      max_len: most tokens per request.
      window: SWA window (default: the geometry's).
    """
    geo = layout.geometry
    ps = geo.page_size
    win = (window if window is not None else geo.swa_window) if geo.is_dsv4 else None
    if layout.kind == "packed":
        nb = layout.pools[0].num_pages
        sp = layout.pool("swa").tokens_per_page if geo.is_dsv4 else ps
        return AllocConfig(ps, nb, max_requests, max_len, win, sp, nb, shared=True)
    names = ("c4", "c128", "c4_indexer") if geo.is_dsv4 else ("kv", "indexer")
    counts = {n: layout.pool(n).num_pages for n in names}
    if len(set(counts.values())) != 1:
        raise ValueError(f"pools {names} must have equal page counts (their pages line up 1:1 "
                         f"with full pages), got {counts}")
    nf = counts[names[0]]
    if not geo.is_dsv4:
        return AllocConfig(ps, nf, max_requests, max_len, None, ps, 0)
    swa = layout.pool("swa")
    return AllocConfig(ps, nf, max_requests, max_len, win, swa.tokens_per_page, swa.num_pages)


def dcp_widen(cfg: AllocConfig, n: int) -> AllocConfig:
    """Config allocating full pages in SGLang's widened DCP space (SPEC §9).

    The widened space has pages of ``page_size * n`` tokens (same page count): widened loc ``w``
    lives on rank ``locs.dcp_owner_widened(w, n) = w % n`` at physical slot
    ``locs.dcp_physical_widened(w, n) = w // n``, which lies in physical page ``w // (ps*n)`` —
    the same page id on every rank, so one allocation keeps all ranks' page tables consistent
    (token round-robin, interleave 1).  SWA stays un-widened (replicated per rank).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return dataclasses.replace(cfg, page_size=cfg.page_size * n, dcp=cfg.dcp * n)


def init_state(cfg: AllocConfig) -> AllocState:
    """Empty allocator: every slot free, every page but page 0 free, ``full_to_swa`` = 0 / -1."""
    owners, stacks = [], []
    for P in cfg.space_sizes:
        o = np.full((P,), -1, np.int32)
        o[0] = -2
        owners.append(jnp.asarray(o))
        # Pop from the top (index nfree-1): lowest page ids are handed out first.
        stacks.append(jnp.asarray(np.concatenate([np.arange(P - 1, 0, -1, dtype=np.int32),
                                                  np.zeros((1,), np.int32)])))
    table = np.zeros((cfg.table_size,), np.int32)
    table[-1] = -1
    return AllocState(
        page_table=jnp.zeros((cfg.max_requests, cfg.max_pages), jnp.int32),
        swa_ring=jnp.zeros((cfg.max_requests, cfg.ring), jnp.int32),
        lengths=jnp.full((cfg.max_requests,), -1, jnp.int32),
        full_to_swa=jnp.asarray(table), owners=tuple(owners), stacks=tuple(stacks),
        nfree=jnp.asarray([P - 1 for P in cfg.space_sizes], jnp.int32), cfg=cfg)


# ---------------------------------------------------------------------------------------------
# Internals


def _i32(x, name):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {x.shape}")
    return x.astype(jnp.int32)


def _dup_mask(cfg, slots, use):
    """bool[B]: rows whose slot appears more than once among the ``use`` rows."""
    R = cfg.max_requests
    idx = jnp.where(use, slots, R)
    cnt = jnp.zeros((R + 1,), jnp.int32).at[idx].add(1, mode="drop")
    return use & (cnt[jnp.clip(slots, 0, R)] > 1)


def _pop(stack, nfree, offs, counts, width):
    """Pages for each row: ``int32[B, width]`` (0 where ``j >= counts``) popped from the top."""
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    take = j < counts[:, None]
    idx = nfree - 1 - (offs[:, None] + j)
    pages = stack[jnp.where(take, idx, 0)]
    return jnp.where(take, pages, 0), take


def _push(stack, top, pages, mask):
    """Pushes ``pages[mask]`` (any shape) onto ``stack`` at ``top``; returns (stack, new top)."""
    p = pages.reshape(-1)
    m = mask.reshape(-1)
    rank = jnp.cumsum(m.astype(jnp.int32)) - 1
    P = stack.shape[0]
    stack = stack.at[jnp.where(m, top + rank, P)].set(p, mode="drop")
    return stack, top + jnp.sum(m, dtype=jnp.int32)


def _set_rows(arr, rows, cols, vals, mask):
    R = arr.shape[0]
    return arr.at[jnp.where(mask, rows, R), cols].set(vals, mode="drop")


def _full_loc(page_table, cfg, slots, pos):
    """Full locations of (slot, position) pairs (broadcast); -1 where pos < 0 or slot < 0."""
    ps = cfg.page_size
    ok = (pos >= 0) & (slots >= 0) & (pos < cfg.max_pages * ps)
    page = page_table[jnp.where(ok, slots, 0), jnp.where(ok, pos // ps, 0)]
    ok = ok & (page > 0)
    return jnp.where(ok, page * ps + pos % ps, -1)


def _swa_range(L, cfg):
    """Live logical SWA pages ``[lo, hi]`` of a request of length L (empty when hi < lo)."""
    W, sp = cfg.window, cfg.swa_page
    lo = jnp.maximum(L - W, 0) // sp
    hi = jnp.floor_divide(L - 1, sp)
    return lo, hi


def _grow(state: AllocState, slots, old_len, new_len, valid, pre_fit, pad, max_new: int,
          atomic: bool):
    """Grows each row's request from ``old_len`` to ``new_len`` tokens (the core of admit/extend).

    ``valid`` rows are well-formed; ``pre_fit`` rows passed earlier capacity checks (slots).
    Returns (new state, status int32[B], applied bool[B]).
    """
    cfg = state.cfg
    ps = cfg.page_size
    use = valid & pre_fit
    L = jnp.where(use, old_len, 0)
    L2 = jnp.where(use, new_len, 0)
    # Full pages.
    pf0 = _cdiv(L, ps)
    nf = _cdiv(L2, ps) - pf0
    KF = min(cfg.max_pages, _cdiv(max_new, ps))
    if cfg.has_swa:
        sp, W, K = cfg.swa_page, cfg.window, cfg.ring
        a0, b0 = _swa_range(L, cfg)
        a1, b1 = _swa_range(L2, cfg)
        new_lo = jnp.maximum(a1, b0 + 1)
        ns = jnp.where(L2 > 0, jnp.maximum(b1 - new_lo + 1, 0), 0)
        fr_hi = jnp.minimum(b0, a1 - 1)
        nfr = jnp.where(L > 0, jnp.maximum(fr_hi - a0 + 1, 0), 0)
        KS = min(K, _cdiv(max_new, sp))
    else:
        ns = jnp.zeros_like(nf)
    nf = jnp.where(use, nf, 0)
    ns = jnp.where(use, ns, 0)
    # Fit: prefix in batch order against the pages free before the call.  One cumsum gives
    # both the fit test and each row's offset into the free stack: fitting rows form a prefix
    # of the demanding rows, so their offsets equal the exclusive cumsum of all demands.
    # Shared space: row i pops its nf full pages, then its ns SWA pages.
    cum = jnp.cumsum(jnp.stack([nf, ns]), axis=1)
    if cfg.has_swa and cfg.shared:
        fit = cum[0] + cum[1] <= state.nfree[0]
        off_f = cum[0] + cum[1] - nf - ns
        off_s = off_f + nf
    elif cfg.has_swa:
        fit = (cum[0] <= state.nfree[0]) & (cum[1] <= state.nfree[1])
        off_f, off_s = cum[0] - nf, cum[1] - ns
    else:
        fit = cum[0] <= state.nfree[0]
        off_f = cum[0] - nf
    fit = fit & use
    status = jnp.where(pad, PAD, jnp.where(~valid, BAD, jnp.where(fit, OK, NO_SPACE)))
    # atomic may be traced: a failed row blocks the batch only when atomic.
    all_ok = jnp.all(pad | fit) | ~jnp.asarray(atomic, bool)
    apply = fit & all_ok
    status = jnp.where(fit & ~all_ok, SKIPPED, status)
    nf = jnp.where(apply, nf, 0)
    ns = jnp.where(apply, ns, 0)
    s = jnp.where(apply, slots, 0)
    tot = jnp.sum(jnp.stack([nf, ns]), axis=1, dtype=jnp.int32)

    owners, stacks, nfree = list(state.owners), list(state.stacks), state.nfree
    # Pop full pages.
    tot_f = tot[0]
    pages_f, take_f = _pop(stacks[0], nfree[0], off_f, nf, KF)
    jf = pf0[:, None] + jnp.arange(KF, dtype=jnp.int32)[None, :]
    page_table = _set_rows(state.page_table, s[:, None], jf, pages_f, take_f)
    # Owner updates are gathered per space and applied as one scatter each (fewer kernels);
    # their page sets are disjoint (a page freed here cannot have been popped here).
    own_upd = [[] for _ in owners]
    own_upd[0].append((pages_f, jnp.broadcast_to(s[:, None], take_f.shape), take_f))
    tops = [nfree[0] - tot_f] + ([nfree[1]] if len(owners) > 1 else [])
    swa_ring, table = state.swa_ring, state.full_to_swa
    if cfg.has_swa:
        si = cfg.swa_space
        # Pop SWA pages.
        pages_s, take_s = _pop(stacks[si], nfree[si], off_s, ns, KS)
        tops[si] = tops[si] - tot[1]
        # Free SWA pages that left the window.
        nfr = jnp.where(apply, nfr, 0)
        j = jnp.arange(KS, dtype=jnp.int32)[None, :]
        k_fr = a0[:, None] + j
        take_fr = j < nfr[:, None]
        ring_fr = k_fr % K
        pages_fr = jnp.where(take_fr, swa_ring[s[:, None], ring_fr], 0)
        own_upd[si].append((pages_fr, jnp.full_like(pages_fr, -1), take_fr))
        own_upd[si].append((pages_s, jnp.broadcast_to(s[:, None], take_s.shape), take_s))
        stacks[si], tops[si] = _push(stacks[si], tops[si], pages_fr, take_fr)
        # Ring: clear freed slots unless a new page lands in the same slot, set new pages.
        k_new = new_lo[:, None] + j
        over = jnp.mod(ring_fr - new_lo[:, None], K) < ns[:, None]
        swa_ring = _set_rows(swa_ring, jnp.concatenate([s[:, None]] * 2 * KS, 1),
                             jnp.concatenate([ring_fr, k_new % K], 1),
                             jnp.concatenate([jnp.zeros_like(pages_fr), pages_s], 1),
                             jnp.concatenate([take_fr & ~over, take_s], 1))
        # full_to_swa: tokens leaving the window -> 0, new in-window tokens -> their SWA loc
        # (disjoint positions: one scatter).
        KT = min(max_new, W)
        jt = jnp.arange(KT, dtype=jnp.int32)[None, :]
        T = cfg.table_size
        z_lo = jnp.maximum(L - W, 0)
        z_hi = jnp.minimum(L, L2 - W)
        pz = z_lo[:, None] + jt
        take_z = apply[:, None] & (pz < z_hi[:, None])
        fz = _full_loc(page_table, cfg, s[:, None], pz)  # old tokens: same pages in the new table
        s_lo = jnp.maximum(L, L2 - W)
        pn = s_lo[:, None] + jt
        take_n = apply[:, None] & (pn < L2[:, None])
        fn = _full_loc(page_table, cfg, s[:, None], pn)
        swp = swa_ring[s[:, None], jnp.where(take_n, (pn // sp) % K, 0)]
        idx = jnp.concatenate([jnp.where(take_z & (fz >= 0), fz, T),
                               jnp.where(take_n & (fn >= 0), fn, T)], 1)
        val = jnp.concatenate([jnp.zeros_like(fz), swp * sp + pn % sp], 1)
        table = table.at[idx].set(val, mode="drop")
    for i, upd in enumerate(own_upd):
        P = owners[i].shape[0]
        idx = jnp.concatenate([jnp.where(m, p, P).reshape(-1) for p, _, m in upd])
        val = jnp.concatenate([v.reshape(-1) for _, v, _ in upd])
        owners[i] = owners[i].at[idx].set(val, mode="drop")
    lengths = state.lengths.at[jnp.where(apply, slots, cfg.max_requests)].set(
        new_len, mode="drop")
    new = dataclasses.replace(state, page_table=page_table, swa_ring=swa_ring, lengths=lengths,
                              full_to_swa=table, owners=tuple(owners), stacks=tuple(stacks),
                              nfree=jnp.stack(tops).astype(jnp.int32))
    return new, status.astype(jnp.int32), apply


# ---------------------------------------------------------------------------------------------
# Transitions


@functools.partial(jax.jit, static_argnames=("max_len",))
def admit(state: AllocState, lengths: jax.Array, *, max_len: int | None = None,
          atomic: bool | jax.Array = True) -> tuple[AllocState, jax.Array, jax.Array]:
    """Admits new (or resumed) requests holding ``lengths`` tokens each.

    Each admitted row gets the first free request slot (in row order), ``ceil(len / page_size)``
    full pages and SWA pages for its window only (tail-only: the resume path of SPEC §6 — a
    retracted request comes back with its length and fresh, different pages).

    Args:
      state: allocator state.
      lengths: int32[B] tokens per new request (0 allowed); negative = padding row.
      max_len: static bound on ``lengths`` (default ``cfg.max_len``); rows above it are ``BAD``.
        Smaller bounds compile smaller scatters.
      atomic: on any failure leave the state unchanged (else apply the fitting rows); a bool or
        a traced bool scalar.

    Returns:
      ``(state, slots int32[B], status int32[B])``; ``slots`` is -1 where not applied.
    """
    cfg = state.cfg
    lengths = _i32(lengths, "lengths")
    bound = cfg.max_len if max_len is None else min(int(max_len), cfg.max_len)
    pad = lengths < 0
    want = ~pad
    valid = want & (lengths <= bound)
    free = state.lengths < 0
    B = lengths.shape[0]
    free_slots = jnp.nonzero(free, size=B, fill_value=-1)[0].astype(jnp.int32)
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    slots = jnp.where(valid, free_slots[jnp.clip(rank, 0, B - 1)], -1)
    pre_fit = slots >= 0
    new, status, applied = _grow(state, jnp.maximum(slots, 0), jnp.zeros_like(lengths), lengths,
                                 valid, pre_fit, pad, max(bound, 1), atomic)
    return new, jnp.where(applied, slots, -1), status


def resume(state: AllocState, lengths: jax.Array, *, max_len: int | None = None,
           atomic: bool | jax.Array = True) -> tuple[AllocState, jax.Array, jax.Array]:
    """The resume path of SPEC §6: ``admit`` with the retracted requests' lengths.

    Fresh slots and full pages for every token, SWA pages for the window tail only; translate
    the new locations with ``token_table`` / ``request_swa_locs`` and restore only the SWA rows
    valid in both the saved and the new mask (``new_mask[old_mask]``).  Same arguments and
    results as ``admit``.
    """
    return admit(state, lengths, max_len=max_len, atomic=atomic)


@functools.partial(jax.jit, static_argnames=("max_new",))
def extend(state: AllocState, slots: jax.Array, num_new: jax.Array, *, max_new: int = 1,
           atomic: bool | jax.Array = True) -> tuple[AllocState, jax.Array]:
    """Appends ``num_new[i]`` tokens to request ``slots[i]`` for every row at once.

    Allocates full pages as the sequence crosses page boundaries, SWA pages for the new window,
    frees SWA pages that left the window and updates ``full_to_swa``.

    Args:
      state: allocator state.
      slots: int32[B] request slots (live, distinct); negative = padding row.
      num_new: int32[B] tokens to append (``0 <= num_new <= max_new``).
      max_new: static bound on ``num_new`` (1 for a decode step; the scatters are sized by it).
      atomic: on any failure leave the state unchanged (else apply the fitting rows); a bool or
        a traced bool scalar.

    Returns:
      ``(state, status int32[B])``.
    """
    cfg = state.cfg
    slots = _i32(slots, "slots")
    num_new = _i32(num_new, "num_new")
    if slots.shape != num_new.shape:
        raise ValueError(f"slots {slots.shape} and num_new {num_new.shape} must match")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new must be a positive int, got {max_new!r}")
    R = cfg.max_requests
    pad = slots < 0
    in_range = (slots >= 0) & (slots < R)
    cur = state.lengths[jnp.clip(slots, 0, R - 1)]
    live = in_range & (cur >= 0)
    new_len = cur + num_new
    valid = (live & (num_new >= 0) & (num_new <= max_new) & (new_len <= cfg.max_len)
             & ~_dup_mask(cfg, slots, in_range))
    new, status, _ = _grow(state, jnp.clip(slots, 0, R - 1), cur, new_len, valid, valid, pad,
                           max_new, atomic)
    return new, status


@functools.partial(jax.jit, static_argnames=("check",))
def release(state: AllocState, slots: jax.Array, *, check: bool = True,
            atomic: bool | jax.Array = True) -> tuple[AllocState, jax.Array]:
    """Releases requests: frees their full and SWA pages, clears their ``full_to_swa`` entries.

    Double release (slot already free), an out-of-range slot or a slot twice in the batch is
    ``BAD``.  With ``check=True`` every page the request's tables name must be owned by it
    (``owners[page] == slot``), else ``BAD`` (detects corrupted or foreign tables); nothing is
    applied to a ``BAD`` row (nor to any row when ``atomic``).

    Args:
      state: allocator state.
      slots: int32[B] slots to release; negative = padding row.
      check: verify page ownership.
      atomic: on any failure leave the state unchanged.

    Returns:
      ``(state, status int32[B])``.
    """
    cfg = state.cfg
    slots = _i32(slots, "slots")
    R = cfg.max_requests
    pad = slots < 0
    in_range = (slots >= 0) & (slots < R)
    sc = jnp.clip(slots, 0, R - 1)
    L = state.lengths[sc]
    valid = in_range & (L >= 0) & ~_dup_mask(cfg, slots, in_range)
    ps = cfg.page_size
    np_ = _cdiv(jnp.maximum(L, 0), ps)
    cols = jnp.arange(cfg.max_pages, dtype=jnp.int32)[None, :]
    full_pages = state.page_table[sc]
    take_f = cols < np_[:, None]
    if cfg.has_swa:
        swa_pages = state.swa_ring[sc]
        take_s = swa_pages > 0
    if check:
        own = jnp.all(jnp.where(take_f, state.owners[0][full_pages] == sc[:, None], True), 1)
        own &= jnp.all(jnp.where(take_f, full_pages > 0, True), 1)
        if cfg.has_swa:
            own &= jnp.all(jnp.where(take_s, state.owners[cfg.swa_space][swa_pages]
                                     == sc[:, None], True), 1)
        valid &= own
    status = jnp.where(pad, PAD, jnp.where(valid, OK, BAD))
    all_ok = jnp.all(pad | valid) | ~jnp.asarray(atomic, bool)
    apply = valid & all_ok
    status = jnp.where(valid & ~all_ok, SKIPPED, status)
    owners, stacks = list(state.owners), list(state.stacks)
    tops = [state.nfree[i] for i in range(len(owners))]
    take_f = take_f & apply[:, None]
    P0 = owners[0].shape[0]
    owners[0] = owners[0].at[jnp.where(take_f, full_pages, P0)].set(-1, mode="drop")
    table = state.full_to_swa
    swa_ring = state.swa_ring
    if cfg.has_swa:
        si = cfg.swa_space
        take_s = take_s & apply[:, None]
        Ps = owners[si].shape[0]
        owners[si] = owners[si].at[jnp.where(take_s, swa_pages, Ps)].set(-1, mode="drop")
        # Window tokens' full_to_swa entries -> 0.
        W = cfg.window
        jt = jnp.arange(W, dtype=jnp.int32)[None, :]
        pz = jnp.maximum(L - W, 0)[:, None] + jt
        take_z = apply[:, None] & (pz < L[:, None])
        fz = _full_loc(state.page_table, cfg, sc[:, None], pz)
        T = cfg.table_size
        table = table.at[jnp.where(take_z & (fz >= 0), fz, T)].set(0, mode="drop")
        swa_ring = _set_rows(swa_ring, sc, slice(None), jnp.zeros((cfg.ring,), jnp.int32), apply)
    # Push: full pages first, then SWA pages (order is irrelevant to correctness).
    stacks[0], tops[0] = _push(stacks[0], tops[0], full_pages, take_f)
    if cfg.has_swa:
        stacks[si], tops[si] = _push(stacks[si], tops[si], swa_pages, take_s)
    page_table = _set_rows(state.page_table, sc, slice(None),
                           jnp.zeros((cfg.max_pages,), jnp.int32), apply)
    lengths = state.lengths.at[jnp.where(apply, sc, R)].set(-1, mode="drop")
    new = dataclasses.replace(state, page_table=page_table, swa_ring=swa_ring, lengths=lengths,
                              full_to_swa=table, owners=tuple(owners), stacks=tuple(stacks),
                              nfree=jnp.stack(tops).astype(jnp.int32))
    return new, status.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Queries and translations


def num_free(state: AllocState) -> jax.Array:
    """int32[S] free pages per page space (full[, swa])."""
    return state.nfree


def full_locs(state: AllocState, slots: jax.Array, positions: jax.Array) -> jax.Array:
    """Full locations of (slot, position) pairs.

    Args:
      slots: int32[...] request slots (broadcast against ``positions``).
      positions: int32[...] token positions.

    Returns:
      int32[...] full locations; -1 where the slot is free/out of range or the position is not
      held (``< 0`` or ``>= length``).
    """
    cfg = state.cfg
    slots, positions = jnp.broadcast_arrays(jnp.asarray(slots, jnp.int32),
                                            jnp.asarray(positions, jnp.int32))
    R = cfg.max_requests
    ok_s = (slots >= 0) & (slots < R)
    L = jnp.where(ok_s, state.lengths[jnp.clip(slots, 0, R - 1)], -1)
    ok = ok_s & (positions >= 0) & (positions < L)
    return jnp.where(ok, _full_loc(state.page_table, cfg, jnp.where(ok, slots, -1),
                                   jnp.where(ok, positions, -1)), -1)


def token_table(state: AllocState, slots: jax.Array, width: int) -> jax.Array:
    """The token tables (full locations of positions ``0 .. width-1``) of requests.

    Args:
      slots: int32[B] request slots.
      width: static number of positions.

    Returns:
      int32[B, width] full locations, -1 beyond each request's length.
    """
    slots = jnp.asarray(slots, jnp.int32)
    return full_locs(state, slots[:, None], jnp.arange(width, dtype=jnp.int32)[None, :])


def request_swa_locs(state: AllocState, slots: jax.Array,
                     width: int) -> tuple[jax.Array, jax.Array]:
    """SWA locations (and mask) of requests' tokens ``0 .. width-1`` (SPEC §6's saved mask).

    Returns:
      ``(swa int32[B, width], mask bool[B, width])``: valid exactly for the window tokens.
    """
    return _locs.swa_locs(state.full_to_swa, token_table(state, slots, width))


def translate(state: AllocState, slots: jax.Array, positions: jax.Array, *, csa_ratio: int = 4,
              hca_ratio: int = 128, c4_ring: int = 8, c128_ring: int = 128) -> Locs:
    """Every pool location of tokens ``(slots, positions)`` (broadcast; e.g. ``[B, T]``).

    Page-scoped state rows use the SWA loc with ``swa_page`` tokens per page (SGLang); the
    request-scoped C128 rows use the slot.  Invalid entries are -1 (the masks say which).
    """
    cfg = state.cfg
    slots, positions = jnp.broadcast_arrays(jnp.asarray(slots, jnp.int32),
                                            jnp.asarray(positions, jnp.int32))
    f = full_locs(state, slots, positions)
    if cfg.has_swa:
        s, sv = _locs.swa_locs(state.full_to_swa, f)
    else:
        s, sv = jnp.full_like(f, -1), jnp.zeros(f.shape, bool)
    c4, c4v = _locs.compressed_locs(f, csa_ratio)
    c128, c128v = _locs.compressed_locs(f, hca_ratio)
    return Locs(f, s, sv, c4, c4v, c128, c128v,
                _locs.state_rows(s, c4_ring, cfg.swa_page),
                _locs.state_rows(s, c128_ring, cfg.swa_page),
                _locs.request_state_rows(jnp.where(f >= 0, slots, -1), positions, c128_ring))


# ---------------------------------------------------------------------------------------------
# Host-side invariant check (tests, debugging)


def check_invariants(state: AllocState) -> None:
    """Raises AssertionError if the state is inconsistent (host-side numpy; not jittable).

    Checks: page 0 reserved; no page owned twice (tables vs owners); free + used = total; the free
    stack holds exactly the free pages; released slots own nothing; ``full_to_swa > 0`` exactly
    for each live request's window tokens, pointing into an SWA page its ring holds at the right
    offset; the last table entry is -1.
    """
    cfg = state.cfg
    pt = np.asarray(state.page_table)
    ring = np.asarray(state.swa_ring)
    lens = np.asarray(state.lengths)
    table = np.asarray(state.full_to_swa)
    owners = [np.asarray(o) for o in state.owners]
    stacks = [np.asarray(s) for s in state.stacks]
    nfree = np.asarray(state.nfree)
    ps = cfg.page_size
    assert table[-1] == -1, "full_to_swa last entry must be -1"
    expect = [np.full(o.shape, -1) for o in owners]
    for e in expect:
        e[0] = -2
    for o in owners:
        assert o[0] == -2, "page 0 must stay reserved"

    def claim(space, page, slot, what):
        assert page > 0, f"{what}: page 0 in a table"
        assert expect[space][page] == -1, f"{what}: page {page} owned twice"
        expect[space][page] = slot

    for r in range(cfg.max_requests):
        L = lens[r]
        if L < 0:
            assert not pt[r].any() and not ring[r].any(), f"released slot {r} owns pages"
            continue
        n = _cdiv(int(L), ps)
        assert not pt[r, n:].any(), f"slot {r}: table entries beyond its length"
        for k in range(n):
            claim(0, pt[r, k], r, f"slot {r} full page {k}")
        if cfg.has_swa:
            lo = max(L - cfg.window, 0) // cfg.swa_page
            hi = (L - 1) // cfg.swa_page
            live = {k % cfg.ring: k for k in range(lo, hi + 1)} if L > 0 else {}
            for j in range(cfg.ring):
                if j in live:
                    claim(cfg.swa_space, ring[r, j], r, f"slot {r} swa page {live[j]}")
                else:
                    assert ring[r, j] == 0, f"slot {r}: stale SWA ring entry {j}"
    for i, (o, e) in enumerate(zip(owners, expect)):
        assert (o == e).all(), f"space {i}: owners disagree with the tables"
        free = set(np.nonzero(o == -1)[0].tolist())
        assert len(free) == nfree[i], f"space {i}: nfree {nfree[i]} != free pages {len(free)}"
        st = stacks[i][:nfree[i]].tolist()
        assert sorted(st) == sorted(free), f"space {i}: free stack != free pages"
        used = int((o >= 0).sum())
        assert used + len(free) + 1 == o.shape[0], f"space {i}: free + used != total"
    if cfg.has_swa:
        expected = np.zeros_like(table)
        expected[-1] = -1
        for r in range(cfg.max_requests):
            L = lens[r]
            for p in range(max(L - cfg.window, 0), max(L, 0)):
                f = pt[r, p // ps] * ps + p % ps
                sp_page = ring[r, (p // cfg.swa_page) % cfg.ring]
                assert owners[cfg.swa_space][sp_page] == r, "SWA mapping outside request's pages"
                expected[f] = sp_page * cfg.swa_page + p % cfg.swa_page
        bad = np.nonzero(expected != table)[0]
        assert bad.size == 0, f"full_to_swa wrong at {bad[:8].tolist()}"
