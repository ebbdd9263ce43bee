"""Retract -> resume offload throughput (``jaxkv.offload``), DSv4-Flash geometry.

Run::

    python -m benchmarks.offload --out DIR            # GPU: >= 4 GB of request cache
    python -m benchmarks.offload --quick --out DIR    # CPU smoke run (small sizes)

What is measured, all in one run (GB/s of *useful* bytes: the request's tokens and state rows,
every layer, without the size-bucket padding the copy also carries):

* ceilings: one pinned-host copy of the same number of bytes, device -> ``pinned_host`` and back
  (``jax.device_put`` between memory kinds);
* the seed's path (SGLang PR #24675's ``get_cpu_copy`` / ``load_cpu_copy``): per-pool gather, then a
  pageable host copy (``np.asarray`` / ``jax.device_put`` of a NumPy array), pool after pool;
* ours, request level: ``start_save_batch`` (one translation for the batch, then every request's
  gather + transfer queued back to back: the transfer of request i overlaps the gather of request
  i+1), then ``wait``; ``load_batch`` with donated buffers;
* ours, location level (``start_save_locs`` / ``load_locs`` with precomputed locations), which
  isolates the host-side translation cost of the request level.

Target (issue 5), H100: save and load >= 0.90 of the pinned copy and >= 4x the seed's path.

Device memory: the run sizes itself to the device (``memory_stats()['bytes_limit']``): the
number of requests is cut until twice the cache (cache + a batch-sized ceiling array) plus 4 GiB
of headroom fit in 60% of the limit, and every measurement moves the batch as many rounds as
needed for >= 4 GB.  The library bounds the rest: a batch save / load keeps at most
``jaxkv.offload.MAX_INFLIGHT_BYTES`` (1 GiB) of staging in flight, and each request's gather
program is checked (XLA memory analysis, before it runs) to need at most about twice its staging.
DSv4-Flash, 16 x 65,536 tokens: cache 4.7 GB, ceiling array 4.3 GB, staging in flight <= 1.1 GB
(+ ~0.3 GB gather temporaries): ~11 GB peak.

Prediction (before any GPU run): the gather / scatter of a request (~267 MB at ~600-900 GB/s on
the device, ~0.4 ms) is small against its PCIe transfer (~5 ms at ~52-55 GB/s), and with the
batch queued back to back the device work of request i+1 overlaps the transfer of request i, so
save and load should reach ~0.95 of the pinned copies; the seed's path is bound by pageable copies
(~10.7 GB/s measured with torch, SPEC §10), so the ratio should be ~4.5-5x.  The risks: host-side
work per request (numpy translation/validation, a few ms on a slow host) if it is not hidden
behind the transfers — the location-level rows (translations precomputed) isolate it — and
whether ``device_put`` to ``pinned_host`` runs on its own stream (``transfer='jit'`` is the
alternative).  CPU ``--quick`` numbers mean nothing (there "host" and "device" are one memory).

H100 run 1 gave request level 18.7 (save) / 25.6 (load) GB/s against 50.2 / 43.2 at location
level: a device->host fetch of each request's translation sat inside the per-request loop (so no
planning overlapped a transfer), and loads drained the pipeline every 1 GiB.  Both removed (one
fetch per batch; a sliding window of in-flight copies, also used by the location-level load loop
below).  Prediction for the rerun: request-level save ~46-50 GB/s, load ~44-48 GB/s; location
level load ~46-49 (benchmarks/NOTES.md, "Offload").

Run 2 gave 0.845 / 0.768 (request level), 0.954 / 0.860 (location level).  Run 3: the plan is
computed and compacted on the device (one program per batch, one small fetch); extra rows make the
run explain itself: *planning alone* (the batch's planning program + its one fetch, nothing
moved), *transfer only* (the batch's per-request copies back to back, no planning / gather /
scatter), *batch - transfer only* (ms per batch not hidden behind PCIe), and the location-level
load with its index arrays uploaded beforehand (isolates the per-request pageable upload).
Predictions in benchmarks/NOTES.md, "Offload", run 3.

Run 3 gave save 0.947, load 0.869: the load spent ~0.6 ms per request outside its copy.  Cause
(read in PJRT's GPU client): a copy into a new device array waits for the work already queued on
the compute stream (device memory is allocated in compute-stream order), so copy i+1, queued after
scatter i, waited for it: copies and scatters serialised.  ``load_batch`` now queues each copy one
request ahead of the previous scatter and the first window's copies before the planning program.
Run-4 rows: the run-3 order (A/B, same run), copies ahead without the early copies, the scatter
alone per request (staging already on the device), and the scatter compile count of the timed
loads.  Predictions in benchmarks/NOTES.md, "Offload", run 4.
"""
from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv import alloc as A
from jaxkv import offload as O
from jaxkv.cache import token_addressing
from jaxkv.kernels import dispatch

from benchmarks import common



def make_layout(num_requests: int, tokens: int):
    """The DSv4-Flash layer-major layout sized for ``num_requests`` requests of ``tokens``."""
    geo = jaxkv.dsv4_flash()
    ps = geo.page_size
    nfull = num_requests * math.ceil(tokens / ps) + 2
    nswa = num_requests * 2 + 2  # a request holds at most 2 SWA pages (window 128, page 256)
    pages = {"swa": nswa, "c4": nfull, "c128": nfull, "c4_indexer": nfull,
             "c4_state": nswa * geo.c4_ring + 1, "c4_indexer_state": nswa * geo.c4_ring + 1,
             "c128_state": max(nswa, num_requests) * geo.c128_ring + 1}
    return jaxkv.layer_major(geo, pages)


def layout_bytes(layout) -> int:
    return sum(math.prod(s) for s in layout.buffer_shapes)


def _random_u8(key, shape):
    """uint8 random bytes without a 4x uint32 temporary per byte: 32-bit words, bitcast."""
    rows, cols = shape
    words = jax.random.bits(key, (rows, -(-cols // 4)), jnp.uint32)
    out = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(rows, -1)
    return out if out.shape[1] == cols else out[:, :cols]


_random_u8 = jax.jit(_random_u8, static_argnums=1)

# Device bytes the run needs besides the cache and one batch-sized ceiling array: the saves' and
# loads' staging in flight (jaxkv.offload.MAX_INFLIGHT_BYTES each way), the gather temporaries of
# one request, the seed path's per-pool windows and allocator state; generous.
HEADROOM = 4 << 30
MIN_TOTAL_BYTES = 4e9  # issue 5: >= 4 GB moved per measurement (several rounds if needed)


def device_bytes_limit(dev) -> int | None:
    """The device's allocatable bytes (``memory_stats()['bytes_limit']``), None when unknown."""
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        return None
    lim = stats.get("bytes_limit")
    return int(lim) if lim else None


def fit_requests(want: int, tokens: int, limit: int | None, fraction: float = 0.6) -> int:
    """Most requests (<= want, >= 1) whose cache, a batch-sized ceiling array (bounded by the
    cache size) and HEADROOM fit in ``fraction`` of the device's ``limit`` bytes."""
    if limit is None:
        return want
    r = want
    while r > 1 and 2 * layout_bytes(make_layout(r, tokens)) + HEADROOM > fraction * limit:
        r -= 1
    return r


def build(num_requests: int, tokens: int, seed: int = 0):
    """A DSv4-Flash layer-major cache holding ``num_requests`` requests of ``tokens`` tokens,
    every byte random, and the allocator state that owns them."""
    layout = make_layout(num_requests, tokens)
    key = jax.random.key(seed)
    bufs = []
    for i, shape in enumerate(layout.buffer_shapes):
        bufs.append(_random_u8(jax.random.fold_in(key, i), tuple(shape)))
    cache = jaxkv.Cache(tuple(bufs), layout)
    state = A.init_state(A.config_from_layout(layout, num_requests + 1, tokens))
    state, slots, status = A.admit(state, jnp.full((num_requests,), tokens, jnp.int32))
    assert bool(jnp.all(status == A.OK)), "allocator could not admit the batch"
    return cache, state, [int(s) for s in np.asarray(slots)]


def useful_bytes(copy: O.HostCopy) -> int:
    return sum(len(e.layers) * e.count * e.item_bytes for e in copy.entries)


# ---------------------------------------------------------------------------------------------
# The seed's path: per-pool gather, pageable copies


@functools.partial(jax.jit, static_argnames=("layout", "pool"))
def _seed_gather(buffers, locs, *, layout, pool):
    b, a = token_addressing(layout, pool)
    return dispatch.gather_tokens(buffers[b], locs, a)


@functools.partial(jax.jit, static_argnames=("layout", "pool"), donate_argnums=(0,))
def _seed_scatter(buffers, locs, value, scale, *, layout, pool):
    b, a = token_addressing(layout, pool)
    buffers = list(buffers)
    buffers[b] = dispatch.scatter_tokens(buffers[b], locs, value, scale, a)
    return tuple(buffers)


def seed_save(cache, locs_per_request):
    """Per request, per pool: gather, then a synchronous pageable copy (np.asarray)."""
    out = []
    for pool_locs in locs_per_request:
        host = {}
        for pool, locs in pool_locs.items():
            v, s = _seed_gather(cache.buffers, locs, layout=cache.layout, pool=pool)
            host[pool] = (np.asarray(v), np.asarray(s))
        out.append(host)
    return out


def seed_load(cache, host, locs_per_request):
    bufs = cache.buffers
    for h, pool_locs in zip(host, locs_per_request):
        for pool, locs in pool_locs.items():
            v, s = h[pool]
            bufs = _seed_scatter(bufs, locs, jax.device_put(v), jax.device_put(s),
                                 layout=cache.layout, pool=pool)
    jax.block_until_ready(bufs)
    return jaxkv.Cache(bufs, cache.layout)


# ---------------------------------------------------------------------------------------------


def _compiled_scatters() -> int:
    """Programs compiled so far by the offload scatters (jit cache entries; -1 when unknown)."""
    try:
        return O._scatter_donate._cache_size() + O._scatter._cache_size()
    except Exception:
        return -1


def main(argv=None) -> int:
    p = common.parser("offload")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    T = args.tokens or (1024 if args.quick else 65536)
    iters = args.iters or (3 if args.quick else 5)
    dev = jax.devices()[0]
    limit = device_bytes_limit(dev)
    want = args.requests or (4 if args.quick else 16)
    R = fit_requests(want, T, limit)
    print(f"device {dev.device_kind}; host kinds {O.host_kinds(dev)}; "
          f"device bytes_limit {'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'}; "
          f"{R} requests x {T} tokens" + (f" (shrunk from {want} to fit)" if R < want else ""),
          flush=True)

    cache, state, slots = build(R, T)
    print(cache.layout.describe(), flush=True)
    budget = O.HostBudget(1 << 40)
    kind = O.host_kinds(dev)[0]

    # ---- ours, request level: save
    def save_all(transfer="device_put"):
        hs = O.start_save_batch(cache, state, slots, budget=budget, transfer=transfer)
        return [h.wait() for h in hs]

    hs = O.start_save_batch(cache, state, slots, budget=budget)
    copies = [h.wait() for h in hs]
    nbytes1 = sum(useful_bytes(c) for c in copies)
    held = sum(c.nbytes for c in copies)
    gm = max((h.gather_memory for h in hs if h.gather_memory), key=lambda m: m.device_bytes)
    # every measurement moves the batch `rounds` times: >= 4 GB in total (quick: once)
    rounds = 1 if args.quick else max(1, math.ceil(MIN_TOTAL_BYTES / nbytes1))
    nbytes = rounds * nbytes1
    print(f"batch: {nbytes1 / 1e9:.3f} GB useful ({held / 1e9:.3f} GB held in {kind}), "
          f"x {rounds} round(s) = {nbytes / 1e9:.2f} GB per measurement; largest gather: "
          f"staging {gm.staging / 1e6:.0f} MB, device {gm.device_bytes / 1e6:.0f} MB "
          f"(temp {gm.temp / 1e6:.0f} MB, impl {gm.impl}); staging in flight <= "
          f"{O.MAX_INFLIGHT_BYTES / 2**30:.1f} GiB", flush=True)

    def save_iter():
        for _ in range(rounds):
            for c in save_all():
                c.free()

    t_save = common.time_call(save_iter, iters)

    def save_iter_jit():
        for _ in range(rounds):
            for c in save_all("jit"):
                c.free()

    t_save_jit = common.time_call(save_iter_jit, iters)

    # ---- ours, request level: load (donated, in place)
    box = [cache]

    def load_all():
        c = box[0]
        for _ in range(rounds):
            c = O.load_batch(c, state, copies, slots, donate=True)
        jax.block_until_ready(c.buffers)
        box[0] = c

    load_all()  # compiles (first call)
    n_compiled = _compiled_scatters()
    t_load = common.time_call(load_all, iters)
    scatter_compiles = _compiled_scatters() - n_compiled  # after the first call (expected 0)

    # the same with the run-3 queue order (copy i+1 queued after scatter i, no copy before the
    # planning program), and with copies ahead but no early copies: A/B of the order in one run
    sl, lens = O._check_slots(state, slots)

    def load_order_all(ahead, early):
        c = box[0]
        for _ in range(rounds):
            c = O._load_batch(c, state, copies, sl, lens, impl="auto", donate=True, free=False,
                              limit=O.MAX_INFLIGHT_BYTES, ahead=ahead, early=early)
        jax.block_until_ready(c.buffers)
        box[0] = c

    t_load_run3 = common.time_call(lambda: load_order_all(False, False), iters)
    t_load_ahead = common.time_call(lambda: load_order_all(True, False), iters)

    # scatter only: every request's scatter program (the one load_batch queues) with its staging
    # already on the device, back to back, nothing transferred; per request
    sharding, resets, outs, infos, small, reset_at = O._plan_loads(box[0], state, copies, slots,
                                                                   [T] * R)
    items = [O._request_scatter(cache.layout, c, i, outs, infos, resets, small, reset_at)
             for i, c in enumerate(copies)]
    dev_staging = [jax.device_put(c.data, sharding) for c in copies]
    jax.block_until_ready(dev_staging)

    def scatter_only():
        c = box[0]
        for _ in range(rounds):
            for i, (it, st) in enumerate(zip(items, dev_staging)):
                entries, rows_, _, reset_keys, reset_rows = it
                bufs = O._scatter_donate(c.buffers, st, outs[i][0], [], reset_rows,
                                         layout=c.layout, entries=entries, resets=reset_keys,
                                         impl="auto", rows=rows_)
                c = jaxkv.Cache(tuple(bufs), c.layout)
        jax.block_until_ready(c.buffers)
        box[0] = c

    t_scatter = common.time_call(scatter_only, iters)
    staging_bytes = sum(c.nbytes for c in copies)
    del dev_staging, items, outs, small
    print(f"load scatter: impl {dispatch._resolve('auto', 'scatter_tokens')}; scatter programs "
          f"compiled during the timed request-level loads (after a first call): "
          f"{scatter_compiles}", flush=True)
    cache = box[0]
    # bit-exactness spot check: re-saving after the loads gives the same bytes
    again = O.save(cache, state, slots[0], budget=budget)
    assert np.array_equal(np.asarray(again.data), np.asarray(copies[0].data)), "round trip differs"
    again.free()

    # ---- planning alone (request level): the batch's device planning program(s) and the one
    # fetch of their counts, nothing gathered / scattered / copied
    names = O._pools_of(cache.layout, None, "page")

    def plan_save_iter():
        for _ in range(rounds):
            O._plan_saves(cache, state, slots, [T] * R, "page", names)

    def plan_load_iter():
        for _ in range(rounds):
            O._plan_loads(cache, state, copies, slots, [T] * R)

    t_plan_save = common.time_call(plan_save_iter, iters)
    t_plan_load = common.time_call(plan_load_iter, iters)

    # ---- ours, location level (translations precomputed)
    locs_per_request = []
    for s in slots:
        rl = O.request_locs(cache.layout, state, s)
        pl = {}
        for pool, (locs, valid) in rl.items():
            if cache.layout.pool(pool).spec.kind == "state":
                pl[pool] = np.unique(locs[valid]).astype(np.int32)
            else:
                pl[pool] = locs[valid]
        locs_per_request.append(pl)

    def save_locs_all():
        # bounded like the batch: at most MAX_INFLIGHT_BYTES of staging queued
        out, inflight, queued = [], [], 0
        for pl in locs_per_request:
            while inflight and queued > O.MAX_INFLIGHT_BYTES:
                h = inflight.pop(0)
                queued -= h.copy_in_flight.nbytes
                h.wait()
            h = O.start_save_locs(cache, pl, budget=budget)
            inflight.append(h)
            queued += h.copy_in_flight.nbytes
            out.append(h)
        return [h.wait() for h in out]

    lcopies = save_locs_all()

    def save_locs_iter():
        for _ in range(rounds):
            for c in save_locs_all():
                c.free()

    t_save_locs = common.time_call(save_locs_iter, iters)

    def load_locs_all():
        c = box[0]
        for _ in range(rounds):
            # bounded like load_batch: a sliding window of at most MAX_INFLIGHT_BYTES of
            # host-to-device copies (awaiting the oldest staging; the pipeline is never drained)
            window = O._LoadWindow(O.MAX_INFLIGHT_BYTES)
            for pl, copy in zip(locs_per_request, lcopies):
                plan = O._load_plan(c, copy, pl, None, None)
                window.before(copy.nbytes)
                c = O._dispatch_load(c, copy, plan, impl="auto", donate=True, free=False,
                                     stagings=window.stagings())
                window.after(copy.nbytes)
        jax.block_until_ready(c.buffers)
        box[0] = c

    box[0] = cache
    t_load_locs = common.time_call(load_locs_all, iters)

    # the same, with every request's index arrays uploaded before the timed loop: isolates the
    # per-request (pageable) host-to-device upload of the index arrays of load_locs
    dev_sharding = cache.buffers[0].sharding
    pre = []
    for pl, copy in zip(locs_per_request, lcopies):
        plan = O._load_plan(box[0], copy, pl, None, None)
        pre.append((tuple(e._replace(count=0) for e in plan.entries),
                    jax.device_put([np.asarray(d) for d in plan.dst])))
    jax.block_until_ready([d for _, d in pre])

    def load_locs_dev_all():
        c = box[0]
        for _ in range(rounds):
            window = O._LoadWindow(O.MAX_INFLIGHT_BYTES)
            for (entries, dst_d), copy in zip(pre, lcopies):
                window.before(copy.nbytes)
                st = jax.device_put(copy.data, dev_sharding)
                window.stagings().append(st)
                bufs = O._scatter_donate(c.buffers, st, dst_d, [None] * len(dst_d), [],
                                         layout=c.layout, entries=entries, resets=(),
                                         impl="auto")
                c = jaxkv.Cache(tuple(bufs), c.layout)
                window.after(copy.nbytes)
        jax.block_until_ready(c.buffers)
        box[0] = c

    t_load_locs_dev = common.time_call(load_locs_dev_all, iters)
    del pre
    cache = box[0]
    lbytes = rounds * sum(useful_bytes(c) for c in lcopies)
    for c in lcopies:
        c.free()

    # ---- the seed's path
    dev_locs = [{k: jnp.asarray(v) for k, v in pl.items()} for pl in locs_per_request]
    host = seed_save(cache, dev_locs)

    def seed_save_iter():
        for _ in range(rounds):
            seed_save(cache, dev_locs)

    t_seed_save = common.time_call(seed_save_iter, iters)
    box[0] = cache

    def seed_load_iter():
        for _ in range(rounds):
            box[0] = seed_load(box[0], host, dev_locs)

    t_seed_load = common.time_call(seed_load_iter, iters)
    cache = box[0]
    del host

    # ---- ceilings: one pinned copy of the batch's bytes, each way, `rounds` times
    x = _random_u8(jax.random.key(1), (1, nbytes1))[0]
    pinned = x.sharding.with_memory_kind(kind) if kind != "numpy" else None
    if pinned is not None:
        xh = jax.device_put(x, pinned)

        def d2h():
            for _ in range(rounds):
                jax.block_until_ready(jax.device_put(x, pinned))

        def h2d():
            for _ in range(rounds):
                jax.block_until_ready(jax.device_put(xh, x.sharding))

        t_d2h = common.time_call(d2h, iters)
        t_h2d = common.time_call(h2d, iters)
        del xh
    else:
        t_d2h = common.time_call(lambda: [np.asarray(x + 0) for _ in range(rounds)], iters)
        xn = np.asarray(x)
        t_h2d = common.time_call(
            lambda: [jax.block_until_ready(jax.device_put(xn)) for _ in range(rounds)], iters)
    del x

    # ---- transfer only: the batch's per-request copies (same sizes as the request level's
    # staging), queued back to back, no planning, gather or scatter
    sizes = [c.nbytes for c in copies]
    if pinned is not None:
        dev_st = [_random_u8(jax.random.key(2 + i), (1, n))[0] for i, n in enumerate(sizes)]

        def d2h_req():
            for _ in range(rounds):
                jax.block_until_ready([jax.device_put(a, pinned) for a in dev_st])

        def h2d_req():
            for _ in range(rounds):
                jax.block_until_ready([jax.device_put(c.data, dev_st[0].sharding)
                                       for c in copies])

        t_d2h_req = common.time_call(d2h_req, iters)
        t_h2d_req = common.time_call(h2d_req, iters)
        del dev_st
    else:
        t_d2h_req, t_h2d_req = t_d2h, t_h2d
    held_all = rounds * sum(sizes)

    gbs = lambda n, t: n / t / 1e9  # noqa: E731
    d2h, h2d = gbs(nbytes, t_d2h), gbs(nbytes, t_h2d)
    seed_s, seed_l = gbs(nbytes, t_seed_save), gbs(nbytes, t_seed_load)
    tgt = {"ceiling_fraction": 0.90, "baseline_ratio": 4.0}
    rows = [
        common.row(f"pinned D2H copy, {nbytes / 1e9:.2f} GB (ceiling)", d2h, "GB/s"),
        common.row(f"pinned H2D copy, {nbytes / 1e9:.2f} GB (ceiling)", h2d, "GB/s"),
        common.row("seed save: per-pool gather + pageable copy", seed_s, "GB/s", ceiling=d2h),
        common.row("seed load: pageable copy + per-pool scatter", seed_l, "GB/s", ceiling=h2d),
        common.row(f"save, request level ({R} requests x {T} tokens, pipelined)",
                   gbs(nbytes, t_save), "GB/s", ceiling=d2h, baseline=seed_s, target=tgt),
        common.row("save, request level, transfer='jit' (gather with out_shardings=pinned_host)",
                   gbs(nbytes, t_save_jit), "GB/s", ceiling=d2h, baseline=seed_s, target=tgt),
        common.row(f"load, request level ({R} requests, donated)", gbs(nbytes, t_load), "GB/s",
                   ceiling=h2d, baseline=seed_l, target=tgt),
        common.row("load, request level, run-3 order (copy i+1 queued after scatter i)",
                   gbs(nbytes, t_load_run3), "GB/s", ceiling=h2d, baseline=seed_l, target=tgt),
        common.row("load, request level, copies ahead of scatters, no copy before planning",
                   gbs(nbytes, t_load_ahead), "GB/s", ceiling=h2d, baseline=seed_l, target=tgt),
        common.row("save, location level (precomputed locations)", gbs(lbytes, t_save_locs),
                   "GB/s", ceiling=d2h, baseline=seed_s, target=tgt),
        common.row("load, location level (precomputed locations)", gbs(lbytes, t_load_locs),
                   "GB/s", ceiling=h2d, baseline=seed_l, target=tgt),
        common.row("load, location level, index arrays uploaded beforehand",
                   gbs(lbytes, t_load_locs_dev), "GB/s", ceiling=h2d, baseline=seed_l,
                   target=tgt),
        common.row(f"save, transfer only ({R} per-request D2H copies back to back)",
                   gbs(held_all, t_d2h_req), "GB/s", ceiling=d2h),
        common.row(f"load, transfer only ({R} per-request H2D copies back to back)",
                   gbs(held_all, t_h2d_req), "GB/s", ceiling=h2d),
        common.row(f"save planning alone (device plan + 1 fetch), per batch of {R}",
                   1e3 * t_plan_save / rounds, "ms"),
        common.row(f"load planning alone (device plan + 1 fetch), per batch of {R}",
                   1e3 * t_plan_load / rounds, "ms"),
        common.row("save: batch time - transfer-only time (request level)",
                   1e3 * (t_save - t_d2h_req) / rounds, "ms"),
        common.row("load: batch time - transfer-only time (request level)",
                   1e3 * (t_load - t_h2d_req) / rounds, "ms"),
        common.row("load, run-3 order: batch time - transfer-only time",
                   1e3 * (t_load_run3 - t_h2d_req) / rounds, "ms"),
        common.row("load, run-3 order: (batch - transfer only - planning) per request",
                   1e3 * (t_load_run3 - t_h2d_req - t_plan_load) / (R * rounds), "ms"),
        common.row("load: scatter only per request (staging on device, back to back)",
                   1e3 * t_scatter / (R * rounds), "ms"),
        common.row("load: scatter only, staging bytes per second (device)",
                   gbs(rounds * staging_bytes, t_scatter), "GB/s"),
        common.row("load: scatter programs compiled during the timed loads", scatter_compiles,
                   "count"),
        common.row("save latency per request (request level)", 1e3 * t_save / (R * rounds), "ms"),
        common.row("load latency per request (request level)", 1e3 * t_load / (R * rounds), "ms"),
    ]
    for r in rows:
        frac = f" ({r['ceiling_fraction']:.2f} of ceiling)" if r["ceiling_fraction"] else ""
        base = f", {r['baseline_ratio']:.1f}x seed" if r["baseline_ratio"] else ""
        print(f"{r['name']}: {r['value']:.2f} {r['unit']}{frac}{base}", flush=True)
    stem = common.write_results(rows, args.out, "offload",
                                title=f"offload (retract/resume), DSv4-Flash, {host_kind_note(kind)}")
    print(f"wrote {stem}.json/.md/.png")
    return 0


def host_kind_note(kind: str) -> str:
    return f"host memory kind {kind}"


if __name__ == "__main__":
    sys.exit(main())
