"""Device-side timeline of the DCP merge loops (where a small merge's time goes).

    python -m benchmarks.dcp_profile OUT_DIR [T]      # 2 GPUs; prints a summary per variant

Runs ``benchmarks.dcp``'s loops (bare psum_scatter, merge_packed, bare_a2a, merge_prs; 50
chained merges x 3 calls) under ``jax.profiler.trace(create_perfetto_trace=True)`` and sums the
GPU events of the Chrome-format trace: per kernel name the count and mean duration, per stream the
span and busy time per merge.  Session 3 (benchmarks/NOTES.md, "DCP") used it to find that the
T = 1 merge is bound by when the host launches each device's collective, not by its kernels.  The
profiler slows the host, so spans are inflated; compare kernels, not totals.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from benchmarks import dcp as bd
from jaxkv import dcp

KINDS = ("bare", "merge_packed", "bare_a2a", "merge_prs")
ITERS, CALLS = 50, 3


def _gpu_events(trace_dir: str):
    """(process, thread, name, ts, dur) of the GPU events in the perfetto trace under dir."""
    files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    ev = json.load(gzip.open(files[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    names = {}
    for e in ev:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            tid = e.get("tid") if e["name"] == "thread_name" else None
            names[(e["pid"], tid)] = e["args"]["name"]
    for e in ev:
        if e.get("ph") != "X":
            continue
        proc, thread = names.get((e["pid"], None), ""), names.get((e["pid"], e.get("tid")), "")
        if "GPU" in proc or "Stream" in thread:
            yield proc, thread, e["name"], e["ts"], e.get("dur", 0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out, T = argv[0], int(argv[1]) if len(argv) > 1 else 1
    mesh = dcp.make_mesh(2)
    sh = jax.sharding.NamedSharding(mesh, P("dcp"))
    rng = np.random.default_rng(0)
    o = jnp.asarray(rng.normal(size=(2, T, bd.HEADS, bd.DV)).astype(np.float32))
    lse = jnp.asarray(rng.normal(size=(2, T, bd.HEADS)).astype(np.float32))
    for kind in KINDS:
        f = bd._loop(kind, mesh, ITERS)
        x, lz = (jax.device_put(a, sh) for a in bd._inputs(kind, o, lse, 2))
        for _ in range(3):
            jax.block_until_ready(f(x, lz))
        d = os.path.join(out, f"trace-{kind}-T{T}")
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(CALLS):
                jax.block_until_ready(f(x, lz))
        wall = (time.perf_counter() - t0) / CALLS / ITERS
        per = collections.defaultdict(lambda: [0, 0.0])
        streams = collections.defaultdict(list)
        for proc, thread, name, ts, dur in _gpu_events(d):
            key = (proc[-12:], thread[-24:], name[:60])
            per[key][0] += 1
            per[key][1] += dur
            streams[(proc, thread)].append((ts, ts + dur))
        print(f"== {kind} T={T}: {wall * 1e6:.1f} us per merge (wall, under the profiler)")
        for key, (c, dur) in sorted(per.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"   {c:5d} x {dur / c:7.2f} us  {key}")
        for (proc, thread), iv in streams.items():
            iv.sort()
            n = CALLS * ITERS
            print(f"   stream {proc[-20:]} / {thread[-30:]}: span/merge "
                  f"{(iv[-1][1] - iv[0][0]) / n:.1f} us, busy/merge "
                  f"{sum(b - a for a, b in iv) / n:.1f} us, events {len(iv)}")


if __name__ == "__main__":
    main()
