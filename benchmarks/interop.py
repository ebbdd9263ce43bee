"""Benchmarks of jaxkv.interop (``python -m benchmarks.interop --out DIR [--quick]``).

Rows (BENCH.md format, ``DIR/interop-<gpu>.json/.md/.png``):

* ``to_torch <size>`` / ``from_torch <size>``: microseconds per DLPack exchange (median), for
  arrays from 4 KiB to 1 GiB; target <= 20 us and size-independent.  Baseline: the raw
  ``torch.from_dlpack`` / ``jax.dlpack.from_dlpack`` call (``baseline_ratio`` = raw / ours).
* ``exchange size dependence``: the largest over the smallest median, across sizes (target <= 2).
* ``step ...`` rows: where the time goes.  Exchange: each step of ``to_torch`` / ``from_torch``
  timed alone (checks, stream lookup, jaxlib capsule, torch capsule, handshake, registry,
  destruction) and the public path with the fast path off.  Retract: the plan (ms), the pinned
  allocation (ms), the transfer with a precomputed plan, and the copies alone (GB/s against the
  same ceilings).
* ``get_cpu_copy`` / ``load_cpu_copy``: GB/s of the torch pool's retract / resume of a batch of
  DSv4-Flash requests, against a pinned host copy of the same bytes measured in the same run (the
  ceiling; target >= 0.90) and against the seed's path (per pool and layer: gather, then a
  pageable ``.cpu()``; resume: pageable ``.to(device)`` then scatter; target >= 4x).

Each part (``exchange``: the size sweep; ``steps``: the per-step rows; ``retract``: the torch
pool) runs in its own child process with the fast DLPack paths on.  If a child dies (a crash in
native code, e.g. the double free jaxlib 0.11.2 + CUDA produced with the removed direct_stream
import), a ``<part>: child crashed ...`` row (target not met) records it and the part is run again
with ``JAXKV_DLPACK_FAST=0`` (the public DLPack API; its rows carry ``[fast paths off]``), so one
failure never costs the other parts' numbers.  ``--parts exchange,retract`` runs a subset.

On the GPU machine::

    export XLA_PYTHON_CLIENT_PREALLOCATE=false TRITON_CACHE_DIR=/tmp/triton-cache
    python -m benchmarks.interop --out benchmarks/results
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxkv  # noqa: E402
from benchmarks import common  # noqa: E402
from jaxkv import interop as I  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _wall(fn, iters: int, warmup: int = 1) -> float:
    """Median seconds of fn() with device syncs around it."""
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _size_name(n: int) -> str:
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n // s} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# DLPack exchange


def _interleaved_us(fns: dict, rounds: int, iters: int) -> dict:
    """Median microseconds of each ``fns[k]()``; rounds interleave the functions, so a drift of
    the machine (clocks, other processes) hits every function alike."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            ts = samples[k]
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                fn()
                ts.append(time.perf_counter_ns() - t0)
    return {k: statistics.median(v) / 1e3 for k, v in samples.items()}


def _busy_us(fn, rounds: int, iters: int) -> tuple[float, float]:
    """Median microseconds of ``fn()`` while torch's current stream has pending work (a
    ``torch.cuda._sleep`` of ~0.1 s enqueued before each round of ``iters`` calls), and the
    fraction of those calls that took from_torch's handshake branch."""
    D = I.dlpack
    ts, calls, hand = [], 0, 0
    for _ in range(10):
        fn()
    torch.cuda._sleep(1)  # the first launch loads the kernel and blocks until the device is idle
    torch.cuda.synchronize()
    for _ in range(rounds):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles, pending on the current stream
        h0 = D.IMPORT_BRANCHES["handshake"]
        keep = []  # results stay alive: destroying an imported array waits for its ready event,
        for _ in range(iters):  # i.e. for the sleep, which would leave the stream idle
            t0 = time.perf_counter_ns()
            keep.append(fn())
            ts.append(time.perf_counter_ns() - t0)
        hand += D.IMPORT_BRANCHES["handshake"] - h0
        calls += iters
        torch.cuda.synchronize()
        del keep
    return statistics.median(ts) / 1e3, hand / calls


def _set_fast(on: bool | tuple) -> tuple:
    """Sets both fast paths (a bool, or a tuple from an earlier call); returns the old state."""
    old = (I.dlpack._EXPORT["enabled"], I.dlpack._FAST["enabled"])
    I.dlpack._EXPORT["enabled"], I.dlpack._FAST["enabled"] = (
        on if isinstance(on, tuple) else (on, on))
    return old


def bench_exchange(quick: bool) -> list[dict]:
    sizes = [1 << 12, 1 << 20, 1 << 24] if quick else [1 << 12, 1 << 20, 1 << 26, 1 << 30]
    rounds, iters = (4, 100) if quick else (10, 300)
    dev = jax.devices()[0]
    pairs = []
    for n in sizes:
        x = jax.device_put(jnp.zeros((n // 2,), jnp.bfloat16), dev)
        x.block_until_ready()
        t = torch.zeros(n // 2, dtype=torch.bfloat16, device=DEV)
        pairs.append((n, x, t))
    fns = {}
    for n, x, t in pairs:  # default-argument binding: one closure per array
        fns[("to", n)] = lambda x=x: I.to_torch(x)
        fns[("raw_to", n)] = lambda x=x: torch.from_dlpack(x)
        fns[("from", n)] = lambda t=t: I.from_torch(t)
        fns[("raw_from", n)] = lambda t=t: jax.dlpack.from_dlpack(t)
    _sync()
    before = dict(I.dlpack.IMPORT_BRANCHES)
    res = _interleaved_us(fns, rounds, iters)
    idle = I.dlpack.IMPORT_BRANCHES["idle"] - before["idle"]
    hand = I.dlpack.IMPORT_BRANCHES["handshake"] - before["handshake"]
    rows, medians = [], []
    for n, _, _ in pairs:
        medians += [res[("to", n)], res[("from", n)]]
        rows.append(common.row(f"to_torch {_size_name(n)}", res[("to", n)], "us",
                               baseline=res[("raw_to", n)], target={"value": 20.0},
                               higher_is_better=False))
        rows.append(common.row(f"from_torch {_size_name(n)}", res[("from", n)], "us",
                               baseline=res[("raw_from", n)], target={"value": 20.0},
                               higher_is_better=False))
    for name, ms in (("to_torch", medians[0::2]), ("from_torch", medians[1::2])):
        rows.append(common.row(f"{name} size dependence (max/min over sizes)", max(ms) / min(ms),
                               "x", target={"value": 2.0}, higher_is_better=False))
    if CUDA:  # which from_torch branch the sweep took (idle stream: no handshake)
        rows.append(common.row("from_torch idle-branch share in the sweep (CUDA imports)",
                               idle / max(1, idle + hand), "fraction"))
        t = pairs[1][2]  # 1 MiB, with torch's current stream kept busy: the handshake branch
        us, took = _busy_us(lambda: I.from_torch(t), rounds, iters)
        rows.append(common.row("from_torch 1 MiB, torch stream busy (handshake branch)", us, "us",
                               baseline=res[("raw_from", 1 << 20)], target={"value": 20.0},
                               higher_is_better=False))
        rows.append(common.row("from_torch busy-stream calls that took the handshake branch",
                               took, "fraction", target={"value": 1.0}))
    del pairs, fns
    gc.collect()
    return rows


def bench_steps(quick: bool) -> list[dict]:
    rounds, iters = (4, 100) if quick else (10, 300)
    n = 1 << 20
    x = jax.device_put(jnp.zeros((n // 2,), jnp.bfloat16), jax.devices()[0])
    x.block_until_ready()
    t = torch.zeros(n // 2, dtype=torch.bfloat16, device=DEV)
    return _exchange_steps(x, t, rounds, iters)


def _exchange_steps(x, t, rounds: int, iters: int) -> list[dict]:
    """Per-step microseconds of one exchange (1 MiB; the cost does not depend on size), so one
    run shows where the time goes.  Steps are timed alone, in the order the bridge runs them;
    "destroy" = (create and drop) - (create and keep)."""
    D = I.dlpack
    device = next(iter(x.sharding.device_set))
    I.to_torch(x), I.from_torch(t)  # fill the caches, pass the self-checks
    exp_api = D._export_api()
    idx = D._export_index(device)
    stream = D._torch_stream(idx) if idx is not None and idx >= 0 else None
    imp = D._import_api()
    tidx = t.get_device()
    jdev, jstream, dl_type, ext, event, idle = D._import_device(tidx, t, imp[0])
    five = imp[2]
    raw, query, ev_record, ev_wait = D._cuda_api() if CUDA else (None,) * 4

    def to_buffer(cap, stream=jstream):
        return imp[1](cap, jdev, stream, False, dl_type) if five else imp[1](
            cap, jdev, stream, False)

    def handshake():  # what the handshake branch runs (C-level event record + wait)
        if ext is not None:
            cur = D._current_stream(tidx, raw)
            with D._handshake_lock:
                ev_record(event, cur)
                ev_wait(event, ext)

    def idle_check():  # what both CUDA branches run first
        if ext is not None:
            query(D._current_stream(tidx, raw))

    keep = []
    dummy = torch.empty(0)  # registry timing target under a fake pointer (-1)

    def keep_to():
        keep.append(I.to_torch(x))
        if len(keep) > 256:
            keep.clear()

    def keep_from():
        keep.append(I.from_torch(t))
        if len(keep) > 256:
            keep.clear()

    def public_to():
        old = _set_fast(False)
        try:
            return I.to_torch(x)
        finally:
            _set_fast(old)

    def public_from():
        old = _set_fast(False)
        try:
            return I.from_torch(t)
        finally:
            _set_fast(old)

    fns = {
        "to_torch (total)": lambda: I.to_torch(x),
        "to_torch keep result (no destroy)": keep_to,
        "to_torch public path (fast path off)": public_to,
        "to: checks (type, tracer, deleted, device_set)": lambda: (
            D._check_jax_array(x), x.sharding.device_set),
        "to: torch current stream lookup": (lambda: D._torch_stream(idx))
        if idx is not None and idx >= 0 else (lambda: None),
        "to: jaxlib buffer_to_dlpack_managed_tensor (capsule dropped)":
            lambda: exp_api[0](x, stream=stream),
        "to: capsule + torch._C._from_dlpack": lambda: exp_api[1](exp_api[0](x, stream=stream)),
        "to: pointer check + registry": lambda: (int(x.unsafe_buffer_pointer()) == 0, D._record(
            D._exported, -1, dummy)),
        "from_torch (total)": lambda: I.from_torch(t),
        "from_torch keep result (no destroy)": keep_from,
        "from_torch public path (fast path off)": public_from,
        "from: handshake (event record + JAX stream wait)": handshake,
        "from: torch._C._to_dlpack (capsule dropped)": lambda: torch._C._to_dlpack(t),
        "from: capsule + jaxlib dlpack_managed_tensor_to_buffer":
            lambda: to_buffer(torch._C._to_dlpack(t)),
        "from: _fast_import (handshake + capsule + import)": lambda: D._fast_import(t),
        "from: idle check (current stream lookup + cudaStreamQuery)": idle_check,
        "from: capsule + jaxlib import, stream=None (idle branch)":
            lambda: to_buffer(torch._C._to_dlpack(t), None),
    }
    if not (CUDA and idle):  # no branches on CPU; never call jaxlib with a refused stream=None
        fns = {k: v for k, v in fns.items() if "stream=None" not in k}
    if not CUDA:
        fns = {k: v for k, v in fns.items() if "idle" not in k}
    if not (D._FAST["enabled"] and D._EXPORT["enabled"]):  # fast paths off (JAXKV_DLPACK_FAST=0
        # or switched off): time only what the bridge runs, never jaxlib's entry points directly
        fns = {k: v for k, v in fns.items() if not k.startswith(("to:", "from:"))}
    _sync()
    res = _interleaved_us(fns, rounds, iters)
    keep.clear()
    D._exported.pop(-1, None)
    if "from: _fast_import (handshake + capsule + import)" not in res:
        return [common.row(f"step {k}", v, "us") for k, v in res.items()]
    res["to: destroy tensor (total - keep)"] = res["to_torch (total)"] - res[
        "to_torch keep result (no destroy)"]
    res["from: destroy array (total - keep)"] = res["from_torch (total)"] - res[
        "from_torch keep result (no destroy)"]
    res["from: checks + registry (total - _fast_import)"] = res["from_torch (total)"] - res[
        "from: _fast_import (handshake + capsule + import)"]
    if CUDA:  # the handshake branch, torch's stream kept busy
        res["from_torch (total), torch stream busy (handshake branch)"] = _busy_us(
            lambda: I.from_torch(t), rounds, iters)[0]
        res["from: _fast_import, torch stream busy (handshake branch)"] = _busy_us(
            lambda: D._fast_import(t), rounds, iters)[0]
        res["from: idle branch usable on this device (probe)"] = float(idle)
    return [common.row(f"step {k}", v, "us" if "probe" not in k else "bool")
            for k, v in res.items()]


# ---------------------------------------------------------------------------------------------
# Retract / resume


def _setup_pool(quick: bool):
    geo = jaxkv.dsv4_flash()
    P = geo.page_size
    reqs, tokens = (2, 512) if quick else (128, 4096)
    full_pages = reqs * tokens // P + 1
    swa_pages = reqs * -(-geo.swa_window // P) + 2
    pages = {"swa": swa_pages, "c4": full_pages, "c128": full_pages, "c4_indexer": full_pages,
             "c4_state": swa_pages * geo.c4_ring + 1,
             "c4_indexer_state": swa_pages * geo.c4_ring + 1,
             "c128_state": swa_pages * geo.c128_ring + 1}
    pool = I.DSV4TorchPool(geo, pages, device=DEV, full_size=full_pages * P)
    g = torch.Generator(device=DEV).manual_seed(0)
    for b in pool.buffers:  # random bytes, never zeros
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device=DEV, generator=g))
    full, swa = [], []
    for r in range(reqs):
        pos = np.arange(tokens)
        f = (1 + r * (tokens // P)) * P + pos
        s = np.where(pos >= tokens - geo.swa_window, (1 + r) * P + pos % P, 0)
        full.append(f)
        swa.append(s)
    full = np.concatenate(full).astype(np.int32)
    swa = np.concatenate(swa).astype(np.int32)
    table = pool.full_to_swa_index_mapping
    table[torch.from_numpy(full).long().to(DEV)] = torch.from_numpy(swa).to(DEV)
    return pool, torch.from_numpy(full).to(DEV), reqs, tokens


def _saved_locs(pool, full):
    """Per pool, the distinct valid locations ``get_cpu_copy`` saves (the same bytes)."""
    out = {}
    for name, (loc, valid) in pool._all_locs(full).items():
        out[name] = torch.unique(loc[torch.nonzero(valid).squeeze(1)]).to(torch.int32)
    return out


def _seed_save(pool, locs):
    """The seed's path: per pool and layer, a gather then a pageable ``.cpu()``."""
    out = []
    for p in pool.layout.pools:
        b, a = pool._addr[p.name]
        for layer in range(a.num_layers):
            v, s = pool._gather(b, locs[p.name], a.select((layer,)))
            out.append((v.cpu(), s.cpu()))
    return out


def _seed_load(pool, saved, locs):
    """The seed's resume: per pool and layer, a pageable ``.to(device)`` then a scatter."""
    saved = list(saved)
    for p in pool.layout.pools:
        b, a = pool._addr[p.name]
        for layer in range(a.num_layers):
            v, s = saved.pop(0)
            pool._scatter(b, locs[p.name], v.to(DEV), s.to(DEV), a.select((layer,)))


def bench_retract(quick: bool) -> list[dict]:
    pool, full, reqs, tokens = _setup_pool(quick)
    iters = 2 if quick else 5
    copy = pool.get_cpu_copy(full)
    nbytes = copy.nbytes
    # the ceiling: a pinned copy of the same bytes (D2H and H2D), same run
    dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
    d2h = _wall(lambda: host.copy_(dev_buf, non_blocking=CUDA), iters)
    h2d = _wall(lambda: dev_buf.copy_(host, non_blocking=CUDA), iters)

    def d2h_pieces(size):  # the same bytes in back-to-back copies of ``size`` (per-copy cost)
        for o in range(0, nbytes, size):
            host[o:o + size].copy_(dev_buf[o:o + size], non_blocking=CUDA)

    d2h_pieces_s = {mb: _wall(lambda mb=mb: d2h_pieces(mb << 20), iters) for mb in (64, 256)}
    del dev_buf, host
    gc.collect()
    keep = []

    def save():
        keep.append(pool.get_cpu_copy(full))
        if len(keep) > 1:
            keep.pop(0)

    t_save = _wall(save, iters, warmup=2)  # two pinned blocks alternate in torch's host cache
    t_load = _wall(lambda: pool.load_cpu_copy(copy, full), iters, warmup=2)
    steps = _retract_steps(pool, full, copy, iters)
    locs = _saved_locs(pool, full)
    holder = {}

    def seed_save():
        holder["saved"] = None
        holder["saved"] = _seed_save(pool, locs)

    t_seed_save = _wall(seed_save, iters)
    t_seed_load = _wall(lambda: _seed_load(pool, holder["saved"], locs), iters)
    seed_bytes = sum(v.numel() + s.numel() for v, s in holder["saved"])
    assert seed_bytes == nbytes, (seed_bytes, nbytes)
    del holder
    gc.collect()
    # bit-exactness of what was timed: a reload of the copy changes nothing
    before = [b.clone() for b in pool.buffers]
    pool.load_cpu_copy(pool.get_cpu_copy(full), full)
    exact = all(torch.equal(a, b) for a, b in zip(before, pool.buffers))
    del before
    gb = nbytes / 1e9
    tag = f"{reqs} x {tokens} tokens, {gb:.2f} GB"
    rows = [
        common.row(f"get_cpu_copy ({tag})", gb / t_save, "GB/s", ceiling=gb / d2h,
                   baseline=gb / t_seed_save,
                   target={"ceiling_fraction": 0.90, "baseline_ratio": 4.0}),
        common.row(f"load_cpu_copy ({tag})", gb / t_load, "GB/s", ceiling=gb / h2d,
                   baseline=gb / t_seed_load,
                   target={"ceiling_fraction": 0.90, "baseline_ratio": 4.0}),
        common.row("pinned D2H copy (ceiling)", gb / d2h, "GB/s"),
        common.row("pinned H2D copy (ceiling)", gb / h2d, "GB/s"),
        *[common.row(f"pinned D2H in {mb}-MB copies (per-copy overhead)", gb / v, "GB/s",
                     ceiling=gb / d2h) for mb, v in d2h_pieces_s.items()],
        common.row("seed save: per-layer gather + pageable .cpu()", gb / t_seed_save, "GB/s"),
        common.row("seed load: pageable .to(device) + per-layer scatter", gb / t_seed_load,
                   "GB/s"),
        common.row("retract round trip bit-exact", float(exact), "bool", target={"value": 1.0}),
    ]
    ms = {k: v for k, v in steps.items() if k.endswith("(ms)")}
    rows += [common.row(f"step {k}", v * 1e3, "ms") for k, v in ms.items()]
    for k, v in steps.items():
        if k in ms:
            continue
        ceil = gb / (d2h if k.startswith("save") else h2d)
        rows.append(common.row(f"step {k}", gb / v, "GB/s", ceiling=ceil))
    return rows


def _retract_steps(pool, full, copy, iters: int) -> dict:
    """Seconds of the parts of ``get_cpu_copy`` / ``load_cpu_copy`` (same run, same bytes):
    the plan (host syncs), the pinned allocation, the transfer with a precomputed plan (gathers
    + copies; scatters for the load), and the copies alone (pre-gathered device chunks), so the
    gap to the pinned ceiling splits into plan / pipeline / per-chunk copy overheads."""
    out = {}
    f = pool._full(full)
    n = int(f.shape[0])
    out["save plan: translate + distinct locations (ms)"] = _wall(lambda: pool._plan_save(
        pool._full(full)), iters)
    out["save plan, critical path: translate + first pool (ms)"] = _wall(lambda: next(iter(
        pool._plan_save_iter(pool._full(full)))), iters)
    plans = pool._plan_save(f)
    nbytes = copy.nbytes
    out["save pinned allocation (cached) (ms)"] = _wall(lambda: torch.empty(
        nbytes, dtype=torch.uint8, pin_memory=CUDA), iters)
    held = []

    def run_save():
        held.append(pool._run_save(plans, n))
        if len(held) > 1:
            held.pop(0)

    out["save transfer only (gather + D2H pipeline, plan given)"] = _wall(run_save, iters,
                                                                         warmup=2)
    held.clear()
    # the same D2H copies from pre-gathered device chunks (no gathers): per-chunk copy overhead,
    # at the pool's chunk size (the unsuffixed row) and at 64 MB / 1 GB
    default = pool.COPY_CHUNK_BYTES
    for mb in (None, 64, 1024):
        pool.COPY_CHUNK_BYTES = default if mb is None else mb << 20
        chunks = []
        for p, b, a, uniq, slot, m in plans:
            if m:
                for l0, l1 in pool._chunks(a, m):
                    v, sc = pool._gather(b, uniq, a.select(tuple(range(l0, l1))))
                    chunks += [v] + ([sc] if a.scale_bytes else [])
        host = torch.empty(sum(c.numel() for c in chunks), dtype=torch.uint8, pin_memory=CUDA)

        def copies(chunks=chunks, host=host):
            off = 0
            for c in chunks:
                host[off:off + c.numel()].view(c.shape).copy_(c, non_blocking=CUDA)
                off += c.numel()

        tag = "" if mb is None else f", {mb}-MB chunks"
        out[f"save D2H copies only (pre-gathered chunks{tag})"] = _wall(copies, iters)
        del chunks, host, copies
        gc.collect()
    pool.COPY_CHUNK_BYTES = default
    staged = pool._stage_load(copy)
    _sync()
    out["load plan: translate + pairs (ms)"] = _wall(lambda: pool._plan_load(
        copy, pool._full(full), staged), iters)
    plans_l = pool._plan_load(copy, f, staged)
    del staged
    out["load H2D copies only (stage)"] = _wall(lambda: pool._stage_load(copy), iters)
    out["load transfer only (H2D + scatter pipeline, plan given)"] = _wall(
        lambda: pool._run_load(plans_l, pool._stage_load(copy)), iters)
    gc.collect()
    return out


PARTS = {"exchange": bench_exchange, "steps": bench_steps, "retract": bench_retract}
_LIMITS = {"exchange": 180, "steps": 120, "retract": 300}  # seconds per child process


def _run_part(part: str, quick: bool, fast: bool) -> tuple[int, list[dict], str]:
    """Runs one part in a child interpreter (a crash there must not cost the other parts):
    (returncode, rows, output tail).  ``fast=False`` sets ``JAXKV_DLPACK_FAST=0``."""
    import json
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.interop", "--part", part, "--rows-json", path]
        env = dict(os.environ, JAXKV_DLPACK_FAST="1" if fast else "0", PYTHONFAULTHANDLER="1")
        try:
            r = subprocess.run(cmd + (["--quick"] if quick else []), env=env,
                               capture_output=True, text=True, timeout=_LIMITS[part])
            rc, out = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = 124, f"timed out after {_LIMITS[part]} s\n{e.stdout or ''}{e.stderr or ''}"
        rows = []
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                rows = json.load(f)
    return rc, rows, out[-3000:] if isinstance(out, str) else str(out)[-3000:]


def main(argv=None):
    p = common.parser("interop")
    p.add_argument("--part", choices=sorted(PARTS), help="(internal) run one part in-process")
    p.add_argument("--rows-json", help="(internal) where --part writes its rows")
    p.add_argument("--parts", default="exchange,steps,retract",
                   help="comma-separated parts to run (each in its own process)")
    args = p.parse_args(argv)
    if args.part:  # child: one part, rows to a file
        import json
        rows = PARTS[args.part](args.quick)
        with open(args.rows_json, "w") as f:
            json.dump(rows, f)
        return
    rows = []
    for part in [q for q in args.parts.split(",") if q]:
        rc, part_rows, out = _run_part(part, args.quick, fast=True)
        print(f"--- {part} (fast paths on): rc={rc}\n{out.strip()[-1500:]}", flush=True)
        if rc != 0:  # record the failure, then the same part on the public DLPack path
            rows.append(common.row(f"{part}: child crashed with the fast DLPack paths on "
                                   f"(rc={rc}; negative = signal)", 1.0, "crashed",
                                   target={"value": 0.0}, higher_is_better=False))
            rc, part_rows, out = _run_part(part, args.quick, fast=False)
            print(f"--- {part} (fast paths off, JAXKV_DLPACK_FAST=0): rc={rc}\n"
                  f"{out.strip()[-1500:]}", flush=True)
            for r in part_rows:
                r["name"] += " [fast paths off]"
            if rc != 0:
                rows.append(common.row(f"{part}: child failed with the fast paths off too "
                                       f"(rc={rc})", 1.0, "crashed", target={"value": 0.0},
                                       higher_is_better=False))
        rows += part_rows
    stem = common.write_results(rows, args.out, "interop",
                                title="jaxkv.interop: DLPack exchange and torch-pool retract")
    for r in rows:
        print(f"{r['name']:<60} {r['value']:>12.3f} {r['unit']:<5} "
              f"frac={r['ceiling_fraction']} ratio={r['baseline_ratio']} "
              f"meets={r['meets_target']}")
    print("wrote", stem + ".json")


if __name__ == "__main__":
    main()
