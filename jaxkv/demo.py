"""``python -m jaxkv.demo``: what jaxkv does, shown and verified in one command.

Part 1: the geometry, pool sizes and layouts of DeepSeek-V4-Flash / -Pro and V3.2, and a
bit-exact round trip of random tokens through every pool of a small cache in both layouts.

Part 2: a simulated DeepSeek-V4 decode server (``jaxkv.sim``): prefill handoff through the packed
layout, decode steps that allocate and write every pool through the kernels and compute the
reference sparse attention, memory pressure that retracts requests to pinned host memory and
resumes them into different pages — verified bit for bit against a run without retracts — and,
with ``--dcp N``, the same requests on a cache sharded over N devices, checked against the
single-device attention.
Exit code 0 only when every check passes.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv import formats as F
from jaxkv import geometry as G

GB = 1e9


def report_geometry(out=print, budget_gb: float = 60.0, swa_ratio: float = 0.1) -> None:
    """Prints formats, per-model pools, packed-layout numbers and token capacity in a budget."""
    out("== Token formats (SPEC §2)")
    for name, v, s, t in F.format_table():
        out(f"  {name:<13} value {v:>4} B + scale slot {s} B = {t} B per token")
    out(f"  DSv4 pages: SWA 256 -> {F.page_bytes(F.DSV4_MLA, 256):,} B, C4 64 -> "
        f"{F.page_bytes(F.DSV4_MLA, 64):,} B, C128 2 -> {F.page_bytes(F.DSV4_MLA, 2):,} B; "
        f"indexer 64 -> {F.page_bytes(F.DSV4_INDEXER, 64):,} B "
        f"({F.page_bytes(F.DSV4_INDEXER, 64, 576):,} B 576-aligned)")
    for geo in (G.dsv4_flash(), G.dsv4_pro(), G.dsv32()):
        out(f"\n== {geo.name}: {geo.num_layers} layers (+{geo.mtp_layers} MTP), "
            f"page {geo.page_size} tokens"
            + (f", window {geo.swa_window}, {len(geo.c4_layers)} C4 + "
               f"{len(geo.c128_layers)} C128 layers" if geo.is_dsv4 else ", DSA on every layer"))
        packed = jaxkv.packed(geo, 2)
        out("  " + packed.describe().splitlines()[1].strip())
        out(f"  packed: {len(packed.regions())} region, one {packed.block_stride:,}-B range per "
            f"block; layer-major: {sum(p.spec.num_layers for p in packed.pools)} (pool, layer) "
            "page arrays")
        if geo.is_dsv4:
            b = G.sglang_bytes_per_full_token(geo, swa_ratio)
            out(f"  SGLang formula, r = {swa_ratio}: {b:,.2f} B per full token -> "
                f"{budget_gb * GB / b / 1e6:,.2f} M full tokens in {budget_gb:g} GB")
            _report_capacity(geo, budget_gb, swa_ratio, out)


def _report_capacity(geo, budget_gb, swa_ratio, out) -> None:
    """Our sizing (request-scoped state), when the sizing module is present."""
    try:
        from jaxkv import sizing
    except ImportError:
        return
    for m in (256, 1024):
        c = sizing.capacity(geo, int(budget_gb * GB), swa_ratio, m, "request")
        out(f"  jaxkv sizing (request-scoped C128 state, {m} request slots): "
            f"{c.ours_bytes_per_token:,.1f} B per full token -> {c.ours_tokens / 1e6:,.2f} M "
            f"full tokens = {c.ratio:.2f}x SGLang's")


@functools.partial(jax.jit, static_argnums=0)
def _round_trip_one(lay, key):
    """Writes random tokens into every pool of a fresh cache of ``lay``; returns what was
    written and what reads back, per pool (one compiled program per layout)."""
    cache = jaxkv.init_cache(lay.geometry, lay)
    written = []
    for i, p in enumerate(lay.pools):
        layers = p.groups[0]
        key, k1, k2 = jax.random.split(key, 3)
        n = min(16, p.capacity - 2)
        if lay.kind == "packed":
            # A block belongs to one KV-cache group at a time: give each pool its own block.
            n = min(n, p.tokens_per_page)
            locs = (i + 1) * p.tokens_per_page + jax.random.choice(
                k1, p.tokens_per_page, (n,), replace=False).astype(jnp.int32)
        else:
            locs = jax.random.choice(k1, p.capacity - 1, (n,), replace=False).astype(jnp.int32)
        tok = F.random_tokens(p.spec.fmt, k2, (len(layers), n))
        cache = jaxkv.set_tokens(cache, p.name, layers, locs, tok)
        written.append((layers, locs, tok))
    return [(tok, jaxkv.get_tokens(cache, p.name, layers, locs))
            for p, (layers, locs, tok) in zip(lay.pools, written)]


def round_trip(out=print, seed: int = 0) -> bool:
    """Writes random tokens into every pool of a tiny cache (both layouts) and reads them back."""
    out("\n== Round trip through every pool of a small cache")
    ok = True
    key = jax.random.key(seed)
    for lay in (jaxkv.layer_major(G.tiny(), 8), jaxkv.packed(G.tiny(), 8),
                jaxkv.layer_major(G.tiny(3, v32=True), 8)):
        key, sub = jax.random.split(key)
        pairs = _round_trip_one(lay, sub)
        bad = [p.name for p, (tok, back) in zip(lay.pools, pairs)
               if not all(np.array_equal(np.asarray(a).view(np.uint8),
                                         np.asarray(b).view(np.uint8))
                          for a, b in zip(back, tok))]
        ok &= not bad
        out(f"  {lay.kind:<11} {lay.geometry.name:<9} {len(pairs)} pools: "
            + ("bit-exact" if not bad else f"MISMATCH in {bad}"))
    return ok


class Progress:
    """A one-line progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self.t0 = time.perf_counter()
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(done / total, 1.0)
        if sys.stderr.isatty():
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            sys.stderr.write(f"\r  {self.label} [{bar}] {done}/{total} tokens "
                             f"{time.perf_counter() - self.t0:5.1f}s")
            sys.stderr.flush()
        elif int(frac * 10) > self.last:
            self.last = int(frac * 10)
            sys.stderr.write(f"  {self.label}: {done}/{total} tokens "
                             f"({time.perf_counter() - self.t0:.1f}s)\n")

    def close(self) -> None:
        if self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")


def simulate(args) -> bool:
    """Runs the decode-server simulation and its checks; prints the summary."""
    from jaxkv import sim
    overrides = {k: v for k, v in (("requests", args.requests), ("decode", args.decode),
                                   ("seed", args.seed)) if v is not None}
    cfg = (sim.gpu_preset if args.preset == "gpu" else sim.cpu_preset)(**overrides)
    full, swa = sim.pool_pages(cfg)
    print(f"\n== Decode server: {cfg.requests} requests of {cfg.geo.name} "
          f"(prompts {cfg.prompt[0]}-{cfg.prompt[1]}, {cfg.decode} decode tokens each, "
          f"batch {cfg.max_running}); decode cache {full - 1} full + {swa - 1} SWA pages per "
          "layer, too few for the batch: retracts expected")
    bar = Progress("serving", not args.quiet)
    t0 = time.perf_counter()
    stats, outs = sim.run(cfg, progress=bar)
    bar.close()
    wall = time.perf_counter() - t0
    bar = Progress("reference (no memory pressure)", not args.quiet)
    ref_stats, ref = sim.run(cfg, reference=True, progress=bar)
    bar.close()
    checks = []
    ok, detail = sim.compare(outs, ref, exact=True)
    checks.append(("attention with retracts == without", ok, detail))
    checks.append(("retract path exercised", stats.retracts > 0 and stats.resumes > 0,
                   f"{stats.retracts} retracts, {stats.resumes} resumes"))
    print(f"  steps {stats.steps}, tokens decoded {stats.tokens}, retracts {stats.retracts}, "
          f"resumes {stats.resumes}, wall {wall:.1f}s (reference run: {ref_stats.steps} steps, "
          f"{ref_stats.retracts} retracts)")
    print("  bytes moved per path:")
    for path, nbytes in stats.bytes.items():
        rate = stats.rate(path)
        speed = f"{rate:8.3f} GB/s after the first call" if rate else \
            "(one call: its time is mostly compilation)"
        print(f"    {path:<30} {nbytes / 1e6:10.3f} MB  {speed}")
    n = args.dcp if args.dcp is not None else min(2, len(jax.devices()))
    if n > 1:
        if len(jax.devices()) < n:
            checks.append((f"DCP over {n} devices", False,
                           f"--dcp {n} asked for, only {len(jax.devices())} device(s) present"))
        else:
            bar = Progress(f"DCP over {n} devices", not args.quiet)
            t1 = time.perf_counter()
            douts = sim.run_dcp(cfg, n, interleave=args.interleave, progress=bar)
            bar.close()
            ok, detail = sim.compare(douts, ref, exact=False, rtol=1e-5)
            checks.append((f"DCP attention over {n} devices == single device (rtol 1e-5, "
                           f"interleave {args.interleave})", ok, detail))
            print(f"  DCP over {n} {jax.devices()[0].platform} devices: {len(douts)} decode "
                  f"outputs in {time.perf_counter() - t1:.1f}s")
    if args.plot:
        sim.plot(stats, cfg, args.plot, full, swa)
        print(f"  occupancy plot written to {args.plot}")
    print("  checks:")
    for name, ok, detail in checks:
        print(f"    [{'ok' if ok else 'FAILED'}] {name}: {detail}")
    return all(ok for _, ok, _ in checks)


def main(argv=None) -> int:
    # CPU runs simulate 4 devices for DCP; this must be set before jax creates its backend.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=4").strip()
    ap = argparse.ArgumentParser(prog="python -m jaxkv.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: tiny geometry, under a minute on 2 cores (default); gpu: "
                         "DeepSeek-V4-Flash sized for an H100")
    ap.add_argument("--requests", type=int, help="requests to serve (preset default)")
    ap.add_argument("--decode", type=int, help="decode tokens per request (preset default)")
    ap.add_argument("--dcp", type=int, default=None,
                    help="also serve the requests on a cache sharded over N devices and check "
                         "its attention (default: 2 when 2+ devices are present — CPU runs "
                         "simulate 4 — else off; 1 = off)")
    ap.add_argument("--interleave", default=1,
                    type=lambda v: v if v == "page" else int(v),
                    help="DCP interleave: tokens per owner run, or 'page' (default 1)")
    ap.add_argument("--plot", metavar="FILE.png", help="draw pool occupancy over the steps")
    ap.add_argument("--report-only", action="store_true", help="skip the simulation")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--budget-gb", type=float, default=60.0,
                    help="device memory budget for the capacity report (default 60)")
    ap.add_argument("--swa-ratio", type=float, default=0.1,
                    help="SWA tokens per full token for sizing (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"jaxkv demo on {jax.devices()[0].platform} ({len(jax.devices())} device(s))")
    report_geometry(budget_gb=args.budget_gb, swa_ratio=args.swa_ratio)
    ok = round_trip(seed=args.seed)
    if not args.report_only:
        ok &= simulate(args)
    print("\nchecks: " + ("all passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
