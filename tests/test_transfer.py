"""jaxkv.interop.transfer: regions, descriptors, and prefill -> decode transfers through NIXL.

The two-process tests spawn a "prefill" and a "decode" process (127.0.0.1 only: UCX on ``lo``),
each holding a DSv4-Flash-shaped cache in both layouts (packed, 6 blocks; layer-major, 5 pages
per pool).  They skip when ``nixl`` is not importable (``pip install 'jaxkv[nixl]'``).
"""
import ctypes
import multiprocessing as mp
import os
import signal
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only; children inherit
os.environ.setdefault("UCX_MODULES", "^ib")     # a system ibverbs makes UCX crash at exit

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv import formats as F  # noqa: E402
from jaxkv.interop import transfer as T  # noqa: E402

HAVE_NIXL = T.nixl_available()
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="nixl not importable: "
                                "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1")

NUM_BLOCKS = 6   # packed: blocks 1..4 usable (0 reserved, 5 holds the state sentinels)
NUM_PAGES = 4    # layer-major: pages 1..2 of state pools usable (3 is the sentinel row)
RECV_TIMEOUT = 60.0


def _layouts():
    """{"packed", "lm", "torch"}: "torch" is the packed layout in a torch-owned cache."""
    geo = jaxkv.dsv4_flash()
    packed = jaxkv.packed(geo, NUM_BLOCKS)
    return geo, {"packed": packed, "lm": jaxkv.layer_major(geo, NUM_PAGES), "torch": packed}


def _random_cache(layout, seed):
    """A cache whose every byte is random (poison: untouched bytes are checked)."""
    rng = np.random.default_rng(seed)
    bufs = tuple(jnp.asarray(rng.integers(0, 256, s, dtype=np.uint8))
                 for s in layout.buffer_shapes)
    return jaxkv.Cache(bufs, layout)


def _locs(pool, pages):
    tpp = pool.tokens_per_page
    return np.concatenate([np.arange(p * tpp, (p + 1) * tpp) for p in pages]).astype(np.int32)


def _pool_pages(layout, blocks):
    """{pool: pages} of a request given as block ids (the same ids in every pool)."""
    return {p.name: list(blocks) for p in layout.pools}


# ---------------------------------------------------------------------------------------------
# Regions and descriptors (no NIXL needed)


def test_regions_packed_one_layer_major_one_per_buffer():
    geo, lays = _layouts()
    c = jaxkv.init_cache(geo, lays["packed"])
    regs = T.memory_regions(c)
    assert len(regs) == 1
    assert regs[0].nbytes == NUM_BLOCKS * lays["packed"].block_stride == c.buffers[0].nbytes
    assert regs[0].addr == c.buffers[0].unsafe_buffer_pointer()
    assert regs[0].mem_type == "DRAM"
    c = jaxkv.init_cache(geo, lays["lm"])
    regs = T.memory_regions(c)
    assert len(regs) == len(geo.pools()) == len(c.buffers)
    for r, b in zip(regs, c.buffers):
        assert (r.addr, r.nbytes) == (b.unsafe_buffer_pointer(), b.nbytes)


def _ucx_table(pid, scope, op, rows):
    """A UCX_PROTO_INFO table as UCX prints it (every line with the log prefix of ``pid``)."""
    pre = f"[1795399417.452342] [vm:{pid} :0]   "
    w = 60
    out = [pre + "+" + "-" * w + "+", pre + f"| {scope:<{w - 2}} |", pre + f"| {op:<{w - 2}} |",
           pre + "+" + "-" * w + "+", pre + "| Range | Description | Config |",
           pre + "+" + "-" * w + "+"]
    out += [pre + f"| {r} | {d} | {c} |" for r, d, c in rows]
    return out + [pre + "+" + "-" * w + "+"]


def test_ucx_output_parser_finds_the_gpu_write_transport():
    """The benchmark's parser of UCX output: GPU-to-GPU remote writes of peer endpoints only,
    lines of two processes interleaved, self endpoints and host-memory tables ignored."""
    B = pytest.importorskip("benchmarks.transfer")
    gpu_op = "remote memory write by ucp_put*(multi) from cuda/GPU0 to cuda"
    a = (_ucx_table(11, "prefill self cfg#0", gpu_op, [("0..inf", "zero-copy", "cuda_copy/cuda")])
         + _ucx_table(11, "prefill intra-node cfg#2", "remote memory write by ucp_put* from host "
                      "memory to host", [("0..inf", "zero-copy", "cma/memory")])
         + _ucx_table(11, "prefill intra-node cfg#2", gpu_op,
                      [("0..8192", "zero-copy", "cuda_ipc/cuda"),
                       ("8193..inf", "multi-frag zero-copy", "cuda_ipc/cuda")]))
    b = _ucx_table(22, "decode intra-node cfg#2", gpu_op,
                   [("0..inf", "software emulation", "tcp/lo")])
    mixed = []
    for i in range(max(len(a), len(b))):  # line by line interleaving of the two processes
        mixed += a[i:i + 1] + b[i:i + 1]
    info = ("[1795399417.452342] [vm:11 :0]     ucp_worker.c:1888 UCX  INFO  ucp_context_0 "
            "intra-node cfg#2 rma(cuda_ipc/cuda tcp/lo) am(tcp/lo)")
    text = "\n".join(["unrelated line | a | b | c |", info] + mixed)
    r = B.parse_ucx_output(text)
    assert r["uses_cuda_ipc"]
    assert r["transports"] == ["cuda_ipc/cuda (multi-frag zero-copy)", "cuda_ipc/cuda (zero-copy)",
                               "tcp/lo (software emulation)"]
    assert {w["pid"] for w in r["gpu_writes"]} == {11, 22}
    assert all("self" not in w["scope"] for w in r["gpu_writes"])
    assert r["ep_lanes"] == [info.split("]", 2)[2].strip()]
    only_tcp = B.parse_ucx_output("\n".join(b))
    assert not only_tcp["uses_cuda_ipc"]
    assert only_tcp["transports"] == ["tcp/lo (software emulation)"]
    assert B.parse_ucx_output("no ucx output")["transports"] == []


def test_cuda_ipc_info_argument_checks():
    for bad in (0, -5, True, 1.5, "0x10", None):
        with pytest.raises(ValueError, match="addr"):
            T.cuda_ipc_info(bad)
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        for f in (lambda: T.cuda_ipc_info(1 << 20), T.cuda_current_context,
                  T.ensure_cuda_context):
            with pytest.raises(OSError):
                f()


@pytest.mark.gpu
def test_cuda_ipc_info_on_a_jax_gpu_buffer():
    x = jax.device_put(np.arange(1 << 20, dtype=np.uint8), jax.devices("gpu")[0])
    x.block_until_ready()
    addr = x.unsafe_buffer_pointer()
    info = T.cuda_ipc_info(addr)
    assert info["base"] <= addr and addr + x.nbytes <= info["base"] + info["size"]
    assert isinstance(info["legacy_ipc"], bool) and info["verdict"]
    if info["legacy_ipc"]:  # what UCX's cuda_ipc relies on: a legacy handle can be made
        assert info["ipc_handle"] and not info["vmm"]


@pytest.mark.gpu
def test_ensure_cuda_context_sets_the_primary_context_once_per_thread():
    import threading
    jax.device_put(np.zeros(8, np.uint8), jax.devices("gpu")[0]).block_until_ready()
    got = {}

    def body():  # a fresh thread has no current context
        got["before"] = T.cuda_current_context()
        got["first"] = T.ensure_cuda_context(0)
        got["after"] = T.cuda_current_context()
        got["second"] = T.ensure_cuda_context(0)

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert got == {"before": 0, "first": True, "after": got["after"], "second": False}
    assert got["after"] != 0


@pytest.mark.parametrize("kind", ["packed", "lm"])
def test_descriptors_point_at_the_pages(kind):
    """Every descriptor's bytes (read from raw memory) are the page read_pages gives."""
    geo, lays = _layouts()
    layout = lays[kind]
    cache = _random_cache(layout, 1)
    jax.block_until_ready(cache.buffers)
    if next(iter(cache.buffers[0].devices())).platform != "cpu":
        pytest.skip("reads raw host memory at the descriptors' addresses")
    blocks = [2, 1]
    d = T.block_descriptors(cache, blocks)
    assert d.dtype == np.uint64 and d.shape[1] == 3
    mem = [ctypes.string_at(int(a), int(n)) for a, n, _ in d]
    if kind == "packed":
        assert len(d) == len(blocks)  # one descriptor per block
        host = np.asarray(cache.buffers[0])
        for m, b in zip(mem, blocks):
            assert m == host[b].tobytes()
        return
    expect = []
    for p in layout.pools:  # layout order: pools, layers, pages
        for layer in range(p.spec.num_layers):
            pages = np.asarray(jaxkv.read_pages(cache, p.name, layer))
            expect.extend(pages[b].tobytes() for b in blocks)
    assert len(d) == len(expect) == 2 * sum(p.spec.num_layers for p in layout.pools)
    assert mem == expect
    assert T.descriptor_count(layout, blocks) == len(d)


def test_descriptor_counts_and_pool_selection():
    geo, lays = _layouts()
    assert T.descriptor_count(lays["packed"], [1, 2, 4]) == 3
    lm = lays["lm"]
    g0 = ("c4", "c128", "c4_indexer")
    n = sum(lm.pool(k).spec.num_layers for k in g0)
    assert T.descriptor_count(lm, [1, 3], pools=g0) == 2 * n
    assert T.descriptor_count(lm, {"c4": [1], "swa": [2, 3]}) == (
        lm.pool("c4").spec.num_layers + 2 * lm.pool("swa").spec.num_layers)


@pytest.mark.parametrize("kind,blocks,pools,match", [
    ("packed", [0], None, "reserved"),
    ("packed", [NUM_BLOCKS], None, "outside"),
    ("packed", [-1], None, "outside"),
    ("packed", [1, 1], None, "repeat"),
    ("packed", [1.0], None, "int"),
    ("packed", [1], ("c4",), "pools must be None"),
    ("lm", [NUM_PAGES - 1], None, "sentinel"),
    ("lm", [1], ("nope",), "unknown pools"),
    ("lm", {"nope": [1]}, None, "unknown pools"),
])
def test_bad_blocks_are_value_errors(kind, blocks, pools, match):
    _, lays = _layouts()
    with pytest.raises(ValueError, match=match):
        T.descriptor_count(lays[kind], blocks, pools)


_ID_LISTS = st.one_of(
    st.lists(st.integers(-2, NUM_BLOCKS + 1), max_size=6),
    st.lists(st.sampled_from([1, 2, 3, True, 2.0, np.int16(2), np.uint8(3)]), max_size=4))


@settings(max_examples=100, deadline=None)
@given(ids=_ID_LISTS, as_array=st.booleans(), kind=st.sampled_from(["packed", "lm"]))
def test_request_building_matches_a_plain_python_reference(ids, as_array, kind):
    """The vectorized id checks and index building against a loop written here: the same ids
    are accepted (as a list or an ndarray), the same are refused, and the descriptor order is
    pools, then layers, then the given pages."""
    _, lays = _layouts()
    layout = lays[kind]
    blocks = np.asarray(ids) if as_array and ids else ids
    n = NUM_BLOCKS if kind == "packed" else NUM_PAGES
    # reference: every id a real int (not bool/float), in range, not reserved, no repeats
    # page/block 0, and pages holding a stored state sentinel row (layer-major here; the packed
    # layout stores none)
    reserved = {0} | {p.sentinel // p.tokens_per_page for p in layout.pools
                      if p.spec.kind == "state" and p.sentinel is not None}
    vals = np.asarray(blocks).tolist() if isinstance(blocks, np.ndarray) else list(blocks)
    elems = list(blocks)
    ok_type = all(isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_))
                  for b in elems)
    if isinstance(blocks, np.ndarray):
        ok_type = blocks.dtype.kind in "iu"
    valid = (ok_type and all(0 <= v < n and v not in reserved for v in vals)
             and len(set(vals)) == len(vals))
    if not valid:
        with pytest.raises(ValueError):
            T.descriptor_count(layout, blocks)
        return
    if kind == "packed":
        expect = [int(v) for v in vals]
    else:
        expect, base = [], 0
        for p in layout.pools:
            for layer in range(p.spec.num_layers):
                expect.extend(base + layer * p.num_pages + int(v) for v in vals)
            base += p.spec.num_layers * p.num_pages
    norm = T._normalize_blocks(layout, blocks, None, "blocks")
    got = T._desc_indices(layout, norm)
    assert got.dtype == np.int32 and got.tolist() == expect
    assert T.descriptor_count(layout, blocks) == len(expect)


def test_layer_major_token_pools_may_use_the_last_page():
    _, lays = _layouts()
    lm = lays["lm"]
    assert T.descriptor_count(lm, [NUM_PAGES - 1], pools=("c4",)) == lm.pool("c4").spec.num_layers


# ---------------------------------------------------------------------------------------------
# Two processes


_set = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"))
_get = jax.jit(jaxkv.get_tokens, static_argnames=("pool", "layer"))


def _peer_main(conn, name, seed, torch_device="cpu"):
    """A process holding an Agent and one registered cache per layout ("torch": a torch-owned
    packed cache on ``torch_device``); serves commands."""
    import traceback
    import warnings

    from jaxkv.interop import transfer as T

    geo, lays = _layouts()
    agent = T.Agent(name, progress_thread=False)  # no busy thread; progress() while idle
    regs, reg_warnings = {}, {}
    for i, (k, lay) in enumerate(lays.items()):
        c = _random_cache(lay, seed + i)
        if k == "torch":
            c = T.torch_owned_cache(lay, torch_device, init=c)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            regs[k] = agent.register(c)
        reg_warnings[k] = [str(x.message) for x in w if x.category is T.VRAMTransportWarning]
    pending, xfers = {}, {}

    def fill(kind, plan, tokens):
        # jaxkv.set_tokens of every plan item (pool, layers, pages) with the given tokens
        reg = regs[kind]
        c = reg.cache
        for (name, layers, pages), parts in zip(plan, tokens):
            p = reg.layout.pool(name)
            toks = F.from_parts(p.spec.fmt, *map(jnp.asarray, parts))
            c = _set(c, name, layers, _locs(p, pages), toks)
        reg.update(c)  # not donated: copied into the registered memory

    def get(kind, plan):
        c = regs[kind].cache
        out = []
        for name, layers, pages in plan:
            p = c.layout.pool(name)
            t = _get(c, name, layers, _locs(p, pages))
            out.append(tuple(np.asarray(x) for x in F.to_parts(p.spec.fmt, t)))
        return out

    def raw(kind):
        return [np.asarray(b).copy() for b in regs[kind].cache.buffers]

    cmds = {
        "metadata": lambda: agent.metadata(),
        "add_peer": lambda md: agent.add_peer(md),
        "remote": lambda kind: regs[kind].remote(),
        "fill": fill, "get": get, "raw": raw,
        "expect": lambda tag, kind, dst, peer: pending.__setitem__(
            tag, regs[kind].expect(tag, dst, peer=peer)),
        "write": lambda tag, kind, remote, src, dst, pools=None: xfers.__setitem__(
            tag, regs[kind].write(remote, src, dst, tag, pools=pools)),
        "read": lambda tag, kind, remote, src, dst, pools=None: pending.__setitem__(
            tag, regs[kind].read(remote, src, dst, tag, pools=pools)),
        "wait_write": lambda tag, timeout: xfers.pop(tag).wait(timeout),
        "wait": lambda tag, timeout: (lambda c: None if c is None else "cache")(
            pending.pop(tag).wait(timeout)),
        "cache_state": lambda kind: _cache_state(regs[kind]),
        "invalid": lambda kind: sorted(regs[kind].invalid_blocks, key=str),
        "clear_invalid": lambda kind: regs[kind].clear_invalid(),
        "write_loop": lambda kind, remote, src, dst, seconds, timeout: _write_loop(
            regs[kind], remote, src, dst, seconds, timeout, conn),
        "misuse": lambda kind, peer: _misuse(regs[kind], peer),
        "bad_remote": lambda kind, remote: _bad_remote(regs[kind], remote),
        "torch_misuse": lambda peer: _torch_misuse(regs["torch"], peer),
        "reg_info": lambda kind: (regs[kind].mem_type, reg_warnings[kind],
                                  T.cuda_ipc_info(regs[kind].regions[0].addr)["legacy_ipc"]
                                  if regs[kind].mem_type == "VRAM" else None),
    }
    while True:
        try:
            while not conn.poll(0.001):
                agent.progress()
            cmd, args = conn.recv()
        except EOFError:
            return
        if cmd == "exit":
            agent.close()
            conn.send(("ok", None))
            return
        try:
            res = cmds[cmd](*args)
            conn.send(("ok", res))
        except Exception as e:
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))


def _cache_state(reg):
    try:
        reg.cache
        return "available"
    except T.TransferInFlightError:
        return "locked"


def _write_loop(reg, remote, src, dst, seconds, timeout, conn):
    """Keeps WRITEing until an error; reports (n ok, error, seconds from the first failure)."""
    before = [np.asarray(b).copy() for b in reg.cache.buffers]
    n, t_end = 0, time.monotonic() + seconds
    conn.send(("started", None))
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        try:
            x = reg.write(remote, src, dst, b"loop-%d" % n)
            x.wait(timeout)
            n += 1
        except T.TransferError as e:
            took = time.monotonic() - t0
            after = [np.asarray(b) for b in reg.cache.buffers]
            same = all((a == b).all() for a, b in zip(before, after))
            return n, str(e), took, same
    return n, None, None, True


def _misuse(reg, peer):
    """Ownership protocol misuse -> errors; returns the messages."""
    out = {}
    old = reg.cache
    p = reg.expect(b"never", [2], peer=peer)
    try:
        reg.cache
    except T.TransferInFlightError as e:
        out["cache_in_flight"] = str(e)
    try:
        np.asarray(old.buffers[0])  # handed out before the transfer: deleted now
    except RuntimeError as e:
        out["old_array"] = str(e)
    try:
        reg.update(old)
    except (T.TransferInFlightError, RuntimeError, ValueError) as e:
        out["update_in_flight"] = str(e)
    try:
        reg.release()
    except T.TransferInFlightError as e:
        out["release_in_flight"] = str(e)
    try:
        reg.expect(b"clash", [2, 3], peer=peer)
    except ValueError as e:
        out["overlap"] = str(e)
    try:
        p.wait(0.2)
    except T.TransferError as e:
        out["timeout"] = str(e)
    out["invalid_after_timeout"] = sorted(reg.invalid_blocks, key=str)
    reg.clear_invalid()
    c = reg.cache  # available again
    donate = jax.jit(lambda c: jax.tree.map(lambda b: b + jnp.uint8(0), c), donate_argnums=0)
    c2 = donate(c)  # donation: in place on CPU, reg.update adopts it
    reg.update(c2)
    try:
        reg.expect(b"x", [1], peer="nobody")
    except ValueError as e:
        out["unknown_peer"] = str(e)
    # a NumPy view of a registered buffer (zero-copy on CPU) keeps JAX from taking it back:
    # expect refuses with a clear error and leaves the registration as it was
    before = [np.array(b) for b in reg.cache.buffers]  # copies
    view = np.asarray(reg.cache.buffers[0])
    out["view_is_zero_copy"] = view.__array_interface__["data"][0] == reg.regions[0].addr
    try:
        reg.expect(b"viewed", [3], peer=peer)
        out["view"] = None
    except ValueError as e:
        out["view"] = str(e)
    out["view_state"] = _cache_state(reg)
    out["view_bytes_same"] = all((a == np.asarray(b)).all()
                                 for a, b in zip(before, reg.cache.buffers))
    del view
    p = reg.expect(b"after-view", [3], peer=peer)  # works once the view is gone
    out["after_view_state"] = _cache_state(reg)
    try:
        p.wait(0.05)
    except T.TransferError:
        pass
    reg.clear_invalid()
    return out


def _torch_misuse(reg, peer):
    """Torch-owned cache: locked while a transfer is in flight, views never donatable."""
    from jaxkv.interop import OwnershipError, donate_safe
    out = {}
    old = reg.cache
    out["zero_copy"] = [int(b.unsafe_buffer_pointer()) for b in old.buffers] == [
        r.addr for r in reg.regions]
    p = reg.expect(b"torch-never", [2], peer=peer)
    try:
        reg.cache
    except T.TransferInFlightError as e:
        out["cache_in_flight"] = str(e)
    out["old_deleted"] = all(b.is_deleted() for b in old.buffers)
    try:
        p.wait(0.2)
    except T.TransferError as e:
        out["timeout"] = str(e)
    out["invalid_after_timeout"] = sorted(reg.invalid_blocks, key=str)
    reg.clear_invalid()
    c = reg.cache
    try:
        donate_safe(c)
    except OwnershipError as e:
        out["donate"] = str(e)
    return out


def _bad_remote(reg, remote):
    """Descriptors outside the peer's registered memory -> clear error."""
    import dataclasses
    shifted = dataclasses.replace(remote, regions=tuple(
        r._replace(addr=r.addr + (1 << 40)) for r in remote.regions))
    try:
        reg.write(shifted, [1], [2], b"bad").wait(2)
        return None
    except T.TransferError as e:
        return str(e)


class Peer:
    def __init__(self, name, seed, torch_device="cpu"):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, name, seed, torch_device),
                                daemon=True)
        self.proc.start()
        self.name = name

    def send(self, cmd, *args):
        self.conn.send((cmd, args))

    def recv(self, timeout=RECV_TIMEOUT):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer {self.name} did not answer in {timeout} s")
        st, res = self.conn.recv()
        if st == "err":
            raise RuntimeError(f"{self.name}: {res[0]}: {res[1]}\n{res[2]}")
        return res

    def __call__(self, cmd, *args, timeout=RECV_TIMEOUT):
        self.send(cmd, *args)
        return self.recv(timeout)

    def kill(self):
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self("exit", timeout=5)
            except Exception:
                pass
            self.proc.join(2)
        self.kill()


def _connect(a, b):
    a("add_peer", b("metadata"))
    b("add_peer", a("metadata"))


@pytest.fixture(scope="module")
def procs():
    """prefill + decode, and one victim per side for the kill tests (all started at once)."""
    if not HAVE_NIXL:
        pytest.skip("nixl not importable: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1")
    ps = {}
    try:
        for i, name in enumerate(["prefill", "decode", "prefill-victim", "decode-victim"]):
            ps[name] = Peer(name, 100 * (i + 1))
        _connect(ps["prefill"], ps["decode"])
        _connect(ps["prefill"], ps["decode-victim"])
        _connect(ps["prefill-victim"], ps["decode"])
        yield ps
    finally:
        for p in ps.values():
            try:
                p.send("exit")
            except OSError:  # killed
                pass
        for p in ps.values():
            p.close()


@pytest.fixture
def pair(procs):
    return procs["prefill"], procs["decode"]


def _plan(layout, blocks, seed):
    """What to write for a request's blocks: a list of (pool, layers, pages).

    Layer-major: every pool, all layers, all blocks.  Packed: a block holds one KV-cache group at
    a time (groups share slots), so each block gets a random set of (pool, group) whose byte
    ranges inside the block do not overlap.
    """
    if layout.kind != "packed":
        return [(p.name, None, list(blocks)) for p in layout.pools]
    rng = np.random.default_rng(seed)
    units = [(p, g) for p in layout.pools for g in p.groups]
    pages = {}
    for b in blocks:
        taken = np.zeros(layout.block_stride, bool)
        for i in rng.permutation(len(units)):
            p, g = units[int(i)]
            spans = [(p.placements[x].col, p.placements[x].col + p.page_bytes) for x in g]
            if any(taken[a:e].any() for a, e in spans):
                continue
            for a, e in spans:
                taken[a:e] = True
            pages.setdefault((p.name, tuple(g)), []).append(b)
    return [(name, g, pg) for (name, g), pg in pages.items()]


def _tokens(layout, plan, seed):
    """Random raw token parts (value uint8[L, N, V], scale uint8[L, N, S]) per plan item."""
    rng = np.random.default_rng(seed)
    out = []
    for name, layers, pages in plan:
        p = layout.pool(name)
        n_layers = p.spec.num_layers if layers is None else len(layers)
        n = len(_locs(p, pages))
        fmt = p.spec.fmt
        out.append((rng.integers(0, 256, (n_layers, n, fmt.value_bytes), dtype=np.uint8),
                    rng.integers(0, 256, (n_layers, n, fmt.scale_bytes), dtype=np.uint8)))
    return out


def _expected(before_dst, src_raw, layout, src_blocks, dst_blocks):
    """Independent numpy reference: the destination buffers after copying the blocks."""
    exp = [b.copy() for b in before_dst]
    if layout.kind == "packed":
        for s, d in zip(src_blocks, dst_blocks):
            exp[0][d] = src_raw[0][s]
        return exp
    for i, p in enumerate(layout.pools):
        n = p.num_pages
        for layer in range(p.spec.num_layers):
            for s, d in zip(src_blocks, dst_blocks):
                exp[i][layer * n + d] = src_raw[i][layer * n + s]
    return exp


# requests (src blocks on prefill, dst blocks chosen by decode), several per layout
REQUESTS = {
    "packed": [([1, 3], [4, 2]), ([2], [1]), ([4], [3])],
    "lm": [([1], [2]), ([2], [1])],  # swapped: no aliasing between requests
}
REQUESTS["torch"] = REQUESTS["packed"]


@needs_nixl
@pytest.mark.parametrize("kind", ["packed", "lm", "torch"])
@pytest.mark.parametrize("mode", ["write", "read"])
def test_prefill_to_decode_bit_exact(pair, kind, mode):
    _check_transfer(*pair, kind, mode)


def _check_transfer(pre, dec, kind, mode):
    _, lays = _layouts()
    layout = lays[kind]
    reqs = REQUESTS[kind]
    all_src = sorted(b for s, _ in reqs for b in s)
    plan = _plan(layout, all_src, 7)  # same shapes in both modes: compiled once per process
    tokens = _tokens(layout, plan, {"write": 0, "read": 1}[mode])
    to_dst = {s: d for src, dst in reqs for s, d in zip(src, dst)}
    dst_plan = [(n, ly, [to_dst[b] for b in pg]) for n, ly, pg in plan]
    pre.send("fill", kind, plan, tokens)
    dec.send("get", kind, dst_plan)  # compiles the reads while the prefill writes
    pre.recv()
    dec.recv()
    src_before = pre("raw", kind)
    dst_before = dec("raw", kind)
    remote_pre, remote_dec = pre("remote", kind), dec("remote", kind)
    if kind in ("packed", "torch"):
        assert len(remote_dec.regions) == 1
    for i, (src, dst) in enumerate(reqs):  # all requests in flight together
        tag = b"%s-%s-%d" % (mode.encode(), kind.encode(), i)
        if mode == "write":
            dec("expect", tag, kind, dst, pre.name)
            assert dec("cache_state", kind) == "locked"
            pre("write", tag, kind, remote_dec, src, dst)
        else:
            dec("read", tag, kind, remote_pre, src, dst)
    for i, _ in enumerate(reqs):
        tag = b"%s-%s-%d" % (mode.encode(), kind.encode(), i)
        if mode == "write":
            pre("wait_write", tag, 20.0)
        got = dec("wait", tag, 20.0)
        assert got == ("cache" if i == len(reqs) - 1 else None)  # last wait returns the cache
    assert dec("cache_state", kind) == "available"
    # raw bytes: destination blocks replaced, every other byte untouched; source unchanged
    exp = _expected(dst_before, src_before, layout, [b for s, _ in reqs for b in s],
                    [b for _, d in reqs for b in d])
    for e, g in zip(exp, dec("raw", kind)):
        np.testing.assert_array_equal(g, e)
    for a, b in zip(src_before, pre("raw", kind)):
        np.testing.assert_array_equal(a, b)
    # tokens, bit-exact through get_tokens: the decode reads at the destination blocks exactly
    # the tokens written at the source blocks
    got = dec("get", kind, dst_plan)
    for (name, layers, pages), g_parts, w_parts in zip(plan, got, tokens):
        for g, w in zip(g_parts, w_parts):
            np.testing.assert_array_equal(g.view(np.uint8).reshape(w.shape), w)
    assert dec("invalid", kind) == []


@needs_nixl
def test_ownership_misuse_is_an_error(pair):
    pre, dec = pair
    out = dec("misuse", "packed", pre.name)
    assert "in flight" in out["cache_in_flight"]
    assert "deleted" in out["old_array"].lower()
    assert "in flight" in out["update_in_flight"]
    assert "in flight" in out["release_in_flight"]
    assert "already the destination" in out["overlap"]
    assert "not done after" in out["timeout"] and "not valid" in out["timeout"]
    assert out["invalid_after_timeout"] == [2]
    assert "unknown peer" in out["unknown_peer"]
    assert out["view_is_zero_copy"] or jax.devices()[0].platform != "cpu"
    if out["view_is_zero_copy"]:
        assert "still referenced outside JAX" in out["view"]
        assert out["view_state"] == "available" and out["view_bytes_same"]
        assert out["after_view_state"] == "locked"
    assert dec("cache_state", "packed") == "available"


@needs_nixl
def test_bad_descriptors_and_layout_mismatch(pair):
    pre, dec = pair
    msg = pre("bad_remote", "packed", dec("remote", "packed"))
    assert msg is not None and "registered" in msg
    with pytest.raises(RuntimeError, match="re-layout is not supported"):
        pre("write", b"mix", "packed", dec("remote", "lm"), [1], [2])
    with pytest.raises(RuntimeError, match="same length"):
        pre("write", b"len", "packed", dec("remote", "packed"), [1, 2], [3])
    with pytest.raises(RuntimeError, match="reserved"):
        pre("write", b"res", "packed", dec("remote", "packed"), [1], [0])


@needs_nixl
@pytest.mark.parametrize("who", ["decode_killed_during_write", "prefill_killed_during_read"])
def test_peer_killed_mid_transfer(procs, who):
    """The initiator reports an error in bounded time; source unchanged; dst not valid."""
    if who == "decode_killed_during_write":
        pre, dec = procs["prefill"], procs["decode-victim"]
        remote = dec("remote", "lm")
        pre.send("write_loop", "lm", remote, [1, 2], [2, 1], 30.0, 5.0)
        assert pre.recv() is None  # started
        time.sleep(0.3)
        dec.kill()
        t0 = time.monotonic()
        n, err, took, same = pre.recv(timeout=30)
        assert err is not None, "transfers kept succeeding after the peer died"
        assert time.monotonic() - t0 < 15 and took <= 6.0
        assert n > 0 and same  # some transfers worked; the source cache is unchanged
        return
    pre, dec = procs["prefill-victim"], procs["decode"]
    remote = pre("remote", "lm")
    before = dec("raw", "lm")
    dec("read", b"r", "lm", remote, {"swa": [1, 2, 3]}, {"swa": [3, 2, 1]})  # 19 MB
    pre.kill()
    t0 = time.monotonic()
    try:
        dec("wait", b"r", 5.0, timeout=30)
        ok = True  # the read may have finished before the kill landed
    except RuntimeError as e:
        ok = False
        assert "TransferError" in str(e)
    assert time.monotonic() - t0 < 15
    assert dec("cache_state", "lm") == "available"
    after = dec("raw", "lm")
    for a, b in zip(before[1:], after[1:]):  # other pools untouched
        np.testing.assert_array_equal(a, b)
    if not ok:
        assert dec("invalid", "lm") == [("swa", 1), ("swa", 2), ("swa", 3)]
    # a new READ from the dead peer fails in bounded time, its destination is not marked valid
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="TransferError"):
        dec("read", b"r2", "lm", remote, [1], [2], timeout=30)
        dec("wait", b"r2", 5.0, timeout=30)
    assert time.monotonic() - t0 < 15
    inv = dec("invalid", "lm")
    assert ("c4", 2) in inv and ("swa", 2) in inv
    dec("clear_invalid", "lm")


# ---------------------------------------------------------------------------------------------
# Torch-owned caches (torch allocates, JAX views zero-copy): what UCX's cuda_ipc can map on GPU


def test_torch_owned_cache_is_a_zero_copy_view_that_cannot_be_donated():
    import torch

    from jaxkv.interop import OwnershipError, donate_safe, jit_donating
    geo, lays = _layouts()
    layout = lays["lm"]
    init = _random_cache(layout, 3)
    oc = T.torch_owned_cache(layout, "cpu", init=init)
    assert len(oc.tensors) == len(layout.buffer_shapes) and oc.device == torch.device("cpu")
    c = oc.cache
    for b, t, src in zip(c.buffers, oc.tensors, init.buffers):
        assert b.unsafe_buffer_pointer() == t.data_ptr()  # zero-copy
        assert t.dtype == torch.uint8 and tuple(t.shape) == b.shape
        np.testing.assert_array_equal(t.numpy(), np.asarray(src))  # init copied bit-exact
    oc.tensors[0][1, :7] = torch.arange(7, dtype=torch.uint8) + 9  # torch writes, JAX sees them
    np.testing.assert_array_equal(np.asarray(oc.cache.buffers[0])[1, :7], np.arange(7) + 9)
    with pytest.raises(OwnershipError, match="torch-owned"):
        donate_safe(c)
    with pytest.raises(OwnershipError, match="torch-owned"):
        jit_donating(lambda cache: cache, donate_argnames="cache")(c)
    # default init: init_cache's content (zeros + sentinel rows), not uninitialised memory
    z = T.torch_owned_cache(layout, "cpu")
    for t, e in zip(z.tensors, jaxkv.init_cache(geo, layout).buffers):
        np.testing.assert_array_equal(t.numpy(), np.asarray(e))


def test_torch_owned_cache_argument_checks():
    import torch
    geo, lays = _layouts()
    with pytest.raises(ValueError, match="layout"):
        T.torch_owned_cache("packed", "cpu")
    with pytest.raises(ValueError, match="init"):
        T.torch_owned_cache(lays["packed"], "cpu", init=jaxkv.init_cache(geo, lays["lm"]))
    with pytest.raises(ValueError, match="device"):
        T.torch_owned_cache(lays["packed"], "meta")
    shape = lays["packed"].buffer_shapes[0]
    with pytest.raises(ValueError, match="uint8"):
        T.TorchOwnedCache([torch.zeros(shape, dtype=torch.int32)], lays["packed"])
    with pytest.raises(ValueError, match="shape"):
        T.TorchOwnedCache([torch.zeros((1, 8), dtype=torch.uint8)], lays["packed"])
    with pytest.raises(ValueError, match="buffers"):
        T.TorchOwnedCache([], lays["packed"])


@needs_nixl
def test_register_torch_owned_cache_never_donates_and_refuses_plain_views():
    import torch

    from jaxkv.interop import from_torch
    _, lays = _layouts()
    layout = lays["packed"]
    agent = T.Agent("torch-local", progress_thread=False)
    try:
        ts = [torch.randint(0, 256, tuple(s), dtype=torch.uint8) for s in layout.buffer_shapes]
        plain = jaxkv.Cache(tuple(from_torch(t) for t in ts), layout)
        with pytest.raises(ValueError, match="TorchOwnedCache"):
            agent.register(plain)  # registering a plain Cache donates: refused
        assert not any(b.is_deleted() for b in plain.buffers)
        with pytest.raises(ValueError, match="ipc_check"):
            agent.register(T.TorchOwnedCache(ts, layout), ipc_check="maybe")
        before = [t.clone() for t in ts]
        reg = agent.register(T.TorchOwnedCache(ts, layout))
        assert [r.addr for r in reg.regions] == [t.data_ptr() for t in ts]
        c = reg.cache
        assert c.buffers[0].unsafe_buffer_pointer() == ts[0].data_ptr()
        # update copies into the torch memory; the tensors see the new bytes, nothing else moves
        rng = np.random.default_rng(5)
        new = rng.integers(0, 256, layout.buffer_shapes[0], dtype=np.uint8)
        reg.update(jaxkv.Cache((jnp.asarray(new),), layout))
        np.testing.assert_array_equal(ts[0].numpy(), new)
        assert reg.cache.buffers[0].unsafe_buffer_pointer() == ts[0].data_ptr()
        assert c.buffers[0].is_deleted()  # views handed out before the update are dead
        out = reg.release()
        np.testing.assert_array_equal(np.asarray(out.buffers[0]), new)
        assert not torch.equal(before[0], ts[0])
    finally:
        agent.close()


@needs_nixl
def test_torch_owned_cache_locked_while_a_transfer_is_in_flight(pair):
    pre, dec = pair
    out = dec("torch_misuse", pre.name)
    assert out["zero_copy"]
    assert "in flight" in out["cache_in_flight"] and out["old_deleted"]
    assert "not done after" in out["timeout"] and out["invalid_after_timeout"] == [2]
    assert "torch-owned" in out["donate"]
    assert dec("cache_state", "torch") == "available"


@pytest.mark.gpu
@needs_nixl
def test_vram_transfer_with_torch_owned_caches():
    """Two processes, torch-owned VRAM caches (cudaMalloc: cuda_ipc can map them): bit-exact
    through get_tokens; a JAX-owned VRAM cache gets VRAMTransportWarning when its memory is not
    legacy-IPC capable, the torch-owned one none."""
    peers = [Peer("prefill-gpu", 700, "cuda:0"), Peer("decode-gpu", 800, "cuda:0")]
    try:
        pre, dec = peers
        _connect(pre, dec)
        for p in peers:
            mem, warned, legacy = p("reg_info", "torch")
            assert mem == "VRAM" and legacy is True and warned == []
            mem, warned, legacy = p("reg_info", "packed")
            assert mem == "VRAM" and (legacy or len(warned) == 1)
            if warned:
                assert "torch_owned_cache" in warned[0]
        _check_transfer(pre, dec, "torch", "write")
        _check_transfer(pre, dec, "torch", "read")
    finally:
        for p in peers:
            p.close()
