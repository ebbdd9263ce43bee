"""DCP across processes: 2 CPU processes x 2 devices under ``jax.distributed`` (gloo collectives).

The pytest test spawns two workers (this file run as a script) on 127.0.0.1.  Each worker joins a
4-device mesh spanning both processes, writes the same random requests into a DCP-4 cache (each
process holds its two devices' shards), runs ``dcp.decode`` (all-gather of q, local attention, LSE
merge + reduce-scatter: real cross-process collectives), and compares with the single-device
oracle computed locally; it also reads tokens back (``get_tokens_dcp``: a cross-process psum).

Skipped with the reason when the platform lacks gloo CPU collectives or cannot start the workers.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dcp_two_processes(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for rank in range(2):
        log = open(tmp_path / f"worker{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, os.path.join(HERE, "test_dcp_multiprocess.py"), str(rank), str(port),
             str(tmp_path)], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + TIMEOUT
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for q, _ in procs:  # only the workers this test started
                if q.poll() is None:
                    q.kill()
            codes.append(None)
        log.close()
    logs = [(tmp_path / f"worker{r}.log").read_text() for r in range(2)]
    if any("SKIP:" in t for t in logs):
        reason = next(t.split("SKIP:", 1)[1].splitlines()[0] for t in logs if "SKIP:" in t)
        pytest.skip(f"multi-process DCP not available here: {reason.strip()}")
    if None in codes:
        pytest.fail(f"workers timed out after {TIMEOUT} s; logs:\n" + "\n---\n".join(
            t[-3000:] for t in logs))
    assert codes == [0, 0], "\n---\n".join(t[-3000:] for t in logs)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 4 and r["local_devices"] == 2
        assert r["max_rel"] <= 1e-5, r
        assert r["readback_exact"], r
        assert r["checked"] == 4
    # the two processes held different shards of the same cache
    assert results[0]["shard_digest"] != results[1]["shard_digest"]


# ---------------------------------------------------------------------------------------------
# Worker


def _worker(rank: int, port: int, out: str):
    import hashlib

    import jax
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # noqa: BLE001 (option missing on this jax)
        print(f"SKIP: no gloo CPU collectives option ({e})", flush=True)
        return 0
    try:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=rank, initialization_timeout=60)
    except Exception as e:  # noqa: BLE001
        print(f"SKIP: jax.distributed.initialize failed ({type(e).__name__}: {e})", flush=True)
        return 0
    import numpy as np
    from jax.experimental import multihost_utils

    sys.path.insert(0, HERE)
    import test_dcp as T
    from jaxkv import dcp
    from jaxkv import formats as F

    geo = T.GEOS["dsv4"]()
    n = jax.device_count()
    lens = [3, 5 * geo.page_size + 1, 2 * geo.page_size * n - 7]
    sc = T.Scenario(geo, n, 1, lens, seed=21)
    q, iq, iw = T._queries(geo, len(lens), 2 * n, 21)
    worst, checked = 0.0, 0
    for layer in range(geo.num_layers):  # SWA-only, C4 (top-k), C128 layers; both LSE bases
        for base in (("e", "2") if layer == 1 else ("e",)):
            ro, rl = T._ref_decode(q, sc.ref, layer, index_q=iq, index_w=iw, base=base,
                                   **sc.kwargs("ref"))
            do, dl = dcp.decode(sc.dc, np.asarray(q), layer, index_q=np.asarray(iq),
                                index_w=np.asarray(iw), base=base,
                                **{k: np.asarray(v) for k, v in sc.kwargs("dcp").items()})
            do = multihost_utils.process_allgather(do, tiled=True)
            dl = multihost_utils.process_allgather(dl, tiled=True)
            worst = max(worst, T._rel(do, ro), T._rel(dl, rl))
            checked += 1
    pos, dlocs, toks = sc.written["c4"]
    got = dcp.get_tokens_dcp(sc.dc, "c4", None, np.asarray(dlocs))
    ok = dlocs >= 0
    exact = True
    for a, b in zip(F.to_parts(geo.mla, jax.tree_util.tree_map(
            lambda x: x.addressable_data(0), got)), F.to_parts(geo.mla, toks)):
        exact &= bool(np.array_equal(np.asarray(a)[:, ok], np.asarray(b)[:, ok]))
    buf = sc.dc.buffers[sc.dc.layout.pool("c4").placements[0].buffer]
    digest = hashlib.sha256(b"".join(np.asarray(s.data).tobytes()
                                     for s in buf.addressable_shards)).hexdigest()
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump({"process_count": jax.process_count(), "devices": n,
                   "local_devices": jax.local_device_count(), "max_rel": worst,
                   "readback_exact": exact, "checked": checked, "shard_digest": digest}, f)
    print(f"worker {rank}: max rel err {worst:.3g} over {checked} decodes, readback {exact}",
          flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
