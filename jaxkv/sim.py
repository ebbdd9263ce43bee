"""A DeepSeek-V4 decode-server simulation that exercises and verifies the whole library.

One ``run(config)`` drives a decode server over a layer-major (SGLang) cache:

* **admission / prefill handoff** — each request's prompt is written by a "prefill node" into a
  *packed* (vLLM) cache, then its full-attention pools (C4, C128, C4 indexer: the blocks that hold
  its whole history) move to the decode cache — through NIXL when ``transfer="nixl"`` and NIXL is
  installed, else by a device copy (``jaxkv.pages.copy_tokens``).  The prompt's SWA tail and
  compressor-state rows are written by the decode node itself (they are window-sized).
* **decode steps** — every running request appends one token: ``jaxkv.alloc.extend`` allocates
  (full pages, SWA pages, freeing out-of-window SWA pages), ``jaxkv.alloc.translate`` gives every
  pool's location, ``jaxkv.set_tokens`` writes every pool (SWA, C4, C128, indexer, three state
  pools), and ``jaxkv.attention.sparse_decode`` computes the reference sparse attention of two
  layers (a C4 layer through the indexer's top-k, a C128 layer) for the new position.
* **memory pressure** — pools are sized so the batch does not fit: when a request cannot grow, the
  most recently admitted request is *retracted* (``jaxkv.offload.retract``: its whole cache to
  pinned host memory, pages released) and *resumed* later into different pages.
* **DCP** (``dcp > 1``) — the same writes also go to a DCP-sharded cache (``jaxkv.dcp``) and the
  attention is computed across devices with the LSE merge.

Token data are a pure function of (request, position, pool), so two runs with different memory
pressure must produce *bit-identical* attention outputs; ``verify`` compares them.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import alloc as A
from jaxkv import attention, offload, pages
from jaxkv import formats as F
from jaxkv import geometry as G
from jaxkv.cache import Cache, init_cache, set_tokens
from jaxkv.layout import layer_major, packed


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """What to simulate.

    Attributes:
      geo: the geometry (real token formats; ``tiny`` on CPU, DSv4-Flash on a GPU).
      requests: requests to serve.
      prompt: (min, max) prompt length.
      decode: tokens each request decodes.
      max_running: most requests decoding at once (the decode batch).
      full_pages / swa_pages: decode-cache pages per layer (page 0 reserved).  Sized small, they
        force retracts; ``None`` = enough for every request at once (no retracts).
      heads: query heads of the reference attention.
      topk: indexer top-k.
      dcp: DCP size (1 = off).
      transfer: prefill handoff path: ``"copy"`` or ``"nixl"``.
      seed: data seed.
    """

    geo: G.Geometry
    requests: int = 8
    prompt: tuple[int, int] = (24, 72)
    decode: int = 24
    max_running: int = 6
    full_pages: int | None = 14
    swa_pages: int | None = 8
    heads: int = 4
    topk: int = 8
    dcp: int = 1
    transfer: str = "copy"
    seed: int = 0

    @property
    def max_len(self) -> int:
        return self.prompt[1] + self.decode


def cpu_preset(**kw) -> SimConfig:
    """Finishes in well under a minute on a 2-core CPU."""
    return SimConfig(geo=G.tiny(5, page_size=32, csa_ratio=4, hca_ratio=16, swa_window=16), **kw)


def gpu_preset(**kw) -> SimConfig:
    """DeepSeek-V4-Flash geometry, sized for an H100."""
    base = dict(requests=64, prompt=(512, 2048), decode=64, max_running=48, full_pages=160,
                swa_pages=80, heads=16, topk=512)
    base.update(kw)
    return SimConfig(geo=G.dsv4_flash(), **base)


@dataclasses.dataclass
class Stats:
    """What a run did and measured."""

    steps: int = 0
    tokens: int = 0
    retracts: int = 0
    resumes: int = 0
    bytes: dict = dataclasses.field(default_factory=dict)   # path -> bytes moved
    seconds: dict = dataclasses.field(default_factory=dict)  # path -> seconds
    warm: dict = dataclasses.field(default_factory=dict)     # path -> [bytes, seconds] after
    #                                                          the first (compiling) call
    occupancy: list = dataclasses.field(default_factory=list)  # (step, full used, swa used)
    events: list = dataclasses.field(default_factory=list)     # (step, "retract"|"resume", rid)
    checks: list = dataclasses.field(default_factory=list)     # (name, ok, detail)

    def add(self, path: str, nbytes: int, seconds: float) -> None:
        if path in self.bytes:
            w = self.warm.setdefault(path, [0, 0.0])
            w[0] += int(nbytes)
            w[1] += seconds
        self.bytes[path] = self.bytes.get(path, 0) + int(nbytes)
        self.seconds[path] = self.seconds.get(path, 0.0) + seconds

    def rate(self, path: str) -> float | None:
        """GB/s of the calls after the first one (which compiles); None if there were none."""
        w = self.warm.get(path)
        return w[0] / w[1] / 1e9 if w and w[1] > 0 else None


# ---------------------------------------------------------------------------------------------
# Data: a pure function of (request, position, pool)

_POOL_IDS = {"swa": 1, "c4": 2, "c128": 3, "c4_indexer": 4, "c4_state": 5,
             "c4_indexer_state": 6, "c128_state": 7, "q": 8, "index_q": 9, "index_w": 10}


def _rows(seed, rids, positions, pool: str, n_layers: int, width: int) -> jax.Array:
    """f32[n_layers, B, width] random rows keyed by (request, position, pool)."""
    def one(rid, pos):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), rid), pos)
        return jax.random.normal(jax.random.fold_in(k, _POOL_IDS[pool]), (n_layers, width),
                                 jnp.float32) * 2.0
    return jnp.swapaxes(jax.vmap(one)(rids, positions), 0, 1)


def _write_tokens(cache: Cache, seed, rids, positions, lc: A.Locs, pools,
                  skip=None) -> Cache:
    """Writes every listed pool's data for tokens (rids, positions) at locations ``lc``.

    ``skip`` (a traced bool scalar) turns off the writes of ``HANDOFF_POOLS``.
    """
    geo = cache.geometry
    where = {"swa": (lc.swa, lc.swa_valid), "c4": (lc.c4, lc.c4_valid),
             "c4_indexer": (lc.c4, lc.c4_valid), "c128": (lc.c128, lc.c128_valid),
             "c4_state": (lc.c4_state, lc.swa_valid), "c4_indexer_state": (lc.c4_state,
                                                                           lc.swa_valid),
             "c128_state": (lc.c128_state, lc.swa_valid)}
    for name in pools:
        p = cache.layout.pool(name)
        locs, ok = where[name]
        ok = ok & (positions >= 0)
        if skip is not None and name in HANDOFF_POOLS:
            ok = ok & ~skip
        locs = jnp.where(ok, locs, -1)
        x = _rows(seed, rids, positions, name, p.spec.num_layers, p.spec.fmt.width)
        tokens = F.quantize(p.spec.fmt, x)
        cache = set_tokens(cache, name, None, locs, tokens)
    return cache


TOKEN_POOLS = ("swa", "c4", "c128", "c4_indexer")
STATE_POOLS = ("c4_state", "c4_indexer_state", "c128_state")
HANDOFF_POOLS = ("c4", "c128", "c4_indexer")  # the full-attention group: whole history


def _ratios(geo: G.Geometry) -> dict:
    return dict(csa_ratio=geo.csa_ratio, hca_ratio=geo.hca_ratio, c4_ring=geo.c4_ring,
                c128_ring=geo.c128_ring)


# The compiled pieces live at module level with the configuration as static arguments, so runs
# of the same shapes (the reference run, the demo's test) share their compilations.

@functools.partial(jax.jit, static_argnames=("seed", "pools"), donate_argnums=0)
def _write(cache, state, rids, slots, positions, skip, *, seed, pools):
    """Writes the data of tokens (rids, positions) of request slots into every listed pool
    (``skip``: a bool scalar that turns off the ``HANDOFF_POOLS`` writes)."""
    lc = A.translate(state, slots, positions, **_ratios(cache.geometry))
    return _write_tokens(cache, seed, rids, positions, lc, pools, skip)


@functools.partial(jax.jit, donate_argnums=1)
def _handoff(p_cache, cache, p_alloc, alloc, p_slots, slots, pos):
    """Moves a prompt's full-attention group (C4, C128, C4 indexer) from the prefill node's
    packed cache into the decode cache's newly allocated pages."""
    ratios = _ratios(cache.geometry)
    src = A.translate(p_alloc, p_slots, pos, **ratios)
    dst = A.translate(alloc, slots, pos, **ratios)
    for name in HANDOFF_POOLS:
        c128 = name == "c128"
        sv = src.c128_valid if c128 else src.c4_valid
        sl = jnp.where(sv, src.c128 if c128 else src.c4, -1)
        dl = jnp.where(sv, dst.c128 if c128 else dst.c4, -1)
        cache = pages.copy_tokens(p_cache, cache, name, sl, dl)
    counts = jnp.stack([jnp.sum(src.c4_valid), jnp.sum(src.c128_valid)])
    return cache, counts


@functools.partial(jax.jit, static_argnames=("seed", "heads", "geo"))
def _queries_jit(seed, rid, pos, heads, geo):
    return _queries(seed, rid, pos, heads, geo)


def _queries(seed, rid, pos, heads, geo):
    """[1, h, W] queries, [1, Hi, Di] indexer queries and [1, Hi] indexer weights of a token."""
    rid, pos = jnp.asarray(rid, jnp.int32), jnp.asarray(pos, jnp.int32)
    q = jnp.swapaxes(_rows(seed, rid[None], pos[None], "q", heads, geo.mla.width), 0, 1)
    iq = jnp.swapaxes(_rows(seed, rid[None], pos[None], "index_q", geo.indexer_heads,
                            geo.indexer_dim), 0, 1)
    iw = _rows(seed, rid[None], pos[None], "index_w", 1, geo.indexer_heads)[0]
    return q, iq, iw


@functools.partial(jax.jit, static_argnames=("seed", "heads", "topk", "layers"))
def _attend(cache, state, rid, slot, pos, *, seed, heads, topk, layers):
    """Reference sparse attention of request ``slot`` at position ``pos`` for ``layers``."""
    geo = cache.geometry
    P, ps = state.cfg.max_pages, state.cfg.page_size
    bt = state.page_table[slot][None]
    bt = jnp.where(bt > 0, bt, -1)
    lc = A.translate(state, slot, jnp.arange(P * ps, dtype=jnp.int32), **_ratios(geo))
    swa_page = jnp.where(lc.swa_valid, lc.swa // state.cfg.swa_page, -1)
    sbt = jnp.max(swa_page.reshape(P, ps), axis=1)[None]
    q, iq, iw = _queries(seed, rid, pos, heads, geo)
    outs = []
    for layer in layers:
        o, lse = attention.sparse_decode(q, cache, layer, seq_lens=(pos + 1)[None],
                                         block_table=bt, swa_block_table=sbt, index_q=iq,
                                         index_w=iw, topk=topk)
        outs.append((o[0], lse[0]))
    return outs


# ---------------------------------------------------------------------------------------------
# The server


class Server:
    """The decode server of one run (see the module docstring)."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        geo = cfg.geo
        if not geo.is_dsv4:
            raise ValueError("the simulation serves a DSv4 geometry")
        self.full_pages, self.swa_pages = pool_pages(cfg)
        ring_rows = lambda ring: self.swa_pages * ring + 1  # page-scoped state + sentinel
        self.layout = layer_major(geo, {
            "swa": self.swa_pages, "c4": self.full_pages, "c128": self.full_pages,
            "c4_indexer": self.full_pages, "c4_state": ring_rows(geo.c4_ring),
            "c4_indexer_state": ring_rows(geo.c4_ring),
            "c128_state": ring_rows(geo.c128_ring)})
        self.cache = init_cache(geo, self.layout)
        self.alloc = A.init_state(A.config_from_layout(self.layout, cfg.max_running + 1,
                                                       cfg.max_len))
        # The prefill node: a packed cache with room for one prompt at a time.
        blocks = 2 * (-(-cfg.prompt[1] // geo.page_size)) + 2
        self.p_layout = packed(geo, blocks)
        self.p_cache = init_cache(geo, self.p_layout)
        self.p_alloc = A.init_state(A.config_from_layout(self.p_layout, 1, cfg.prompt[1]))
        self.stats = Stats()
        self.outputs: dict = {}
        self.attn_layers = (geo.c4_layers[0], geo.c128_layers[0])

    def used(self):
        free = np.asarray(A.num_free(self.alloc))
        return int(self.full_pages - 1 - free[0]), int(self.swa_pages - 1 - free[1])

    # -- admission with the prefill handoff ---------------------------------------------------
    def admit(self, rid: int, length: int) -> int:
        """Prefill ``rid`` (prompt of ``length``) and hand it to the decode cache; -1 if no room."""
        cfg = self.cfg
        new, slots, status = A.admit(self.alloc, np.asarray([length], np.int32))
        if int(np.asarray(status)[0]) != A.OK:
            return -1
        slot = int(np.asarray(slots)[0])
        B = cfg.max_running
        T = -(-cfg.prompt[1] // B) * B  # whole chunks of the decode batch: one compiled write
        pos = np.where(np.arange(T) < length, np.arange(T), -1).astype(np.int32)
        rids = np.full(T, rid, np.int32)
        p_alloc, p_slots, p_status = A.admit(self.p_alloc, np.asarray([length], np.int32))
        assert int(np.asarray(p_status)[0]) == A.OK, "the prefill cache holds one prompt"
        p_slot = np.full(T, int(np.asarray(p_slots)[0]), np.int32)
        d_slot = np.full(T, slot, np.int32)
        # 1. the prefill node writes the prompt into its packed cache
        for c in range(0, T, B):
            self.p_cache = _write(self.p_cache, p_alloc, rids[c:c + B], p_slot[c:c + B],
                                  pos[c:c + B], np.bool_(False), seed=cfg.seed,
                                  pools=HANDOFF_POOLS)
        # 2. handoff of the full-attention group into the decode cache's new pages
        jax.block_until_ready(self.p_cache.buffers)
        t0 = time.perf_counter()
        self.cache, counts = _handoff(self.p_cache, self.cache, p_alloc, new, p_slot, d_slot,
                                      pos)
        counts = np.asarray(counts)  # waits for the handoff
        moved = 0
        for name in HANDOFF_POOLS:
            p = self.layout.pool(name)
            moved += int(counts[1 if name == "c128" else 0]) * p.spec.fmt.token_bytes * \
                p.spec.num_layers
        self.stats.add("prefill handoff (device copy)", moved, time.perf_counter() - t0)
        self.p_alloc, _ = A.release(p_alloc, p_slots)
        # 3. the decode node writes the prompt's SWA tail and compressor states (the same
        #    compiled write as a decode step, with the handed-off pools skipped)
        for c in range(0, T, B):
            self.cache = _write(self.cache, new, rids[c:c + B], d_slot[c:c + B], pos[c:c + B],
                                np.bool_(True), seed=cfg.seed, pools=TOKEN_POOLS + STATE_POOLS)
        self.alloc = new
        return slot

    # -- retract / resume -------------------------------------------------------------------
    def retract(self, rid: int, slot: int):
        t0 = time.perf_counter()
        copy, self.alloc = offload.retract(self.cache, self.alloc, slot)
        self.stats.add("retract save (D2H)", copy.nbytes, time.perf_counter() - t0)
        self.stats.retracts += 1
        self.stats.events.append((self.stats.steps, "retract", rid))
        return copy

    def resume(self, rid: int, copy) -> int:
        t0 = time.perf_counter()
        nbytes = copy.nbytes
        cache, state, slot = offload.resume(self.cache, self.alloc, copy)
        if slot < 0:
            return -1
        jax.block_until_ready(cache.buffers)
        self.stats.add("resume load (H2D)", nbytes, time.perf_counter() - t0)
        self.cache, self.alloc = cache, state
        self.stats.resumes += 1
        self.stats.events.append((self.stats.steps, "resume", rid))
        return slot

    # -- one decode step --------------------------------------------------------------------
    def step(self, running: "OrderedDict[int, list]") -> list[int]:
        """Extends every running request by one token; returns the rids that could not grow."""
        B = self.cfg.max_running
        rids = list(running)
        slots = np.full(B, -1, np.int32)
        slots[:len(rids)] = [running[r][0] for r in rids]
        new, status = A.extend(self.alloc, jnp.asarray(slots), jnp.asarray(
            (slots >= 0).astype(np.int32)), atomic=False)
        status = np.asarray(status)
        self.alloc = new
        grown = [(i, r) for i, r in enumerate(rids) if status[i] == A.OK]
        stuck = [r for i, r in enumerate(rids) if status[i] == A.NO_SPACE]
        bad = [r for i, r in enumerate(rids) if status[i] not in (A.OK, A.NO_SPACE)]
        if bad:
            raise RuntimeError(f"allocator rejected requests {bad} (status {status})")
        lens = np.asarray(self.alloc.lengths)
        pos = np.full(B, -1, np.int32)
        rid_arr = np.zeros(B, np.int32)
        for i, r in grown:
            pos[i] = lens[slots[i]] - 1
            rid_arr[i] = r
        wslots = np.where(pos >= 0, slots, -1).astype(np.int32)
        self.cache = _write(self.cache, self.alloc, rid_arr, wslots, pos, np.bool_(False),
                            seed=self.cfg.seed, pools=TOKEN_POOLS + STATE_POOLS)
        for i, r in grown:
            outs = _attend(self.cache, self.alloc, np.int32(r), np.int32(slots[i]),
                           np.int32(pos[i]), seed=self.cfg.seed, heads=self.cfg.heads,
                           topk=self.cfg.topk, layers=self.attn_layers)
            self.outputs[(r, int(pos[i]))] = [(np.asarray(o), np.asarray(l)) for o, l in outs]
            running[r][1] -= 1
            self.stats.tokens += 1
        return stuck


def pages_per_request(cfg: SimConfig) -> tuple[int, int]:
    """Most (full, SWA) pages one request holds."""
    ps = cfg.geo.page_size
    return -(-cfg.max_len // ps), (cfg.geo.swa_window - 1) // ps + 2


def pool_pages(cfg: SimConfig) -> tuple[int, int]:
    """Decode-cache (full, SWA) pages per layer, page 0 included."""
    per_full, per_swa = pages_per_request(cfg)
    full = cfg.full_pages or cfg.max_running * per_full + 1
    swa = cfg.swa_pages or cfg.max_running * per_swa + 1
    if full - 1 < per_full or swa - 1 < per_swa:
        raise ValueError(f"full_pages={full} / swa_pages={swa} cannot hold one request "
                         f"({per_full} full + {per_swa} SWA pages, page 0 reserved)")
    return full, swa


def run(cfg: SimConfig, *, reference: bool = False, progress=None) -> tuple[Stats, dict]:
    """Serves every request of ``cfg``; returns (stats, outputs {(rid, pos): [(out, lse)]}).

    With ``reference=True`` the same server (same pools, same compiled steps) admits only as
    many requests at once as fit without ever running out of memory: no retracts, the baseline
    the constrained run must match bit for bit.
    """
    rng = np.random.default_rng(cfg.seed)
    prompts = rng.integers(cfg.prompt[0], cfg.prompt[1] + 1, cfg.requests)
    srv = Server(cfg)
    concurrency = cfg.max_running
    if reference:
        per_full, per_swa = pages_per_request(cfg)
        concurrency = min(concurrency, (srv.full_pages - 1) // per_full,
                          (srv.swa_pages - 1) // per_swa)
    waiting = list(range(cfg.requests))
    running: OrderedDict[int, list] = OrderedDict()  # rid -> [slot, decode tokens left]
    retracted: OrderedDict[int, tuple] = OrderedDict()  # rid -> (host copy, tokens left)
    last_retract = -10
    limit = cfg.requests * (cfg.decode + 4) * 4
    while waiting or running or retracted:
        st = srv.stats
        if st.steps > limit:
            raise RuntimeError("simulation made no progress (pools too small for one request?)")
        # Resume first (oldest retracted), once memory has been calm for two steps.
        if retracted and st.steps - last_retract > 2 and len(running) < cfg.max_running:
            rid, (copy, left) = next(iter(retracted.items()))
            slot = srv.resume(rid, copy)
            if slot >= 0:
                del retracted[rid]
                running[rid] = [slot, left]
        # Admit new requests while there is room.
        while waiting and not retracted and len(running) < concurrency:
            slot = srv.admit(waiting[0], int(prompts[waiting[0]]))
            if slot < 0:
                break
            running[waiting.pop(0)] = [slot, cfg.decode]
        if not running:
            if retracted and st.steps - last_retract <= 2:
                st.steps += 1
                continue
            if not waiting and not retracted:
                break
            raise RuntimeError("nothing runs and nothing can be admitted: pools too small")
        stuck = srv.step(running)
        if stuck and reference:
            raise RuntimeError(f"the reference run ran out of memory ({stuck})")
        if stuck:
            victim = next(reversed(running))  # most recently admitted
            slot, left = running.pop(victim)
            retracted[victim] = (srv.retract(victim, slot), left)
            last_retract = st.steps
        for rid in [r for r, (s, left) in running.items() if left <= 0]:
            slot, _ = running.pop(rid)
            srv.alloc, _ = A.release(srv.alloc, jnp.asarray([slot], jnp.int32))
        st.occupancy.append((st.steps, *srv.used()))
        st.steps += 1
        if progress:
            progress(len(srv.outputs), cfg.requests * cfg.decode)
    A.check_invariants(srv.alloc)
    return srv.stats, srv.outputs


def compare(a: dict, b: dict, *, exact: bool = True, rtol: float = 1e-5) -> tuple[bool, str]:
    """Compares two runs' attention outputs (same keys; bit-exact or within ``rtol``)."""
    if set(a) != set(b):
        return False, f"different (request, position) sets: {len(a)} vs {len(b)}"
    worst = 0.0
    for k in a:
        for (oa, la), (ob, lb) in zip(a[k], b[k]):
            if exact:
                if not (np.array_equal(oa, ob) and np.array_equal(la, lb)):
                    return False, f"outputs differ at request {k[0]}, position {k[1]}"
            else:
                scale = np.maximum(np.abs(ob), 1e-6)
                worst = max(worst, float(np.max(np.abs(oa - ob) / np.maximum(scale, 1.0))),
                            float(np.max(np.abs(la - lb) / np.maximum(np.abs(lb), 1.0))))
    if not exact and worst > rtol:
        return False, f"max relative error {worst:.2e} > {rtol:.0e}"
    return True, (f"{len(a)} outputs x {len(next(iter(a.values())))} layers "
                  + ("bit-identical" if exact else f"within {worst:.1e}"))


def plot(stats: Stats, cfg: SimConfig, path: str, full_pages: int, swa_pages: int) -> None:
    """Pool occupancy over the steps, retract/resume events marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    occ = np.asarray(stats.occupancy)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(occ[:, 0], occ[:, 1] / (full_pages - 1), label="full pages (C4/C128/indexer)")
    ax.plot(occ[:, 0], occ[:, 2] / (swa_pages - 1), label="SWA pages")
    for step, kind, rid in stats.events:
        ax.axvline(step, color="tab:red" if kind == "retract" else "tab:green", alpha=0.5,
                   linestyle="--" if kind == "retract" else ":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decode step")
    ax.set_ylabel("occupancy")
    ax.set_title(f"{cfg.geo.name}: {cfg.requests} requests — red: retract, green: resume")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# DCP: the same requests on a cache sharded over N devices


def run_dcp(cfg: SimConfig, n: int, *, interleave: int | str = 1, progress=None,
            devices=None) -> dict:
    """Serves the requests of ``cfg`` on a DCP cache over ``n`` devices; returns the outputs.

    Every request's tokens (the same data as ``run``) are written through
    ``jaxkv.dcp.set_tokens_dcp`` — each rank keeps the tokens it owns — and each decode position's
    attention is computed with ``jaxkv.dcp.decode`` (Q all-gather, local attention, LSE merge,
    reduce-scatter).  Requests get fixed virtual blocks (no memory pressure: this run checks the
    sharded math, ``run`` checks retracts); compress-state pools, replicated under DCP and not
    read by attention, are not written.
    """
    from jaxkv import dcp as D
    geo = cfg.geo
    if cfg.heads % n:
        raise ValueError(f"heads ({cfg.heads}) must be a multiple of the DCP size {n}")
    mesh = D.make_mesh(n, devices=devices)
    ps = geo.page_size
    per_req = -(-cfg.max_len // (ps * n))  # virtual blocks of ps * n positions
    pages = {p.name: cfg.requests * per_req + 1 for p in geo.pools() if p.kind == "token"}
    for p in geo.pools():
        if p.kind == "state":
            pages[p.name] = 2
    dc = D.init_dcp_cache(geo, pages, mesh, interleave=interleave)
    rng = np.random.default_rng(cfg.seed)
    prompts = rng.integers(cfg.prompt[0], cfg.prompt[1] + 1, cfg.requests)
    T = cfg.max_len
    layers = (geo.c4_layers[0], geo.c128_layers[0])
    outputs = {}
    total = cfg.requests * cfg.decode
    for rid in range(cfg.requests):
        length = int(prompts[rid]) + cfg.decode
        bt = (1 + rid * per_req + np.arange(per_req, dtype=np.int32))[None]
        pos = np.where(np.arange(T) < length, np.arange(T), -1).astype(np.int32)
        rids = np.full(T, rid, np.int32)
        for name in TOKEN_POOLS:
            spec = dc.layout.pool(name).spec
            r = spec.ratio
            pp = np.where((pos >= 0) & ((pos + 1) % r == 0), pos // r, -1) if r > 1 else pos
            locs = np.asarray(D.global_locs(dc, name, pp[None], bt))[0]
            x = _rows(cfg.seed, rids, pos, name, spec.num_layers, spec.fmt.width)
            dc = D.set_tokens_dcp(dc, name, None, locs, F.quantize(spec.fmt, x))
        for p in range(int(prompts[rid]), length):
            q, iq, iw = _queries_jit(cfg.seed, np.int32(rid), np.int32(p), cfg.heads, geo)
            outs = []
            for layer in layers:
                o, lse = D.decode(dc, q, layer, seq_lens=np.asarray([p + 1], np.int32),
                                  block_table=bt, swa_block_table=bt, index_q=iq, index_w=iw,
                                  topk=cfg.topk)
                outs.append((np.asarray(o)[0], np.asarray(lse)[0]))
            outputs[(rid, p)] = outs
            if progress:
                progress(len(outputs), total)
    return outputs
