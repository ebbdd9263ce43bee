"""``python -m jaxkv.demo``: what jaxkv does, shown and verified in one command.

Part 1 (always): the geometry, pool sizes and layouts of DeepSeek-V4-Flash / -Pro and V3.2, and a
bit-exact round trip of random tokens through every pool of a small cache in both layouts.
"""
from __future__ import annotations

import argparse
import sys

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
    rep = sizing.capacity_report(geo, budget_gb * GB, swa_ratio)
    out("  " + rep.summary())


def round_trip(out=print, seed: int = 0) -> bool:
    """Writes random tokens into every pool of a tiny cache (both layouts) and reads them back."""
    out("\n== Round trip through every pool of a small cache")
    ok = True
    key = jax.random.key(seed)
    for lay in (jaxkv.layer_major(G.tiny(), 8), jaxkv.packed(G.tiny(), 8),
                jaxkv.layer_major(G.tiny(3, v32=True), 8)):
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
                locs = jax.random.choice(k1, p.capacity - 1, (n,), replace=False).astype(
                    jnp.int32)
            tok = F.random_tokens(p.spec.fmt, k2, (len(layers), n))
            cache = jaxkv.set_tokens(cache, p.name, layers, locs, tok)
            written.append((p.name, layers, locs, tok))
        bad = []
        for name, layers, locs, tok in written:
            back = jaxkv.get_tokens(cache, name, layers, locs)
            same = all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
                       for a, b in zip(back, tok))
            if not same:
                bad.append(name)
        ok &= not bad
        out(f"  {lay.kind:<11} {lay.geometry.name:<9} {len(written)} pools: "
            + ("bit-exact" if not bad else f"MISMATCH in {bad}"))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxkv.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-gb", type=float, default=60.0,
                    help="device memory budget for the capacity report (default 60)")
    ap.add_argument("--swa-ratio", type=float, default=0.1,
                    help="SWA tokens per full token for sizing (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"jaxkv demo on {jax.devices()[0].platform} ({len(jax.devices())} device(s))")
    report_geometry(budget_gb=args.budget_gb, swa_ratio=args.swa_ratio)
    ok = round_trip(seed=args.seed)
    print("\nchecks: " + ("all passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
