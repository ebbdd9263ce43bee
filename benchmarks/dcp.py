"""DCP benchmark: the LSE merge vs a bare reduce-scatter, and KV capacity per device.

    python -m benchmarks.dcp --out DIR            # GPUs: every visible GPU (needs >= 2)
    python -m benchmarks.dcp --quick --out DIR    # CPU smoke run (2 simulated devices)

Merge (SPEC §9), per decode batch of T tokens x 128 heads x 512 (float32 partial outputs):
  * ``merge_rs``: all-gather of the LSEs, scale, ``psum_scatter`` over heads (``dcp.merge``),
  * ``merge_a2a``: ``all_to_all`` of the head chunks of out and of lse, merged locally,
  * ``merge_a2a_packed``: one ``all_to_all`` of ``[out | lse]`` (plus a packing copy),
  * baseline: a bare ``psum_scatter`` of the same ``[T, 128, 512]`` float32 partials.
Each is timed as ``K`` chained iterations inside one jitted ``shard_map`` loop (iteration ``i+1``
reads one element written from iteration ``i``'s result, so nothing is hoisted or merged), so the
numbers are device time per merge, not Python dispatch.  Target: merge <= 1.15 x the bare
reduce-scatter (``baseline_ratio >= 1/1.15``).

Prediction (written before any GPU run): at T <= ~16 the bare reduce-scatter is latency-bound
(~10-20 us), and ``merge_rs`` adds a second collective (the LSE all-gather, also latency-bound), so
expect ~1.5-2x there, missing the 1.15x target; at T = 256 (64 MiB/rank) the scaling pass
(read + write of the partials at HBM speed) costs ~1/4-1/3 of the reduce-scatter over NVLink: ~1.3x.
``merge_a2a`` needs no pass before its collective and merges 1/N of the bytes after it; if XLA
issues the two all-to-alls back to back it should sit closest to the bare reduce-scatter.

Capacity: context tokens per device for DSv4-Flash/Pro and V3.2 under DCP N (replicated indexer
included), measured as N = the mesh size and computed for N = 2, 4, 8; and the per-device bytes of
a real DCP cache allocated on the mesh (shards checked against ``dcp.capacity``).
"""
from __future__ import annotations

import os
import sys

if "--quick" in sys.argv:  # CPU smoke run: simulated devices (no effect on GPU platforms)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxkv  # noqa: E402
from benchmarks import common  # noqa: E402
from jaxkv import dcp  # noqa: E402

HEADS, DV = 128, 512


def _loop(kind: str, mesh, iters: int):
    """jit(shard_map(K chained merges)); inputs out f32[N, T, H, DV], lse f32[N, T, H]."""
    axis = "dcp"

    def one(o, l):
        if kind == "bare":
            r = lax.psum_scatter(o, axis, scatter_dimension=1, tiled=True)
            return r, l[:, :r.shape[1]]
        method = {"merge_rs": "reduce_scatter", "merge_a2a": "all_to_all",
                  "merge_a2a_packed": "all_to_all_packed"}[kind]
        return dcp.merge(o, l, axis, "e", method=method)

    def body(o, l):
        o, l = o[0], l[0]

        def step(_, c):
            o, l, acc = c
            r, rl = one(o, l)
            # chain: the next iteration reads one element of this one's result
            o = o.at[0, 0, 0].set(r[0, 0, 0])
            l = l.at[0, 0].set(rl[0, 0])
            return o, l, acc + r[0, 0, 1]

        o, l, acc = lax.fori_loop(0, iters, step, (o, l, jnp.float32(0)))
        return acc[None]

    f = dcp.shard_map(body, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=P(axis))
    return jax.jit(f)


def bench_merge(mesh, sizes, iters, reps):
    n = mesh.shape["dcp"]
    rows, raw = [], []
    rng = np.random.default_rng(0)
    for T in sizes:
        o = jnp.asarray(rng.normal(size=(n, T, HEADS, DV)).astype(np.float32))
        lse = jnp.asarray((rng.normal(size=(n, T, HEADS)) * 4).astype(np.float32))
        lse = lse.at[0, 0, :].set(-jnp.inf)  # an empty rank for one token: the -inf path runs
        sh = jax.sharding.NamedSharding(mesh, P("dcp"))
        o, lse = jax.device_put(o, sh), jax.device_put(lse, sh)
        t = {}
        for kind in ("bare", "merge_rs", "merge_a2a", "merge_a2a_packed"):
            f = _loop(kind, mesh, iters)
            t[kind] = common.time_jax(f, o, lse, iters=reps, warmup=2) / iters
        nbytes = T * HEADS * DV * 4  # per-rank partial output bytes
        raw.append((T, t))
        for kind in ("merge_rs", "merge_a2a", "merge_a2a_packed"):
            rows.append(common.row(f"{kind} T={T} x {HEADS}h x {DV} f32 (N={n})",
                                   t[kind] * 1e6, "us", baseline=t["bare"] * 1e6,
                                   target={"baseline_ratio": round(1 / 1.15, 4)},
                                   higher_is_better=False))
        rows.append(common.row(f"bare psum_scatter T={T} ({nbytes / 2**20:.2f} MiB/rank) bus GB/s",
                               nbytes * (n - 1) / n / t["bare"] / 1e9, "GB/s"))
        print(f"T={T:4d}  bare {t['bare']*1e6:8.1f} us  merge_rs {t['merge_rs']*1e6:8.1f} us "
              f"({t['merge_rs']/t['bare']:.3f}x)  merge_a2a {t['merge_a2a']*1e6:8.1f} us "
              f"({t['merge_a2a']/t['bare']:.3f}x)  packed {t['merge_a2a_packed']/t['bare']:.3f}x",
              flush=True)
    return rows, raw


def check_merge(mesh):
    """The benchmarked merge is the merge: compare with merge_partials on gathered partials."""
    n = mesh.shape["dcp"]
    rng = np.random.default_rng(1)
    o = rng.normal(size=(n, 4, HEADS, DV)).astype(np.float32)
    lse = (rng.normal(size=(n, 4, HEADS)) * 4).astype(np.float32)
    lse[0, 0] = -np.inf
    want_o, want_l = dcp.merge_partials(o, lse)
    for method in ("reduce_scatter", "all_to_all", "all_to_all_packed"):
        f = dcp.shard_map(lambda a, b: dcp.merge(a[0], b[0], "dcp", method=method), mesh=mesh,
                          in_specs=(P("dcp"), P("dcp")), out_specs=(P(None, "dcp"),) * 2)
        got_o, got_l = f(jnp.asarray(o), jnp.asarray(lse))
        err = float(jnp.max(jnp.abs(got_o - want_o)) / jnp.max(jnp.abs(want_o)))
        assert err < 1e-5, (method, err)
        assert bool(jnp.all(jnp.isfinite(got_o)))


def capacity_rows(mesh, quick):
    n_mesh = mesh.shape["dcp"]
    dev = jax.devices()[0]
    try:
        mem = dev.memory_stats()["bytes_limit"]
    except Exception:  # CPU: no memory stats
        mem = 80e9
    rows = []
    for name, geo in (("dsv4_flash", jaxkv.dsv4_flash()), ("dsv4_pro", jaxkv.dsv4_pro()),
                      ("dsv32", jaxkv.dsv32())):
        one = dcp.kv_capacity(geo, mem, 1)
        for n in sorted({2, 4, 8, n_mesh}):
            c = dcp.kv_capacity(geo, mem, n)
            how = "this mesh's N" if n == n_mesh else "computed"
            rows.append(common.row(
                f"{name} context tokens/GPU at DCP{n} ({how}; if all {mem / 2**30:.0f} GiB "
                f"held KV, replicated indexer {c['bytes_per_token_replicated']:.0f} B/token)",
                float(c["tokens"]), "tokens", baseline=float(one["tokens"])))
    # a real DCP cache on this mesh: per-device bytes == capacity(), indexer replicated
    geo = jaxkv.tiny(3, page_size=16, v32=True) if quick else jaxkv.dsv32()
    pages = {p.name: (64 if quick else 512) for p in geo.pools()}
    dc = dcp.init_dcp_cache(geo, pages, mesh)
    rep = dcp.capacity(dc)
    shard_bytes = sum(b.addressable_shards[0].data.nbytes for b in dc.buffers)
    assert shard_bytes == rep["device_bytes"], (shard_bytes, rep)
    rows.append(common.row(f"{geo.name} DCP{n_mesh} cache: bytes/GPU (kv sharded "
                           f"{rep['sharded_bytes'] / 2**20:.0f} MiB + indexer replicated "
                           f"{rep['indexer_bytes'] / 2**20:.0f} MiB)",
                           shard_bytes / 2**20, "MiB"))
    rows.append(common.row(f"{geo.name} DCP{n_mesh} cache: kv tokens per layer (global / per GPU)",
                           float(rep["pools"]["kv"]["global_tokens"]), "tokens",
                           baseline=float(rep["pools"]["kv"]["local_tokens"])))
    return rows


def main(argv=None):
    args = common.parser("dcp").parse_args(argv)
    devs = jax.devices()
    if len(devs) < 2:
        raise SystemExit("benchmarks.dcp needs >= 2 devices (GPUs, or --quick on CPU)")
    mesh = dcp.make_mesh(len(devs))
    print(f"devices: {len(devs)} x {devs[0].device_kind}", flush=True)
    check_merge(mesh)
    sizes = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    iters, reps = (4, 3) if args.quick else (100, 10)
    rows, _ = bench_merge(mesh, sizes, iters, reps)
    rows += capacity_rows(mesh, args.quick)
    stem = common.write_results(rows, args.out, "dcp", title=f"DCP merge and capacity "
                                f"(N={len(devs)})")
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
