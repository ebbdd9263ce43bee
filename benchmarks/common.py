"""Shared benchmark plumbing: timing, ceilings, and the results format of BENCH.md.

Every suite writes ``<out>/<suite>-<gpu>.json`` (a list of rows), the same table as ``.md`` and a
plot ``.png``.  A row::

    {"name", "value", "unit", "ceiling", "ceiling_fraction", "baseline", "baseline_ratio",
     "target", "meets_target"}   (None where a field does not apply)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def gpu_name() -> str:
    """Short device name for result files: ``h100``, ``h200``, or the platform (``cpu``)."""
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or d.platform
    k = kind.lower()
    for tag in ("h100", "h200", "b200", "a100"):
        if tag in k:
            return tag
    return d.platform


def time_jax(fn: Callable, *args, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn(*args)`` (blocked until ready), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_call(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()``, which must itself wait for its result (host copies,
    ``block_until_ready`` inside), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_jax_loop(step: Callable, state, *, iters: int = 20, warmup: int = 3):
    """Median seconds per call of ``state = step(state)`` (for donated, in-place updates).

    Returns ``(seconds, final_state)``.
    """
    for _ in range(warmup):
        state = step(state)
    jax.block_until_ready(state)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state = step(state)
        jax.block_until_ready(state)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), state


def time_jax_back_to_back(step: Callable, state=None, *, calls: int = 10, reps: int = 3,
                          warmup: int = 2):
    """Seconds per call of ``state = step(state)`` dispatched ``calls`` times back to back with
    one host sync at the end (GPU-bound: dispatch overlaps the previous call's kernel), median
    of ``reps`` such batches.  For a call without state pass ``lambda _: fn(*args)``: the last
    output is kept only until the next call returns (outputs are not accumulated).

    Returns ``(seconds_per_call, final_state)``.  Compare with ``time_jax_loop``, which syncs
    after every call and so adds the dispatch and sync latency of each call.
    """
    for _ in range(warmup):
        state = step(state)
    jax.block_until_ready(state)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            state = step(state)
        jax.block_until_ready(state)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts), state


def device_copy_ceiling(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written."""
    n = nbytes // 4
    x = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
    copy = jax.jit(lambda a: a + jnp.uint32(1))  # forces a real read + write of every byte
    t = time_jax(copy, x, iters=iters)
    return 2 * n * 4 / t / 1e9


def row(name, value, unit, *, ceiling=None, baseline=None, target=None, higher_is_better=True):
    """One result row; fractions and ratios are derived, ``meets_target`` compares to target.

    ``target`` is compared with ``ceiling_fraction`` when it is < 1.5 and a ceiling is given,
    else with ``value`` (pass a dict {"ceiling_fraction": x} / {"baseline_ratio": y} /
    {"value": z} to be explicit; several keys must all hold).  With ``higher_is_better=False``
    a plain ``value`` target is an upper bound and is recorded as {"value_max": z}.
    """
    frac = value / ceiling if ceiling else None
    ratio = (value / baseline if higher_is_better else baseline / value) if baseline else None
    meets = None
    if target is not None:
        if not isinstance(target, dict):
            target = {"ceiling_fraction": target} if (ceiling and target < 1.5) else {
                ("value" if higher_is_better else "value_max"): target}
        elif not higher_is_better and "value" in target:
            target = {("value_max" if k == "value" else k): v for k, v in target.items()}
        got = {"ceiling_fraction": frac, "baseline_ratio": ratio, "value": value,
               "value_max": value}
        meets = all(got[k] is not None and (got[k] <= v if k == "value_max" else got[k] >= v)
                    for k, v in target.items())
    return {"name": name, "value": value, "unit": unit, "ceiling": ceiling,
            "ceiling_fraction": frac, "baseline": baseline, "baseline_ratio": ratio,
            "target": target, "meets_target": meets}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, dict):
        return ", ".join(f"value <= {x}" if k == "value_max" else f"{k} >= {x}"
                         for k, x in v.items())
    return str(v)


def write_results(rows: list[dict], out_dir: str, suite: str, *, title: str | None = None,
                  plot_key: str = "value") -> str:
    """Writes ``<suite>-<gpu>.json/.md/.png`` under ``out_dir``; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{suite}-{gpu_name()}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    cols = ["name", "value", "unit", "ceiling", "ceiling_fraction", "baseline",
            "baseline_ratio", "target", "meets_target"]
    lines = [f"# {title or suite} on {jax.devices()[0].device_kind}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [r["name"] for r in rows]
        vals = [(r["ceiling_fraction"] if plot_key == "ceiling_fraction" else r["value"]) or 0
                for r in rows]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
        colors = ["tab:green" if r["meets_target"] else
                  ("tab:red" if r["meets_target"] is False else "tab:gray") for r in rows]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(plot_key if plot_key != "value" else (rows[0]["unit"] if rows else ""))
        ax.set_title(f"{title or suite} — {jax.devices()[0].device_kind} "
                     "(green: meets target, red: misses)")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=90)
        plt.close(fig)
    except ImportError:
        pass
    return stem


def parser(suite: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{suite}")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    return p
