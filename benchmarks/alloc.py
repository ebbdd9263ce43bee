"""Allocator benchmark: one decode step's extend + translate for 1,024 running requests, in jit.

    python -m benchmarks.alloc --out DIR [--quick]

Setup: DSv4-Flash pools sized for 60 GB at r = 0.1 (``jaxkv.sizing.capacity``: ~27k full pages,
~2.7k SWA pages, a ~6.9M-entry ``full_to_swa`` table), 1,024 requests admitted with random lengths
(1 .. 6,000 tokens).  One decode step = ``alloc.extend`` by one token for every request (full
pages at page boundaries, SWA pages as the window moves, out-of-window pages freed,
``full_to_swa`` updated) + ``alloc.translate`` of the new tokens (full, SWA, C4, C128 locations,
page-scoped C4 / C128 state rows and request-scoped C128 rows).

Rows:
  * ``decode step in scan``: per-step time of 64 steps inside one jitted ``lax.scan`` (the cost a
    serving step that fuses allocation into its compiled step pays); target <= 50 us (H100).
  * ``decode step, one jit call``: wall time of one donated jitted call (dispatch included).
  * ``jit dispatch floor``: a trivial donated jitted call (what a call costs at best).
  * ``host numpy baseline``: the same step as a host-side vectorised NumPy allocator (the
    SGLang / SGLang-JAX way) plus the device transfer of the resulting locations;
    ``baseline_ratio`` = baseline / ours.

Prediction (written before the GPU run): the step moves a few KB, so it is latency-bound, not
bandwidth-bound.  Its jaxpr has 7 scatters + 1 scatter-add (slot-duplicate check), 2 cumsums,
~4 reductions and ~12 gathers; on CPU XLA emits ~79 fused loops (~300-400 us on the 2-core dev
machine under load).  XLA GPU fuses gathers into their consumers, leaving ~15-25 kernels of
~1.5-3 us each: 25-60 us on an H100, around the 50 us target.  If it misses, the next steps are
packing lengths / swa_ring / page_table into one per-request array (3 scatters -> 1) and an
``unique_slots`` fast path that skips the duplicate check.

GPU: ``python -m benchmarks.alloc --out $OUT`` (writes ``alloc-h100.{json,md,png}``).
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxkv import alloc as A
from jaxkv import sizing
from jaxkv.geometry import dsv4_flash

SUITE = "alloc"
SCAN_STEPS = 64


def setup(num_requests: int, budget: float, max_len: int, longest: int = 6000, seed: int = 0):
    geo = dsv4_flash()
    cap = sizing.capacity(geo, int(budget), 0.1, num_requests)
    cfg = A.AllocConfig(page_size=geo.page_size, num_pages=cap.pages["c4"],
                        max_requests=num_requests, max_len=max_len, window=geo.swa_window,
                        swa_page=geo.page_size, num_swa_pages=cap.pages["swa"])
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest, num_requests).astype(np.int32)
    state = A.init_state(cfg)
    state, slots, status = jax.jit(functools.partial(A.admit, max_len=longest))(
        state, jnp.asarray(lengths))
    assert (np.asarray(status) == A.OK).all(), "setup admit failed"
    return cfg, state, slots


def decode_step(state, slots):
    """One decode step: extend every request by one token, translate the new tokens."""
    ones = jnp.ones_like(slots)
    state, status = A.extend(state, slots, ones, max_new=1)
    pos = state.lengths[slots] - 1
    locs = A.translate(state, slots, pos)
    return state, (status, locs)


def host_baseline(cfg, state, slots, iters):
    """Vectorised NumPy version of the same step (host free lists, like SGLang), + H2D copy."""
    ps, W = cfg.page_size, cfg.window
    pt = np.asarray(state.page_table).copy()
    ring = np.asarray(state.swa_ring).copy()
    lens = np.asarray(state.lengths).copy()
    table = np.asarray(state.full_to_swa).copy()
    free_f = list(np.asarray(state.stacks[0])[:int(state.nfree[0])])
    free_s = list(np.asarray(state.stacks[1])[:int(state.nfree[1])])
    sl = np.asarray(slots)
    K = cfg.ring
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        L = lens[sl]
        L2 = L + 1
        need_f = (L % ps) == 0
        idx = np.nonzero(need_f)[0]
        for i in idx:
            pt[sl[i], L[i] // ps] = free_f.pop()
        a0 = np.maximum(L - W, 0) // ps
        a1 = np.maximum(L2 - W, 0) // ps
        for i in np.nonzero(a1 > a0)[0]:
            k = a0[i] % K
            free_s.append(ring[sl[i], k])
            ring[sl[i], k] = 0
        for i in np.nonzero((L2 - 1) // ps > (L - 1) // ps)[0]:
            ring[sl[i], ((L2[i] - 1) // ps) % K] = free_s.pop()
        old = L - W
        m = old >= 0
        table[pt[sl[m], old[m] // ps] * ps + old[m] % ps] = 0
        p = L2 - 1
        f = pt[sl, p // ps] * ps + p % ps
        s = ring[sl, (p // ps) % K] * ps + p % ps
        table[f] = s
        lens[sl] = L2
        c4 = np.where((f + 1) % 4 == 0, f // 4, -1)
        c128 = np.where((f + 1) % 128 == 0, f // 128, -1)
        st4 = (s // ps) * 8 + s % 8
        st128 = sl * 128 + p % 128
        out = jax.device_put(np.stack([f, s, c4, c128, st4, st128]))
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    args = common.parser(SUITE).parse_args(argv)
    n = 32 if args.quick else 1024
    budget = 2e9 if args.quick else 60e9
    cfg, state, slots = setup(n, budget, 65536, 1000 if args.quick else 6000)
    print(f"pools: {cfg.num_pages:,} full pages, {cfg.num_swa_pages:,} SWA pages, "
          f"full_to_swa {cfg.table_size:,} entries; {n} requests")

    # (a) many steps inside one jit: the in-jit per-step cost.
    @functools.partial(jax.jit, donate_argnums=0)
    def run_scan(state, slots):
        def body(s, _):
            s, (status, locs) = decode_step(s, slots)
            return s, (jnp.sum(status) + jnp.sum(locs.swa) + jnp.sum(locs.c128_state_req))
        return jax.lax.scan(body, state, None, length=SCAN_STEPS)

    st = state
    st, chk = run_scan(st, slots)  # compile + warm-up
    jax.block_until_ready(st)
    ts = []
    for _ in range(3 if args.quick else 10):
        t0 = time.perf_counter()
        st, chk = run_scan(st, slots)
        jax.block_until_ready(st)
        ts.append(time.perf_counter() - t0)
    t_scan = statistics.median(ts) / SCAN_STEPS
    A.check_invariants(st) if args.quick else None

    # (b) one donated jitted call per step.
    step = jax.jit(decode_step, donate_argnums=0)

    def one(s):
        s, out = step(s, slots)
        return s
    t_call, st = common.time_jax_loop(one, st, iters=50 if not args.quick else 10)

    # (c) dispatch floor.
    tiny = jax.jit(lambda x: x + 1, donate_argnums=0)
    t_floor, _ = common.time_jax_loop(tiny, jnp.zeros((1024,), jnp.int32), iters=50)

    # (d) host numpy baseline from the current state.
    t_host = host_baseline(cfg, st, slots, 50 if not args.quick else 10)

    us = 1e6
    rows = [
        common.row(f"decode step in scan ({n} req, extend+translate)", t_scan * us, "us",
                   baseline=t_host * us, target={"value": 50.0}, higher_is_better=False),
        common.row(f"decode step, one jit call ({n} req)", t_call * us, "us",
                   baseline=t_host * us, higher_is_better=False),
        common.row("jit dispatch floor (trivial donated call)", t_floor * us, "us"),
        common.row(f"host numpy baseline ({n} req, + H2D of locs)", t_host * us, "us"),
    ]
    for r in rows:
        print(f"{r['name']:<55} {r['value']:>10.1f} {r['unit']}  "
              f"baseline_ratio={r['baseline_ratio']}")
    stem = common.write_results(rows, args.out, SUITE,
                                title="alloc: decode-step extend + translate")
    print("wrote", stem + ".{json,md,png}")


if __name__ == "__main__":
    main()
