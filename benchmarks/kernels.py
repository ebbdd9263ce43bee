"""Kernels suite: token gather/scatter and whole-page copies at realistic sizes.

``python -m benchmarks.kernels --out DIR`` (GPU; ``--quick`` for a CPU smoke run).

Sizes: DSv4-Flash, all layers of a pool in one launch, 256K random distinct tokens (pools sized to
2x that, several GB): SWA (layer-major, 256/page, 43 layers), C4 (64/page, 21 layers), C128
(2/page, 20 layers).  Every row counts bytes read + written (payload only: value + scale bytes of
every token of every layer, or whole pages), is divided by the device-copy ceiling measured in the
same run, and by the baseline a user would otherwise write on the same bytes: torch
``index_select`` / ``index_copy_`` on 584-B rows (``[L * capacity, 584]``), ``jnp.take`` /
donated ``.at[].set``.

Timing (run 4 on): ``value`` is GPU-bound — back-to-back calls with one sync at the end (torch:
CUDA events around 5 calls, the stream kept busy by a lead call; JAX: wall clock over 10 dispatched
calls, dispatch overlapping the previous kernel).  The timed rows also carry ``per_call_value``:
the timing of runs 1-3 (torch: CUDA events around each call on an idle stream, so the host-side
launch falls inside; JAX: wall clock of each call with ``block_until_ready``).  Diagnostic rows:
``sweep copy_pages`` (page-copy launch geometry and alignment hints, torch path) and ``diag ...
on the JAX arrays (DLPack)`` (the torch-path launch on the jax-triton rows' arrays).

Implementations: ``triton_torch`` (the Triton kernels on torch CUDA tensors), ``triton_jax``
(the same kernels through jax-triton), ``pallas`` (Pallas, Triton lowering), ``reference``
(XLA gather/scatter).  Pallas runs last (its own section) so that a failure there cannot take the
other numbers down; results are written after every section.

Memory (one process, H100 80 GB): sections run torch-only first (torch, pagesweep, the formats'
torch part), then the JAX ones (jax, the formats' JAX part, pallas): XLA's allocator keeps what
it frees in its own pool (never returned to the device, up to 75 % of it), so torch work after
JAX work finds little memory (run 4's formats section: torch.OutOfMemoryError).  Each pool runs
in its own frame; after each section the JAX arrays it left alive are deleted and torch's cache
is emptied (``_run_section``, a ``[mem]`` log line); a pool larger than the free memory allows
(torch: device free + torch's cache; JAX: its pool limit) is shrunk, its token count in the row
names.
"""
from __future__ import annotations

import functools
import gc
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_copy_ceiling, parser, row, time_jax_back_to_back, \
    time_jax_loop, write_results

import jaxkv
from jaxkv.kernels import dispatch

TARGET_TOKENS = {"ceiling_fraction": 0.70, "baseline_ratio": 2.5}
TARGET_PAGES = {"ceiling_fraction": 0.85}
# Device of the torch sections' tensors (a CPU smoke test may set "cpu": Triton's interpreter).
_DEV = "cuda"


def _log(*a):
    print(*a, flush=True)
    sys.stdout.flush()


def _torch_time_per_call(fn, iters=20, warmup=3):
    """Median seconds of one call between two CUDA events on an idle stream (runs 1-2): the
    host-side launch of the call falls inside the interval."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


def _torch_time(fn, calls=5, reps=4, warmup=2):
    """Median seconds per call of ``calls`` back-to-back calls between two CUDA events, the
    stream kept busy by a lead call enqueued before the first event (GPU time only)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # lead call: the stream is busy when `s` is recorded
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(ts)


# How ``value`` and ``per_call_value`` of the timed rows were measured (module docstring).
TIMING = "value: back-to-back calls, one sync; per_call_value: one sync per call (runs 1-3)"


def _timed_row(name, moved, t, t_per_call, **kw):
    """A result row at ``moved / t`` with the per-call timing's GB/s in ``per_call_value``."""
    r = row(name, moved / t / 1e9, "GB/s", **kw)
    r["per_call_value"] = moved / t_per_call / 1e9
    r["timing"] = TIMING
    return r


def _torch_times(fn):
    return _torch_time(fn), _torch_time_per_call(fn, iters=10)


def _jax_times(step, state=None, iters=10):
    """``(back-to-back seconds, per-call-sync seconds, state)`` of ``state = step(state)``."""
    t, state = time_jax_back_to_back(step, state, calls=iters)
    t1, state = time_jax_loop(step, state, iters=iters)
    return t, t1, state


def _torch_free_bytes():
    """Bytes torch can still allocate on the GPU (device free + its cached free blocks), or
    None off the GPU."""
    if jax.default_backend() != "gpu":
        return None
    import torch
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def _jax_free_bytes():
    """Bytes JAX can still allocate on the GPU, or None when unknown (CPU).

    XLA's allocator keeps what it frees in its pool (with preallocation off it grows on demand
    and never returns memory to the device) up to ``bytes_limit`` (75 % of the device by
    default): free = limit - in use, but no more than the device's free memory plus the pool's
    free part."""
    if jax.default_backend() != "gpu":
        return None
    st = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in st:
        return None
    in_use = st.get("bytes_in_use", 0)
    free = st["bytes_limit"] - in_use
    pool = st.get("pool_bytes", st.get("bytes_reserved"))
    if pool is not None:
        import torch
        free = min(free, torch.cuda.mem_get_info()[0] + max(0, pool - in_use))
    return free


def _mem_log(tag):
    """One line: device free memory, JAX's pool, torch's cache (GPU only)."""
    if jax.default_backend() != "gpu":
        return
    import torch
    st = jax.devices()[0].memory_stats() or {}
    free, total = torch.cuda.mem_get_info()
    pool = st.get("pool_bytes", st.get("bytes_reserved", 0))
    _log(f"[mem] {tag}: device free {free / 1e9:.1f} / {total / 1e9:.1f} GB; JAX in use "
         f"{st.get('bytes_in_use', 0) / 1e9:.1f} GB, pool {pool / 1e9:.1f} GB, limit "
         f"{st.get('bytes_limit', 0) / 1e9:.1f} GB; torch allocated "
         f"{torch.cuda.memory_allocated() / 1e9:.1f} GB, cached "
         f"{torch.cuda.memory_reserved() / 1e9:.1f} GB")


def _run_section(name, fn, rows, out):
    """Runs section ``fn()``; afterwards frees what it left: JAX arrays created during it that
    are still alive (deleted; logged, as they are a leak), torch's cache; writes the results.
    A failing section adds a FAILED row and the suite goes on."""
    live = getattr(jax, "live_arrays", lambda: [])  # guarded: the suite must not die here
    before = {id(x) for x in live()}
    result = None
    try:
        result = fn()
    except Exception as e:  # keep the other sections
        traceback.print_exc()
        rows.append(row(f"section {name} FAILED: {type(e).__name__}", 0.0, "GB/s"))
    gc.collect()
    left = [x for x in live() if id(x) not in before and x.nbytes >= (1 << 20)]
    if left:
        _log(f"[mem] section {name} left {len(left)} JAX arrays alive "
             f"({sum(x.nbytes for x in left) / 1e9:.2f} GB): deleted")
        for x in left:
            x.delete()
    del left
    if jax.default_backend() == "gpu":
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _mem_log(f"after {name}")
    write_results(rows, out, "kernels", title="jaxkv kernels")
    return result


def _pools(quick: bool):
    geo = jaxkv.dsv4_flash()
    n = (4096 if jax.default_backend() == "gpu" else 64) if quick else 256 * 1024
    out = []
    for pool in ("swa", "c4", "c128"):
        tpp = geo.page_size // geo.pool(pool).ratio
        pages = max(2, (2 * n) // tpp)
        out.append((pool, pages, n))
    return geo, out


def _format_pools(quick: bool):
    """Other formats: indexer keys (132 B), C4 compress-state rows (8 KB), V3.2 tokens (656 B)."""
    small = jax.default_backend() != "gpu" or quick
    flash, v32 = jaxkv.dsv4_flash(), jaxkv.dsv32()
    n_idx, n_state, n_v32 = (64, 16, 64) if small else (256 * 1024, 32 * 1024, 128 * 1024)
    return [(flash, [("c4_indexer", max(2, 2 * n_idx // 64), n_idx),
                     ("c4_state", 2 * n_state, n_state)]),
            (v32, [("kv", max(2, 2 * n_v32 // 64), n_v32)])]


def _layout(geo, pool, pages):
    lay = jaxkv.layer_major(geo, {p.name: (pages if p.name == pool else 2) for p in geo.pools()})
    b, a = jaxkv.token_addressing(lay, pool)
    _, pa = jaxkv.page_addressing(lay, pool)
    return lay.buffer_shapes[b], a, pa


@functools.partial(jax.jit, static_argnums=1)
def _rand_jax(key, shape):
    rows, cols = shape
    words = jax.random.bits(key, (rows, cols // 4), jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(rows, cols)


def bench_torch(geo, pools, ceiling, rows, quick, sweep_indexer=False):
    """Triton kernels on torch tensors vs torch index_select / index_copy_.

    Each pool runs in its own frame (its tensors die with it, also on failure, and the cache is
    emptied after it); a pool that does not fit the free device memory is shrunk (token count in
    the row names).  ``sweep_indexer``: tokens-per-program x warps rows for the c4_indexer
    scatter and token copy.  Returns ``{pool: (index_select GB/s, index_copy_ GB/s)}``.
    """
    import torch
    base = {}
    for pool, pages, n in pools:
        try:
            base[pool] = _bench_torch_pool(geo, pool, pages, n, ceiling, rows, quick,
                                           sweep_indexer and pool == "c4_indexer")
        except Exception as e:  # keep the other pools
            traceback.print_exc()
            rows.append(row(f"{pool} triton_torch FAILED: {type(e).__name__}", 0.0, "GB/s"))
        gc.collect()
        torch.cuda.empty_cache()
    return base


def _fit(geo, pool, pages, n, max_buf_bytes):
    """``(shape, a, pa, pages, n)`` with the pool shrunk until its buffer is <= ``max_buf_bytes``
    (None: as given) and ``n`` <= half its capacity."""
    shape, a, pa = _layout(geo, pool, pages)
    shrunk = False
    while max_buf_bytes and shape[0] * shape[1] > max_buf_bytes and pages > 2:
        pages = max(2, min(int(pages * 0.9),
                           int(max_buf_bytes // (a.num_layers * a.row_step * shape[1]))))
        shape, a, pa = _layout(geo, pool, pages)
        shrunk = True
    if shrunk:
        n = min(n, a.capacity // 2)
        _log(f"{pool}: shrunk to {pages} pages, {n} tokens ({shape[0] * shape[1] / 1e9:.2f} GB)")
    return shape, a, pa, pages, n


def _bench_torch_pool(geo, pool, pages, n, ceiling, rows, quick, sweep_indexer):
    import torch
    from jaxkv.kernels import triton_kernels as T
    dev = _DEV
    # peak: buf + dst + gathered tokens (~2.5 buffers; the baseline ~2) + a margin
    free = _torch_free_bytes()
    full = n
    fit = (free - (2 << 30)) / 2.6 if free and free > (4 << 30) else None
    shape, a, pa, pages, n = _fit(geo, pool, pages, n, fit)
    tag = f" ({n} tok)" if n != full else ""
    L, tok = a.num_layers, a.value_bytes + a.scale_bytes
    moved = 2 * L * n * tok
    _log(f"[torch] {pool}: buffer {shape} = {shape[0] * shape[1] / 1e9:.2f} GB, "
         f"moved {moved / 1e9:.2f} GB")
    g = torch.Generator(device=dev).manual_seed(0)
    locs = torch.randperm(a.capacity, device=dev, generator=g)[:n].to(torch.int32)
    base, base_tc = _torch_token_baselines(a, locs, n)
    rows.append(row(f"torch token copy {pool}{tag} (index_select+index_copy_)", base_tc, "GB/s",
                    ceiling=ceiling))
    rows.append(row(f"torch index_select {pool} ({L}L x {n} tok)", base[0], "GB/s",
                    ceiling=ceiling))
    rows.append(row(f"torch index_copy_ {pool}{tag}", base[1], "GB/s", ceiling=ceiling))
    torch.cuda.empty_cache()
    buf = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)
    v, s = T.gather_tokens_torch(buf, locs, a)
    t_g = _torch_times(lambda: T.gather_tokens_torch(buf, locs, a))
    t_s = _torch_times(lambda: T.scatter_tokens_torch(buf, locs, v, s, a))
    rows.append(_timed_row(f"gather {pool} triton_torch{tag}", moved, *t_g, ceiling=ceiling,
                           baseline=base[0], target=TARGET_TOKENS))
    rows.append(_timed_row(f"scatter {pool} triton_torch{tag}", moved, *t_s, ceiling=ceiling,
                           baseline=base[1], target=TARGET_TOKENS))
    # whole-page copy: the pages holding the first n/4 tokens -> random other pages
    P = max(1, min(pa.num_pages // 2, (n // a.tpp) // 2 or 1))
    perm = torch.randperm(pa.num_pages, device=dev, generator=g).to(torch.int32)
    sp, dp = perm[:P].contiguous(), perm[P:2 * P].contiguous()
    pmoved = 2 * L * P * pa.page_bytes
    dst = torch.empty_like(buf)
    t_p = _torch_times(lambda: T.copy_pages_torch(buf, dst, sp, dp, pa, pa))
    base_p = None
    if shape[1] == pa.page_bytes:
        base_p = _torch_page_baseline(buf, dst, sp, dp, pa, pmoved)
        rows.append(row(f"torch page copy {pool}{tag} (index_select+index_copy_)", base_p,
                        "GB/s", ceiling=ceiling))
    pg = T.page_params(pa, pa, shape[1], shape[1])
    rows.append(_timed_row(
        f"copy_pages {pool} triton_torch ({L}L x {P} pages x {pa.page_bytes} B; "
        f"{pg['G']} pages x {pg['BLOCK']} words / program)", pmoved, *t_p, ceiling=ceiling,
        baseline=base_p, target=TARGET_PAGES))
    # token-granular copy (SGLang transfer_cache_dsv4_mla): value + whole scale slot
    cmoved = 2 * L * n * (a.value_bytes + a.scale_stride)
    dl = torch.randperm(a.capacity, device=dev, generator=g)[:n].to(torch.int32)
    t_c = _torch_times(lambda: T.copy_tokens_torch(buf, dst, locs, dl, a, a))
    rows.append(_timed_row(f"copy_tokens {pool} triton_torch{tag}", cmoved, *t_c,
                           ceiling=ceiling, baseline=base_tc, target=TARGET_TOKENS))
    _log(rows[-5:])
    if sweep_indexer:
        _sweep_token_geometry(rows, ceiling, pool, buf, dst, locs, dl, v, s, a, moved, cmoved)
    return base


def _torch_token_baselines(a, locs, n):
    """``((index_select GB/s, index_copy_ GB/s), token copy GB/s)``: the torch ops on whole
    token rows (value + scale slot: 584 B for MLA) of a ``[L * capacity, row]`` tensor, the same
    bytes as the Triton rows; the tensors die on return."""
    import torch
    L, dev = a.num_layers, locs.device
    bmoved = 2 * L * n * (a.value_bytes + a.scale_stride)
    rows584 = torch.randint(0, 256, (L * a.capacity, a.value_bytes + a.scale_stride),
                            dtype=torch.uint8, device=dev)
    ridx = (torch.arange(L, device=dev)[:, None] * a.capacity + locs[None].long()).reshape(-1)
    outb = torch.empty((L * n, rows584.shape[1]), dtype=torch.uint8, device=dev)
    t_sel = _torch_time(lambda: torch.index_select(rows584, 0, ridx, out=outb))
    t_cpy = _torch_time(lambda: rows584.index_copy_(0, ridx, outb))
    # token copy the torch way: index_select then index_copy_ (rows -> other rows)
    ridx2 = ridx.roll(1)
    t_tc = _torch_time(lambda: rows584.index_copy_(0, ridx2, rows584.index_select(0, ridx)))
    return (bmoved / t_sel / 1e9, bmoved / t_cpy / 1e9), bmoved / t_tc / 1e9


def _torch_page_baseline(buf, dst, sp, dp, pa, pmoved):
    """GB/s of torch index_select + index_copy_ of whole pages (buffers of one page per row)."""
    import torch
    L = pa.num_layers
    pv = buf.view(L * pa.num_pages, pa.page_bytes)
    dv = dst.view(L * pa.num_pages, pa.page_bytes)
    lidx = torch.arange(L, device=buf.device)[:, None] * pa.num_pages
    si, di = (lidx + sp[None].long()).reshape(-1), (lidx + dp[None].long()).reshape(-1)
    return pmoved / _torch_time(lambda: dv.index_copy_(0, di, pv.index_select(0, si))) / 1e9


def _sweep_token_geometry(rows, ceiling, pool, buf, dst, locs, dl, v, s, a, moved, cmoved):
    """Tokens per program (BT) x warps of the token scatter and the token copy (indexer tokens:
    128-B key + 4-B scale; the default is 64 tokens = 8.4 KB, 2 warps)."""
    from jaxkv.kernels import triton_kernels as T
    for bt in (32, 64, 128, 256):
        for nw in (2, 4, 8):
            T.TUNE.clear()
            T.TUNE.update(BT=bt, num_warps=nw)
            try:
                ts = _torch_time(lambda: T.scatter_tokens_torch(buf, locs, v, s, a))
                tc = _torch_time(lambda: T.copy_tokens_torch(buf, dst, locs, dl, a, a))
                for op, m, t in (("scatter", moved, ts), ("copy_tokens", cmoved, tc)):
                    rows.append(row(f"sweep {op} {pool} BT={bt} "
                                    f"({bt * (a.value_bytes + a.scale_stride)} B / program) "
                                    f"warps={nw}", m / t / 1e9, "GB/s", ceiling=ceiling))
            except Exception as e:  # noqa: BLE001 - keep the other rows
                traceback.print_exc()
                rows.append(row(f"sweep {pool} BT={bt} warps={nw} FAILED: {type(e).__name__}",
                                0.0, "GB/s"))
            _log(rows[-2:])
    T.TUNE.clear()


def bench_jax(geo, pools, ceiling, rows, base, impls, quick, max_buf_bytes=None):
    """JAX implementations vs jnp.take / donated .at[].set.

    ``max_buf_bytes``: shrink the pool (and the token count to half its capacity) to fit; on
    the GPU the pool is also shrunk to what JAX can still allocate (``_jax_free_bytes``).  Each
    pool runs in its own frame: its arrays die with it, also when it fails.
    """
    for pool, pages, n in pools:
        try:
            _bench_jax_pool(geo, pool, pages, n, pools[0][2], ceiling, rows, base, impls, quick,
                            max_buf_bytes)
        except Exception as e:  # keep the other pools
            traceback.print_exc()
            rows.append(row(f"{pool} jax FAILED: {type(e).__name__}", 0.0, "GB/s"))
        gc.collect()


def _bench_jax_pool(geo, pool, pages, n, n_full, ceiling, rows, base, impls, quick,
                    max_buf_bytes):
    iters = 5 if quick else 10
    free = _jax_free_bytes()
    if free and free > (4 << 30):  # peak: buffer + copy destination + gathered tokens +
        fit = (free - (2 << 30)) / 3  # in-flight outputs (~3x); a nonsense reading is ignored
        max_buf_bytes = min(max_buf_bytes or fit, fit)
    shape, a, pa, pages, n = _fit(geo, pool, pages, n, max_buf_bytes)
    L, tok = a.num_layers, a.value_bytes + a.scale_bytes
    moved = 2 * L * n * tok
    key = jax.random.key(1)
    locs = jax.random.permutation(key, a.capacity)[:n].astype(jnp.int32)
    tag = f" ({n} tok)" if n != n_full else ""
    if "baseline" in impls:
        bmoved = 2 * L * n * (a.value_bytes + a.scale_stride)  # whole 584-B rows
        rows584 = _rand_jax(key, (L * a.capacity, a.value_bytes + a.scale_stride))
        ridx = (jnp.arange(L)[:, None] * a.capacity + locs[None]).reshape(-1)
        take = jax.jit(lambda r, i: jnp.take(r, i, axis=0))
        t, t1, out = _jax_times(lambda _: take(rows584, ridx), iters=iters)
        del out
        rows.append(_timed_row(f"jnp.take {pool}{tag}", bmoved, t, t1, ceiling=ceiling))
        upd = take(rows584, ridx)
        setf = jax.jit(lambda r, i, u: r.at[i].set(u), donate_argnums=0)
        t, t1, rows584 = _jax_times(lambda r: setf(r, ridx, upd), rows584, iters=iters)
        rows.append(_timed_row(f"jnp .at[].set (donated) {pool}{tag}", bmoved, t, t1,
                               ceiling=ceiling))
        del rows584, upd, ridx
    buf = _rand_jax(key, shape)
    for impl in [i for i in impls if i != "baseline"]:
        try:
            buf = _bench_jax_impl(impl, pool, tag, buf, locs, a, pa, n, L, moved, ceiling, rows,
                                  base, iters)
        except Exception as e:  # keep the other rows
            traceback.print_exc()
            rows.append(row(f"{pool} {impl} FAILED: {type(e).__name__}", 0.0, "GB/s"))
            if buf.is_deleted():  # donated to a call that failed
                buf = _rand_jax(key, shape)


def _bench_jax_impl(impl, pool, tag, buf, locs, a, pa, n, L, moved, ceiling, rows, base, iters):
    """The gather / scatter / page-copy rows of ``impl``; returns the (donated, rebound) buffer."""
    gat = jax.jit(lambda b, l: dispatch.gather_tokens(b, l, a, impl=impl))
    v, s = gat(buf, locs)
    t, t1, out = _jax_times(lambda _: gat(buf, locs), iters=iters)
    del out
    rows.append(_timed_row(f"gather {pool} {impl}{tag}", moved, t, t1,
                           ceiling=ceiling, baseline=base.get(pool, (None,))[0],
                           target=TARGET_TOKENS))
    sca = jax.jit(lambda b, l, v, s: dispatch.scatter_tokens(b, l, v, s, a, impl=impl),
                  donate_argnums=0)
    t, t1, buf = _jax_times(lambda b: sca(b, locs, v, s), buf, iters=iters)
    rows.append(_timed_row(f"scatter {pool} {impl}{tag}", moved, t, t1,
                           ceiling=ceiling, baseline=base.get(pool, (None, None))[1],
                           target=TARGET_TOKENS))
    P = max(1, min(pa.num_pages // 2, (n // a.tpp) // 2 or 1))
    perm = jax.random.permutation(jax.random.key(2), pa.num_pages).astype(jnp.int32)
    sp, dp = perm[:P], perm[P:2 * P]
    cp = jax.jit(lambda d, b, x, y: dispatch.copy_pages(b, d, x, y, pa, pa, impl=impl),
                 donate_argnums=0)
    dst = jnp.zeros_like(buf)
    t, t1, dst = _jax_times(lambda d: cp(d, buf, sp, dp), dst, iters=iters)
    rows.append(_timed_row(f"copy_pages {pool} {impl}{tag}", 2 * L * P * pa.page_bytes, t, t1,
                           ceiling=ceiling, target=TARGET_PAGES))
    _log(rows[-3:])
    if impl == "triton":
        _diag_torch_on_jax(rows, ceiling, pool, a, pa, buf, dst, locs, v, s, sp, dp,
                           moved, 2 * L * P * pa.page_bytes)
    return buf


def _diag_torch_on_jax(rows, ceiling, pool, a, pa, buf, dst, locs, v, s, sp, dp, moved, pmoved):
    """The torch-path launch (same Triton kernels, CUDA-event timing) on the JAX arrays of the
    jax-triton rows, shared through DLPack: tells whether a jax-triton gap comes from the
    memory XLA allocated (slow here too) or from the jax-triton call / its timing (fast here)."""
    try:
        import torch
        from torch.utils.dlpack import from_dlpack
        from jaxkv.kernels import triton_kernels as T
        tb, td, tl_, tv, ts_, tsp, tdp = (from_dlpack(x) for x in (buf, dst, locs, v, s, sp, dp))
        torch.cuda.synchronize()
        t = _torch_times(lambda: T.scatter_tokens_torch(tb, tl_, tv, ts_, a))
        rows.append(_timed_row(f"diag scatter {pool} triton_torch on the JAX arrays (DLPack)",
                               moved, *t, ceiling=ceiling))
        t = _torch_times(lambda: T.copy_pages_torch(tb, td, tsp, tdp, pa, pa))
        rows.append(_timed_row(f"diag copy_pages {pool} triton_torch on the JAX arrays "
                               "(DLPack)", pmoved, *t, ceiling=ceiling))
        torch.cuda.synchronize()
        del tb, td, tl_, tv, ts_, tsp, tdp
        _log(rows[-2:])
    except Exception as e:  # noqa: BLE001 - a diagnostic must not cost the other rows
        traceback.print_exc()
        rows.append(row(f"diag {pool} torch on JAX arrays FAILED: {type(e).__name__}", 0.0,
                        "GB/s"))


def sweep_triton(geo, rows):
    """Block-size / warp sweep of the Triton token gather+scatter on C4 (tuning record)."""
    import torch
    from jaxkv.kernels import triton_kernels as T
    pool, n = "c4", 256 * 1024
    shape, a, _ = _layout(geo, pool, (2 * n) // 64)
    buf = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    locs = torch.randperm(a.capacity, device="cuda")[:n].to(torch.int32)
    moved = 2 * a.num_layers * n * 583
    for bt in (4, 8, 16, 32):
        for nw in (2, 4, 8):
            T.TUNE.clear()
            T.TUNE.update(BT=bt, num_warps=nw)
            v, s = T.gather_tokens_torch(buf, locs, a)
            tg = _torch_time(lambda: T.gather_tokens_torch(buf, locs, a))
            ts = _torch_time(lambda: T.scatter_tokens_torch(buf, locs, v, s, a))
            rows.append(row(f"sweep c4 BT={bt} warps={nw} gather", moved / tg / 1e9, "GB/s"))
            rows.append(row(f"sweep c4 BT={bt} warps={nw} scatter", moved / ts / 1e9, "GB/s"))
            _log(rows[-2:])
    T.TUNE.clear()
    del buf


def sweep_pages(geo, ceiling, rows, quick):
    """Page-copy launch geometry on the torch path (C128: 1,728-B pages; C4: 37,440-B pages):
    words per program (``page_words``; C128 at 256 = one page per program, the geometry of
    runs 1-3) x warps, and the alignment hints off at the default geometry.  Also the token
    gather/scatter of C4 with the hints off (the default rows have them on)."""
    import torch
    from jaxkv.kernels import triton_kernels as T
    for pool, pages, n in _pools(quick)[1]:
        if pool not in ("c128", "c4"):
            continue
        shape, a, pa = _layout(geo, pool, pages)
        L = pa.num_layers
        P = max(1, min(pa.num_pages // 2, (n // a.tpp) // 2 or 1))
        g = torch.Generator(device="cuda").manual_seed(0)
        perm = torch.randperm(pa.num_pages, device="cuda", generator=g).to(torch.int32)
        sp, dp = perm[:P].contiguous(), perm[P:2 * P].contiguous()
        buf = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(buf)
        pmoved = 2 * L * P * pa.page_bytes
        configs = [(w, nw, True) for w in (256, 512, 1024, 2048, 4096) for nw in (2, 4, 8)]
        configs.append((None, None, False))
        for words, nw, align in configs:
            T.TUNE.clear()
            T.TUNE.update(page_words=words, page_warps=nw, align=align)
            m = T.page_params(pa, pa, shape[1], shape[1])
            try:
                t = _torch_time(lambda: T.copy_pages_torch(buf, dst, sp, dp, pa, pa))
                rows.append(row(f"sweep copy_pages {pool} words/program={words or T.PAGE_WORDS} "
                                f"(G={m['G']} x BLOCK={m['BLOCK']}, NCH={m['NCH']}) "
                                f"warps={nw or T.PAGE_WARPS} align_hints={align}",
                                pmoved / t / 1e9, "GB/s", ceiling=ceiling))
            except Exception as e:  # noqa: BLE001 - keep the other rows
                traceback.print_exc()
                rows.append(row(f"sweep copy_pages {pool} {words} {nw} FAILED: "
                                f"{type(e).__name__}", 0.0, "GB/s"))
            _log(rows[-1])
        T.TUNE.clear()
        if pool == "c4":
            locs = torch.randperm(a.capacity, device="cuda", generator=g)[:n].to(torch.int32)
            moved = 2 * L * n * (a.value_bytes + a.scale_bytes)
            for align in (True, False):
                T.TUNE.update(align=align)
                v, s = T.gather_tokens_torch(buf, locs, a)
                tg = _torch_time(lambda: T.gather_tokens_torch(buf, locs, a))
                ts = _torch_time(lambda: T.scatter_tokens_torch(buf, locs, v, s, a))
                rows.append(row(f"sweep gather c4 triton_torch align_hints={align}",
                                moved / tg / 1e9, "GB/s", ceiling=ceiling))
                rows.append(row(f"sweep scatter c4 triton_torch align_hints={align}",
                                moved / ts / 1e9, "GB/s", ceiling=ceiling))
                _log(rows[-2:])
                del v, s
            T.TUNE.clear()
        del buf, dst
        gc.collect()
        torch.cuda.empty_cache()


def _pallas_beyond_2gib(rows) -> bool:
    """Does the Pallas scatter/gather address bytes past 2**31 correctly (3.5 GB buffer)?"""
    from jaxkv.kernels import pallas_ops
    from jaxkv.kernels.addressing import TokenAddressing
    nrows, pb = 2_000_000, 1728
    a = TokenAddressing(row_base=(0,), col_base=(0,), row_step=1, tpp=2, num_pages=nrows,
                        value_bytes=576, scale_stride=8, scale_bytes=7)
    locs = jnp.asarray([a.capacity - 1, 3], jnp.int32)
    v = jax.random.bits(jax.random.key(3), (1, 2, 576), jnp.uint8)
    s = jax.random.bits(jax.random.key(4), (1, 2, 7), jnp.uint8)
    try:
        buf = pallas_ops.scatter_tokens(jnp.zeros((nrows, pb), jnp.uint8), locs, v, s, a)
        gv, gs = pallas_ops.gather_tokens(buf, locs, a)
        ok = bool(jnp.array_equal(gv, v) & jnp.array_equal(gs, s)
                  & jnp.array_equal(buf[-1, 576:1152], v[0, 0]))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    _log(f"pallas beyond 2 GiB: {'correct' if ok else 'WRONG'}")
    rows.append(row("pallas addresses bytes beyond 2 GiB correctly (1 = yes)", float(ok), "bool"))
    return ok


def main(argv=None):
    p = parser("kernels")
    p.add_argument("--sections", default="torch,pagesweep,jax,formats,pallas",
                   help="comma list of: sweep, torch, pagesweep, jax, formats, pallas")
    args = p.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    geo, pools = _pools(args.quick or not gpu)
    t0 = time.time()
    c_jax = device_copy_ceiling((1 << 30) if gpu else (1 << 24))
    rows = [row("device copy, jnp (a + 1 on 1 GiB, read+write)", c_jax, "GB/s")]
    ceiling = c_jax
    if gpu:  # the best plain copy this run can measure is the ceiling
        import torch
        x = torch.randint(0, 256, (1 << 31,), dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        t = _torch_times(lambda: y.copy_(x))
        rows.append(_timed_row("device copy, torch copy_ (2 GiB, read+write)", 2 * x.numel(),
                               *t))
        c_torch = rows[-1]["value"]
        ceiling = max(c_jax, c_torch)
        del x, y
        torch.cuda.empty_cache()
    for r in rows:
        r.update(ceiling=ceiling, ceiling_fraction=r["value"] / ceiling)
    _log(f"copy ceiling {ceiling:.1f} GB/s on {jax.devices()[0].device_kind}")
    sections = args.sections.split(",")
    quick = args.quick or not gpu
    _mem_log("after the ceiling")
    # Order: every torch-only section before the JAX sections.  XLA's allocator never returns
    # what it frees to the device (its pool grows up to 75 % of it), so torch work after the
    # JAX sections would get only the rest (run 4: the formats section, run after them, failed
    # with torch.OutOfMemoryError); each section frees its own arrays and torch's cache.
    base = {}
    if gpu and "sweep" in sections:
        _run_section("sweep", lambda: sweep_triton(geo, rows), rows, args.out)
    if gpu and "torch" in sections:
        base = _run_section("torch", lambda: bench_torch(geo, pools, ceiling, rows, args.quick),
                            rows, args.out) or {}
    if gpu and "pagesweep" in sections:
        _run_section("pagesweep", lambda: sweep_pages(geo, ceiling, rows, args.quick), rows,
                     args.out)
    fpools = _format_pools(args.quick)
    fbase = {}
    if gpu and "formats" in sections:  # indexer, state rows, V3.2: the torch part
        for fgeo, fp in fpools:
            fbase[fgeo.name] = _run_section(
                f"formats {fgeo.name} torch",
                lambda fgeo=fgeo, fp=fp: bench_torch(fgeo, fp, ceiling, rows, args.quick,
                                                     sweep_indexer=True),
                rows, args.out) or {}
    if "jax" in sections:
        impls = ["baseline", "reference"] + (["triton"] if gpu else [])
        _run_section("jax", lambda: bench_jax(geo, pools, ceiling, rows, base, impls, quick),
                     rows, args.out)
    if "formats" in sections:  # the JAX part: Triton through jax-triton vs the JAX baselines
        for fgeo, fp in fpools:
            _run_section(
                f"formats {fgeo.name} jax",
                lambda fgeo=fgeo, fp=fp: bench_jax(
                    fgeo, fp, ceiling, rows, fbase.get(fgeo.name, {}),
                    ["baseline"] + (["triton"] if gpu else ["reference"]), quick),
                rows, args.out)
    if "pallas" in sections:
        def pallas():
            big = (not gpu) or _pallas_beyond_2gib(rows)
            bench_jax(geo, pools, ceiling, rows, base, ["pallas"], quick,
                      max_buf_bytes=None if big else (2**31 - 2**20))
        _run_section("pallas", pallas, rows, args.out)
    stem = write_results(rows, args.out, "kernels", title="jaxkv kernels")
    _log(f"wrote {stem}.* in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
