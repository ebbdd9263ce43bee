"""DCP benchmark: the LSE merge vs a bare reduce-scatter, and KV capacity per device.

    python -m benchmarks.dcp --out DIR            # GPUs: every visible GPU (needs >= 2)
    python -m benchmarks.dcp --quick --out DIR    # CPU smoke run (2 simulated devices)

Merge (SPEC §9), per decode batch of T tokens x 128 heads x 512 (float32 partial outputs):
  * ``merge_rs``: all-gather of the LSEs, scale, ``psum_scatter`` over heads (``dcp.merge``),
  * ``merge_a2a``: ``all_to_all`` of the head chunks of out and of lse, merged locally,
  * ``merge_a2a_packed``: one ``all_to_all`` of ``[out | lse]`` rows (plus a packing copy),
  * ``merge_packed``: the producer emits the chunk-major packed layout (``dcp.pack_partials``:
    ``[N, T, h*(512+1)]``, the attention's output fusion writes it), one whole-block
    ``all_to_all``, one elementwise merge pass (``dcp.merge_packed``),
  * ``merge_gather``: the same packed layout, one ``all_gather`` of all of it (N x the bytes;
    each rank merges its own chunk: ``merge_packed(collective="all_gather")``), for tiny T,
  * ``merge_prs``: the same packed layout carried by the reduce-scatter collective: each rank
    writes its (sanitized) chunk for rank ``r`` into slot ``(r, own rank)`` of a zero
    ``[N, N, T, h*(512+1)]`` buffer, one ``psum_scatter`` delivers all N chunks exactly (N x the
    bytes, but the collective that is fastest at tiny sizes), then the same merge pass
    (``merge_packed(collective="reduce_scatter")``, ``method="packed_rs"``), for tiny T,
  * ``bare_a2a`` / ``bare_ag`` / ``bare_prs``: the ``all_to_all`` / ``all_gather`` of the packed
    bytes / the ``psum_scatter`` of the slot buffer alone (the merges minus the merge pass; for
    ``bare_prs`` also minus the pass that writes the slot buffer),
  * experiments, timed only with ``--kinds``: ``merge_par`` (every rank's packed partials in its
    slot of a zero ``[N, N, T, w]`` buffer, one ``psum`` all-reduce), ``merge_cp`` (N-1
    ``ppermute`` shifts instead of the all-to-all, no self copy), and their ``bare_*`` collectives,
  * baseline: a bare ``psum_scatter`` of the same ``[T, 128, 512]`` float32 partials,
  * ``merge_auto`` rows: the variant ``dcp.auto_method`` picks for a packed producer at each T
    (the headline), and ``auto crossover`` rows: the largest T (from T = 1 up) at which
    ``merge_prs`` / ``merge_gather`` beat ``merge_packed`` here, against the one
    ``dcp.AUTO_RS_MAX_BYTES`` / ``dcp.AUTO_GATHER_MAX_BYTES`` implies (the value to set there).
Each is timed as ``K`` chained iterations inside one jitted ``shard_map`` loop (iteration ``i+1``
reads one element written from iteration ``i``'s result; the whole result is loop-carried, so it
is computed whole), so the numbers are device time per merge, not Python dispatch.  Every
(variant, T) is compiled and warmed up first; then ``ROUNDS`` rounds each time every T (ascending
in even rounds, descending in odd ones) and at each T every variant back to back in an order
rotated per round, ``REPS`` calls each.  A row's value is the median of all its calls, and the
.md's "spread" table adds min, max and the median over rounds of the per-round ratio to the bare
reduce-scatter of the same round (paired: drift between rounds cancels).  Target: merge <= 1.15 x
the bare reduce-scatter (``baseline_ratio >= 1/1.15``).  Row names say the collectives and the
bytes each rank sends.  ``HLO ...`` rows (and ``dcp-hlo-*.txt`` files in ``--out``) give
each variant's budget from the compiled HLO at T = 64: kernels, collectives, HBM bytes outside
the collectives.  Predictions and findings: benchmarks/NOTES.md, "DCP".

``--kinds a,b`` / ``--sizes 1,2`` / ``--rounds R`` / ``--merge-only`` narrow a run, ``--label L``
names its files ``dcp-L-<gpu>.*``; the title records ``XLA_FLAGS``.  ``gpu_run.sh dcp@N`` runs it
twice: XLA's defaults, then with ``dcp.COMMAND_BUFFER_XLA_FLAG`` (collectives in CUDA graphs).

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

# variant -> (dcp.merge method or None, input layout, collectives, what it is)
KINDS = {
    "bare": (None, "flat", "1 reduce-scatter", "bare psum_scatter of out (the baseline)"),
    "merge_rs": ("reduce_scatter", "flat", "all-gather + reduce-scatter",
                 "SPEC: all-gather LSE, scale, psum_scatter"),
    "merge_a2a": ("all_to_all", "flat", "2 all-to-all", "all_to_all out and lse, merge after"),
    "merge_a2a_packed": ("all_to_all_packed", "flat", "1 all-to-all",
                         "pack [out|lse] rows (copy), all_to_all, merge after"),
    "merge_packed": ("packed", "packed", "1 all-to-all",
                     "producer-packed chunk-major [N,T,h*(Dv+1)], whole-block all_to_all, "
                     "one merge pass"),
    "merge_gather": ("packed_gather", "packed", "1 all-gather",
                     "producer-packed chunk-major, all_gather of all of it (N x the bytes), "
                     "merge of the own chunk"),
    "merge_prs": ("packed_rs", "packed", "1 reduce-scatter",
                  "producer-packed chunk-major, chunks put in zero [N,N,T,w] slots, psum_scatter "
                  "(N x the bytes, exact: x + 0), merge"),
    "bare_a2a": (None, "packed", "1 all-to-all",
                 "bare all_to_all of the packed bytes (merge_packed's collective alone)"),
    "bare_ag": (None, "packed", "1 all-gather",
                "bare all_gather of the packed bytes (merge_gather's collective alone)"),
    "bare_prs": (None, "slots", "1 reduce-scatter",
                 "bare psum_scatter of the [N,N,T,w] slot buffer (merge_prs's collective alone)"),
    "merge_par": (None, "packed", "1 all-reduce",
                  "producer-packed chunk-major, own partials in slot (own rank) of a zero "
                  "[N,N,T,w] buffer, psum (all-reduce: every rank gets every partial, exact), "
                  "merge of the own chunk"),
    "bare_par": (None, "slots", "1 all-reduce",
                 "bare psum of the [N,N,T,w] slot buffer (merge_par's collective alone)"),
    "merge_cp": (None, "packed", "N-1 collective-permutes",
                 "producer-packed chunk-major, chunk (rank+s) sent by ppermute shift s = 1..N-1 "
                 "(no self copy through the collective), merge of the own chunk + received"),
    "bare_cp": (None, "packed", "N-1 collective-permutes",
                "bare ppermutes of merge_cp (its collectives alone)"),
}
MERGES = ("merge_rs", "merge_a2a", "merge_a2a_packed", "merge_packed", "merge_gather",
          "merge_prs", "merge_par", "merge_cp")
BARES = ("bare_a2a", "bare_ag", "bare_prs", "bare_par", "bare_cp")
# measured once (2 x H200, session 3: both lost at every T; benchmarks/NOTES.md) and timed only
# when named by --kinds; check_merge still checks them
EXPERIMENTS = ("merge_par", "bare_par", "merge_cp", "bare_cp")
# the small-T transports and the dcp table that decides when auto picks each
SMALL = {"merge_prs": "AUTO_RS_MAX_BYTES", "merge_gather": "AUTO_GATHER_MAX_BYTES"}
ROUNDS, REPS = 8, 3  # GPU run; --quick: 2, 2


def sent_bytes(kind: str, T: int, n: int) -> int:
    """Bytes one rank sends over the links per merge (ring/pairwise: (N-1)/N of a buffer)."""
    o, lse = T * HEADS * DV * 4, T * HEADS * 4
    if kind == "bare":
        return o * (n - 1) // n
    if kind == "merge_rs":
        return (o * (n - 1) // n) + lse * (n - 1)  # reduce-scatter + all-gather of the LSEs
    if kind in ("merge_gather", "bare_ag"):
        return (o + lse) * (n - 1)  # ring all-gather: the whole packed buffer to N-1 ranks
    if kind in ("merge_prs", "bare_prs"):
        return (o + lse) * (n - 1)  # reduce-scatter of the N x larger slot buffer: (N-1)/N of it
    if kind in ("merge_cp", "bare_cp"):
        return (o + lse) * (n - 1) // n  # the all-to-all's bytes, without the self chunk
    if kind in ("merge_par", "bare_par"):
        return 2 * (o + lse) * (n - 1)  # ring all-reduce of the N x buffer: 2 (N-1)/N of it
    return (o + lse) * (n - 1) // n  # all-to-alls: N-1 of N chunks of [out | lse] leave the rank


def _one(kind: str, axis: str, n: int):
    """The per-rank merge of ``kind`` on its input layout: (x, lse) -> (out, lse)."""
    method, layout, _, _ = KINDS[kind]

    def one(x, l):
        if kind == "bare":
            r = lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True)
            return r, l[:, :r.shape[1]]
        h = HEADS // n
        if kind == "bare_a2a":
            g = lax.all_to_all(x, axis, 0, 0, tiled=True)
            return g[0, :, :h * DV].reshape(-1, h, DV), g[1 % n, :, h * DV:]
        if kind == "bare_ag":
            g = lax.all_gather(x, axis, axis=0, tiled=False)  # [N, N, T, h*(DV+1)]
            return g[0, 0, :, :h * DV].reshape(-1, h, DV), g[1 % n, 0, :, h * DV:]
        if kind == "bare_prs":
            g = lax.psum_scatter(x, axis, scatter_dimension=0, tiled=False)  # [N, T, h*(DV+1)]
            return g[0, :, :h * DV].reshape(-1, h, DV), g[1 % n, :, h * DV:]
        if kind == "bare_par":
            g = lax.psum(x, axis)  # [N (source slot), N (chunk), T, h*(DV+1)]
            return g[0, 0, :, :h * DV].reshape(-1, h, DV), g[1 % n, 0, :, h * DV:]
        if kind in ("merge_cp", "bare_cp"):
            me = lax.axis_index(axis)
            got = [lax.dynamic_index_in_dim(x, me, 0, keepdims=False)]  # [T, w]: shift 0
            for sh in range(1, n):  # rank j sends its chunk (j + sh) to rank j + sh
                send = lax.dynamic_index_in_dim(x, (me + sh) % n, 0, keepdims=False)
                got.append(lax.ppermute(send, axis, [(j, (j + sh) % n) for j in range(n)]))
            if kind == "bare_cp":
                return got[-1][:, :h * DV].reshape(-1, h, DV), got[0][:, h * DV:]
            B = x.shape[1]  # got[sh] came from rank (me - sh) % n; the merge is order-free
            return dcp._merge_sources(lambda r: got[r][:, :h * DV].reshape(B, h, DV),
                                      lambda r: got[r][:, h * DV:], n, "e")
        if kind == "merge_par":
            # [N (source slot), N (chunk), T, w]: own (sanitized) partials in the own slot
            slots = jnp.swapaxes(dcp._slot_buffer(x, axis, n, h, DV), 0, 1)
            every = lax.psum(slots, axis)  # every rank: every source's every chunk, exactly
            got = lax.dynamic_index_in_dim(every, lax.axis_index(axis), 1, keepdims=False)
            B = x.shape[1]
            return dcp._merge_sources(lambda r: got[r, :, :h * DV].reshape(B, h, DV),
                                      lambda r: got[r, :, h * DV:], n, "e")
        if layout == "packed":
            return dcp.merge_packed(x, axis, "e", dv=DV, collective={
                "merge_gather": "all_gather", "merge_prs": "reduce_scatter"}.get(
                    kind, "all_to_all"))
        return dcp.merge(x, l, axis, "e", method=method)
    return one


def _inputs(kind, o, lse, n):
    """Per-rank inputs of ``kind``: flat out f32[N, T, H, DV], packed f32[N, N, T, h*(DV+1)]
    or slots f32[N, N (dest), N (slot), T, h*(DV+1)] (rank j's chunks in slot j, zeros
    elsewhere: what merge_prs sends)."""
    if KINDS[kind][1] == "flat":
        return o, lse
    packed = jax.jit(jax.vmap(lambda a, b: dcp.pack_partials(a, b, n)))(o, lse)
    if KINDS[kind][1] == "slots":
        eye = jnp.eye(n, dtype=bool)[:, None, :, None, None]  # [rank, 1, slot, 1, 1]
        return jnp.where(eye, jnp.nan_to_num(packed, neginf=-jnp.inf)[:, :, None], 0.0), lse
    return packed, lse


def _loop(kind: str, mesh, iters: int):
    """jit(shard_map(K chained merges)) of ``kind``.

    Iteration ``i+1``'s input takes one element of iteration ``i``'s result, so nothing is hoisted
    or merged across iterations.  The whole result is also loop-carried and returned after the
    loop (never read inside it, so it costs no copy): it is computed and written whole every
    iteration (an elementwise merge whose result fed only a slice would otherwise be fused into
    that slice and computed for one element; an ``optimization_barrier`` does not prevent that).
    """
    axis = "dcp"
    n = mesh.shape[axis]
    one = _one(kind, axis, n)

    def body(x, l):
        x, l = x[0], l[0]
        r0, rl0 = jax.eval_shape(one, x, l)
        r0, rl0 = jnp.zeros(r0.shape, r0.dtype), jnp.zeros(rl0.shape, rl0.dtype)

        def step(_, c):
            x, l, _, _ = c
            r, rl = one(x, l)
            x = x.at[(0,) * x.ndim].set(r[0, 0, 0])
            l = l.at[0, 1].set(rl[0, 0])
            return x, l, r, rl

        _, _, r, rl = lax.fori_loop(0, iters, step, (x, l, r0, rl0))
        return r[None], rl[None]

    f = dcp.shard_map(body, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=(P(axis), P(axis)))
    return jax.jit(f)


def _auto_kind(T: int, n: int) -> str:
    """The benchmark variant of ``dcp.auto_method`` for a packed producer at T."""
    m = dcp.auto_method(T, HEADS, DV, n, packed_input=True)
    return {"packed_gather": "merge_gather", "packed": "merge_packed", "packed_rs": "merge_prs",
            "all_to_all_packed": "merge_a2a_packed", "reduce_scatter": "merge_rs"}[m]


def bench_merge(mesh, sizes, iters, reps, rounds, only=None):
    """Times every (variant, T): all compiled and warmed up first, then ``rounds`` interleaved
    rounds (see the module docstring).  ``iters`` chained merges per call (doubled for T <= 16
    so that a call's dispatch + sync is < ~1% of it).

    Returns ``(rows, stats, spread_md)``: ``stats[T][kind]`` = dict of per-merge seconds
    ``median`` / ``min`` / ``max`` over all calls, ``rounds`` (per-round medians), ``paired``
    (median over rounds of this round's bare / this round's kind: a baseline_ratio) and
    ``paired_ratio`` (median over rounds of kind / bare).  ``only``: the variants to time (the
    bare baseline always; default all).
    """
    import statistics
    import time

    n = mesh.shape["dcp"]
    rng = np.random.default_rng(0)
    sh = jax.sharding.NamedSharding(mesh, P("dcp"))
    def wanted(k):
        return k in only if only is not None else k not in EXPERIMENTS
    merges = tuple(k for k in MERGES if wanted(k))
    bares = tuple(k for k in BARES if wanted(k))
    kinds = ("bare",) + merges + bares
    prepared = {}
    for T in sizes:
        o = jnp.asarray(rng.normal(size=(n, T, HEADS, DV)).astype(np.float32))
        lse = jnp.asarray((rng.normal(size=(n, T, HEADS)) * 4).astype(np.float32))
        lse = lse.at[0, 0, :].set(-jnp.inf)  # an empty rank for one token: the -inf path runs
        k = iters * 2 if T <= 16 else iters
        for kind in kinds:
            x, l = (jax.device_put(a, sh) for a in _inputs(kind, o, lse, n))
            prepared[(T, kind)] = (_loop(kind, mesh, k), x, l, k)
    t0 = time.perf_counter()
    for f, x, l, _ in prepared.values():  # compile + warm up everything before any timing
        for _ in range(2):
            jax.block_until_ready(f(x, l))
    print(f"compiled + warmed up {len(prepared)} loops in {time.perf_counter() - t0:.1f} s",
          flush=True)
    calls = {key: [] for key in prepared}
    per_round = {key: [] for key in prepared}
    t0 = time.perf_counter()
    for rd in range(rounds):
        for T in (sizes if rd % 2 == 0 else sizes[::-1]):
            order = kinds[rd % len(kinds):] + kinds[:rd % len(kinds)]
            for kind in order:
                f, x, l, k = prepared[(T, kind)]
                ts = []
                for _ in range(reps):
                    t1 = time.perf_counter()
                    jax.block_until_ready(f(x, l))
                    ts.append((time.perf_counter() - t1) / k)
                calls[(T, kind)] += ts
                per_round[(T, kind)].append(statistics.median(ts))
    print(f"{rounds} rounds x {reps} calls of every loop in {time.perf_counter() - t0:.1f} s",
          flush=True)
    stats = {}
    for (T, kind), ts in calls.items():
        pr, bare = per_round[(T, kind)], per_round[(T, "bare")]
        stats.setdefault(T, {})[kind] = {
            "median": statistics.median(ts), "min": min(ts), "max": max(ts), "rounds": pr,
            "paired": statistics.median(b / v for b, v in zip(bare, pr)),
            "paired_ratio": statistics.median(v / b for b, v in zip(bare, pr))}

    rows, spread = [], []
    for T in sizes:
        st = stats[T]
        t = {kind: st[kind]["median"] for kind in kinds}
        nbytes = T * HEADS * DV * 4  # per-rank partial output bytes

        def extra(kind, st=st, T=T):
            """JSON-only fields of a row: the spread of ``kind``'s timings at T."""
            return {"min_us": st[kind]["min"] * 1e6, "max_us": st[kind]["max"] * 1e6,
                    "round_medians_us": [v * 1e6 for v in st[kind]["rounds"]],
                    "paired_baseline_ratio": st[kind]["paired"],
                    "baseline_min_us": st["bare"]["min"] * 1e6,
                    "calls": len(calls[(T, kind)]), "iters_per_call": prepared[(T, kind)][3]}

        for kind in merges:
            r = common.row(
                f"{kind} T={T} x {HEADS}h x {DV} f32 (N={n}; {KINDS[kind][2]}, sends "
                f"{sent_bytes(kind, T, n) / 2**20:.3f} MiB/rank)",
                t[kind] * 1e6, "us", baseline=t["bare"] * 1e6,
                target={"baseline_ratio": round(1 / 1.15, 4)}, higher_is_better=False)
            rows.append({**r, **extra(kind)})
        ak = _auto_kind(T, n)
        r = None if ak not in kinds else common.row(f"merge_auto T={T} (N={n}; dcp.auto_method picks {ak} for a packed "
                       f"producer) vs bare psum_scatter", t[ak] * 1e6, "us",
                       baseline=t["bare"] * 1e6, target={"baseline_ratio": round(1 / 1.15, 4)},
                       higher_is_better=False)
        if r is not None:
            rows.append({**r, **extra(ak), "picks": ak})
        for kind in bares:
            r = common.row(f"{kind} T={T} (packed bytes, no merge; {KINDS[kind][2]}, sends "
                           f"{sent_bytes(kind, T, n) / 2**20:.3f} MiB/rank) vs bare "
                           f"psum_scatter", t[kind] * 1e6, "us", baseline=t["bare"] * 1e6,
                           higher_is_better=False)
            rows.append({**r, **extra(kind)})
        rows.append({**common.row(f"bare psum_scatter T={T} ({nbytes / 2**20:.2f} MiB/rank, "
                                  f"sends {sent_bytes('bare', T, n) / 2**20:.3f} MiB) bus GB/s",
                                  nbytes * (n - 1) / n / t["bare"] / 1e9, "GB/s"),
                     **extra("bare")})
        print(f"T={T:4d}  bare {t['bare']*1e6:7.1f} us (min {st['bare']['min']*1e6:6.1f})  " +
              "  ".join(f"{k} {t[k]*1e6:6.1f} ({t[k]/t['bare']:.3f}x, paired "
                        f"{st[k]['paired_ratio']:.3f}x)" for k in merges + bares) +
              f"  auto -> {ak}", flush=True)
        for kind in kinds:
            v = st[kind]
            spread.append(f"| {T} | {kind} | {v['median']*1e6:.1f} | {v['min']*1e6:.1f} | "
                          f"{v['max']*1e6:.1f} | {t[kind] / t['bare']:.3f} | "
                          f"{v['paired_ratio']:.3f} | {v['min'] / st['bare']['min']:.3f} |")
    # the crossovers: the largest T (from T = smallest) up to which each small-T transport beat
    # merge_packed; the table's T: the largest T at which auto picks it
    for kind, table_name in SMALL.items():
        if kind not in kinds or "merge_packed" not in kinds:
            continue
        measured = 0
        for T in sizes:
            if stats[T][kind]["median"] < stats[T]["merge_packed"]["median"]:
                measured = T
            else:
                break
        table = max([T for T in sizes if _auto_kind(T, n) == kind], default=0)
        value = measured * HEADS * DV * 4
        rows.append(common.row(
            f"auto crossover {kind} N={n}: largest T (x {HEADS}h x {DV}) up to which {kind} beat "
            f"merge_packed here (baseline: the T up to which dcp.{table_name} picks it; agrees "
            f"with dcp.{table_name}[{n}] = {value} B)", float(measured), "tokens",
            baseline=float(table) or None))
        rows[-1].update(target=f"value == {table} (the table agrees)",
                        meets_target=measured == table, table_value=value)
        print(f"auto crossover: {kind} beat merge_packed up to T={measured}; the table says "
              f"T={table} ({'agrees' if measured == table else f'UPDATE dcp.{table_name}'}: "
              f"{{{n}: {value}}} matches this run)", flush=True)
    spread_md = ("\n## Timing spread (us per merge; ratios to the bare psum_scatter)\n\n"
                 f"{rounds} interleaved rounds x {reps} calls; median / min / max over all "
                 "calls; 'paired' = median over rounds of the per-round ratio; 'of mins' = min / "
                 "bare's min.\n\n| T | variant | median | min | max | ratio | paired | of mins "
                 "|\n|---|---|---|---|---|---|---|---|\n" + "\n".join(spread) + "\n")
    return rows, stats, spread_md


# ---------------------------------------------------------------------------------------------
# The byte / launch budget of each variant, read from the compiled (optimized) HLO

_DT = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1, "u8": 1, "s8": 1,
       "f64": 8, "s64": 8, "u64": 8}
_COLL = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_FREE = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
         "replica-id", "after-all")


def _shape_bytes(text: str) -> int:
    import re
    return sum(_DT.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text))


def _computations(text: str) -> dict:
    """HLO module text -> {computation name: [instruction lines]} (ENTRY under "ENTRY")."""
    import re
    comps, cur = {}, None
    for ln in text.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", ln)
        if m and not ln.startswith(" "):
            cur = "ENTRY" if m.group(1) else m.group(2)
            comps[cur] = []
        elif ln.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(ln)
    return comps


_INSTR = (r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*?)\)(?:,|$)")


def _param_reads(comp_lines) -> dict:
    """Per parameter index of a fused computation: bytes it reads when every use is a slice
    (the slice results), else None (the whole operand)."""
    import re
    params, uses = {}, {}
    for ln in comp_lines:
        m = re.match(_INSTR, ln)
        if not m:
            continue
        name, shape, op, args = m.groups()
        if op == "parameter":
            params[name] = int(args)
            continue
        for a in re.findall(r"%([\w.\-]+)", args):
            uses.setdefault(a, []).append((op, _shape_bytes(shape)))
    out = {}
    for name, idx in params.items():
        u = uses.get(name, [])
        out[idx] = (sum(b for _, b in u) if u and all(op in ("slice", "dynamic-slice")
                                                      for op, _ in u) else None)
    return out


def hlo_budget(text: str) -> dict:
    """Counts in the ENTRY computation of an optimized HLO module.

    Returns ``{"collectives": {op: count}, "kernels": k, "hbm_bytes": b}``: ``kernels`` = top-level
    fusions/copies/other data ops (each a launch on GPU), ``hbm_bytes`` = bytes of their results
    plus the operand bytes they read (an operand only sliced inside a fusion counts its slices;
    otherwise whole: an upper bound of the HBM traffic outside the collectives).
    """
    import re
    comps = _computations(text)
    shapes, coll, kernels, hbm = {}, {}, 0, 0
    for ln in comps.get("ENTRY", []):
        m = re.match(_INSTR, ln)
        if not m:
            continue
        name, shape, op, args = m.groups()
        shapes[name] = _shape_bytes(shape)
        base = op[:-6] if op.endswith("-start") else op
        if op.endswith("-done") or op.endswith("-update") or op in _FREE:
            continue
        if op == "async-start":  # a wrapped async op: name what it wraps
            c = re.search(r"calls=%([\w.\-]+)", ln)
            inner = " ".join(comps.get(c.group(1), [])) if c else ""
            base = next((k for k in _COLL if f" {k}(" in inner or f" {k}-start(" in inner), op)
        if base in _COLL:
            coll[base] = coll.get(base, 0) + 1
            continue
        kernels += 1
        reads = {}
        c = re.search(r"calls=%([\w.\-]+)", ln)
        if op == "fusion" and c and c.group(1) in comps:
            reads = _param_reads(comps[c.group(1)])
        operands = re.findall(r"%([\w.\-]+)", args)
        hbm += shapes[name] + sum(
            min(reads[i], shapes.get(a, 0)) if reads.get(i) is not None else shapes.get(a, 0)
            for i, a in enumerate(operands))
    return {"collectives": coll, "kernels": kernels, "hbm_bytes": hbm}


def budget_rows(mesh, T: int, out_dir: str):
    """Compiles one merge of every variant at ``T`` and reports its HLO budget (rows + files)."""
    n = mesh.shape["dcp"]
    rows, lines = [], []
    o = jnp.zeros((n, T, HEADS, DV), jnp.float32)
    lse = jnp.zeros((n, T, HEADS), jnp.float32)
    os.makedirs(out_dir, exist_ok=True)
    for kind in KINDS:
        x, l = _inputs(kind, o, lse, n)
        one = _one(kind, "dcp", n)
        f = jax.jit(dcp.shard_map(lambda a, b: one(a[0], b[0]), mesh=mesh,
                                  in_specs=(P("dcp"), P("dcp")), out_specs=(P(None, "dcp"),) * 2))
        text = f.lower(x, l).compile().as_text()
        with open(os.path.join(out_dir, f"dcp-hlo-{kind}-T{T}-{common.gpu_name()}.txt"), "w") as fh:
            fh.write(text)
        b = hlo_budget(text)
        coll = ", ".join(f"{v} {k}" for k, v in sorted(b["collectives"].items())) or "none"
        line = (f"{kind:17s} T={T}: {b['kernels']} kernels, collectives: {coll}; HBM outside "
                f"collectives <= {b['hbm_bytes'] / 2**20:.1f} MiB "
                f"(out = {T * HEADS * DV * 4 / 2**20:.1f} MiB/rank)")
        lines.append(line)
        print(line, flush=True)
        rows.append(common.row(f"HLO {kind} T={T} (N={n}): {b['kernels']} kernels, {coll}; HBM "
                               f"MiB touched outside collectives (upper bound)",
                               b["hbm_bytes"] / 2**20, "MiB"))
    with open(os.path.join(out_dir, f"dcp-hlo-{common.gpu_name()}.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return rows


def check_merge(mesh, kinds=MERGES):
    """The benchmarked merges are the merge: compare with merge_partials on gathered partials."""
    n = mesh.shape["dcp"]
    rng = np.random.default_rng(1)
    o = rng.normal(size=(n, 4, HEADS, DV)).astype(np.float32)
    lse = (rng.normal(size=(n, 4, HEADS)) * 4).astype(np.float32)
    lse[0, 0] = -np.inf
    o[0, 0] = np.nan  # an empty rank's garbage must not leak
    want_o, want_l = dcp.merge_partials(np.where(np.isfinite(lse)[..., None], o, 0), lse)
    for kind in kinds:
        x, l = _inputs(kind, jnp.asarray(o), jnp.asarray(lse), n)
        one = _one(kind, "dcp", n)
        f = dcp.shard_map(lambda a, b: one(a[0], b[0]), mesh=mesh,
                          in_specs=(P("dcp"), P("dcp")), out_specs=(P(None, "dcp"),) * 2)
        got_o, got_l = f(x, l)
        err = float(jnp.max(jnp.abs(got_o - want_o)) / jnp.max(jnp.abs(want_o)))
        assert err < 1e-5, (kind, err)
        assert bool(jnp.all(jnp.isfinite(got_o))), kind


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
    p = common.parser("dcp")
    p.add_argument("--sizes", help="comma-separated T values (default 1..256)")
    p.add_argument("--kinds", help=f"comma-separated variants besides bare (default all: "
                   f"{','.join(MERGES + BARES)})")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {ROUNDS})")
    p.add_argument("--merge-only", action="store_true",
                   help="only the merge timings (no HLO budget, no capacity rows)")
    p.add_argument("--label", default="", help="appended to the title and the file stem "
                   "(e.g. the XLA_FLAGS of an experiment)")
    args = p.parse_args(argv)
    devs = jax.devices()
    if len(devs) < 2:
        raise SystemExit("benchmarks.dcp needs >= 2 devices (GPUs, or --quick on CPU)")
    mesh = dcp.make_mesh(len(devs))
    print(f"devices: {len(devs)} x {devs[0].device_kind}", flush=True)
    sizes = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    only = None
    if args.kinds:
        only = set(args.kinds.split(","))
        unknown = only - set(MERGES + BARES)
        if unknown:
            raise SystemExit(f"--kinds: unknown variants {sorted(unknown)}")
    check_merge(mesh, MERGES if only is None else tuple(k for k in MERGES if k in only))
    iters, reps, rounds = (4, 2, 2) if args.quick else (100, REPS, ROUNDS)
    rounds = args.rounds or rounds
    rows = [] if args.merge_only else budget_rows(mesh, 16 if args.quick else 64, args.out)
    merge_rows, _, spread_md = bench_merge(mesh, sizes, iters, reps, rounds, only)
    rows += merge_rows + ([] if args.merge_only else capacity_rows(mesh, args.quick))
    suite = "dcp" + (f"-{args.label}" if args.label else "")
    stem = common.write_results(rows, args.out, suite, title=f"DCP merge and capacity "
                                f"(N={len(devs)})" + (f"; {args.label}" if args.label else "")
                                + (f"; XLA_FLAGS={os.environ['XLA_FLAGS']}"
                                   if os.environ.get("XLA_FLAGS") else ""))
    with open(stem + ".md", "a") as fh:
        fh.write(spread_md)
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
