"""Tests of jaxkv.host_pool against a plain-numpy model of the page bytes (SPEC §2, §7)."""
import ctypes
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxkv
from jaxkv import host_pool as hp

# ------------------------------------------------------------------------------------------------
# Fixtures and the independent reference


def _random_cache(geo, layout, seed):
    rng = np.random.default_rng(seed)
    bufs = tuple(jnp.asarray(rng.integers(0, 256, size=s, dtype=np.uint8))
                 for s in layout.buffer_shapes)
    return jaxkv.Cache(bufs, layout)


def _poison_host(h, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=h.spec.shape, dtype=np.uint8)
    return dataclasses.replace(h, buffer=jax.device_put(data, h.spec.sharding)), data


def _dev_pages(cache, pool):
    """numpy uint8[L, num_pages, page_bytes] of a device pool, read with plain numpy slicing."""
    p = cache.layout.pool(pool)
    out = []
    for pl in p.placements:
        buf = np.asarray(cache.buffers[pl.buffer])
        rows = pl.row_base + np.arange(p.num_pages) * pl.row_step
        out.append(buf[rows, pl.col:pl.col + p.page_bytes])
    return np.stack(out)


def _host_pages(h):
    s = h.spec
    return np.asarray(h.buffer).reshape(s.num_layers, s.num_pages, s.page_bytes)


def _token_ranges(spec, slot):
    """(page, [(start, stop), ...]) byte ranges of one token slot: value, then whole scale slot."""
    tpp, v, s = spec.tokens_per_page, spec.value_bytes, spec.scale_stride
    page, t = divmod(int(slot), tpp)
    ranges = [(t * v, (t + 1) * v)]
    if s:
        ranges.append((tpp * v + t * s, tpp * v + (t + 1) * s))
    return page, ranges


def _ref_copy(dst, src, dst_idx, src_idx, spec, layers):
    """Reference token copy between [L, P, PB] numpy page arrays (dst modified in place)."""
    for d, s_ in zip(dst_idx, src_idx):
        dp, dr = _token_ranges(spec, d)
        sp, sr = _token_ranges(spec, s_)
        for (a, b), (c, e) in zip(dr, sr):
            for l in layers:
                dst[l, dp, a:b] = src[l, sp, c:e]


GEOS = {
    "dsv4": lambda: jaxkv.tiny(5),
    "v32": lambda: jaxkv.tiny(3, v32=True),
}
POOLS = [("dsv4", "swa"), ("dsv4", "c4"), ("dsv4", "c128"), ("dsv4", "c4_indexer"),
         ("v32", "kv"), ("v32", "indexer")]


def _setup(geo_name, pool, *, pages=8, host_pages=10, packed=False, seed=0):
    geo = GEOS[geo_name]()
    layout = jaxkv.packed(geo, pages) if packed else jaxkv.layer_major(geo, pages)
    cache = _random_cache(geo, layout, seed)
    h = hp.init_host_pool(cache, pool, host_pages)
    h, poison = _poison_host(h, seed + 1)
    return geo, cache, h, poison


# ------------------------------------------------------------------------------------------------
# Backup: page path and token path


@pytest.mark.parametrize("geo_name,pool", POOLS)
def test_backup_page_aligned_is_byte_equal(geo_name, pool):
    _, cache, h, poison = _setup(geo_name, pool)
    s = h.spec
    tpp = s.tokens_per_page
    h, slots = hp.alloc(h, 3 * tpp)
    dev_pages = np.array([5, 1, 6])
    dev = (dev_pages[:, None] * tpp + np.arange(tpp)).ravel()
    h2 = hp.backup_from_device(h, cache, pool, slots, dev)
    got, want = _host_pages(h2), poison.reshape(_host_pages(h2).shape).copy()
    d = _dev_pages(cache, pool)
    want[:, :3] = d[:, dev_pages]            # whole pages, padding included
    np.testing.assert_array_equal(got, want)  # untouched pages keep the poison


@pytest.mark.parametrize("geo_name,pool", POOLS)
@pytest.mark.parametrize("order", ["random", "contiguous"])
def test_backup_token_granular_matches_reference(geo_name, pool, order):
    _, cache, h, poison = _setup(geo_name, pool, seed=3)
    s = h.spec
    rng = np.random.default_rng(7)
    n = 2 * s.tokens_per_page + 3                       # not a multiple of the page size
    h, slots = hp.alloc(h, n)
    if order == "random":
        host_idx = rng.permutation(slots)[:n]           # random slots of the new pages
    else:  # two fully covered pages (no read-back but their padding) and one partial page
        host_idx = slots[:n]
    dev_cap = cache.layout.pool(pool).capacity
    dev_idx = rng.integers(0, dev_cap, n)               # random, repeats allowed (sources)
    h2 = hp.backup_from_device(h, cache, pool, host_idx, dev_idx)
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    _ref_copy(want, _dev_pages(cache, pool), host_idx, dev_idx, s, range(s.num_layers))
    np.testing.assert_array_equal(_host_pages(h2), want)


def test_backup_multiple_of_page_but_not_whole_pages_takes_token_path():
    _, cache, h, poison = _setup("dsv4", "c4", seed=5)
    s = h.spec
    tpp = s.tokens_per_page
    h, slots = hp.alloc(h, 2 * tpp)
    host_idx = slots[::-1].copy()                       # count is 2 pages, but reversed
    dev_idx = np.arange(tpp, 3 * tpp)
    h2 = hp.backup_from_device(h, cache, "c4", host_idx, dev_idx)
    want = poison.reshape(_host_pages(h2).shape).copy()
    _ref_copy(want, _dev_pages(cache, "c4"), host_idx, dev_idx, s, range(s.num_layers))
    np.testing.assert_array_equal(_host_pages(h2), want)


def test_backup_packed_layout():
    _, cache, h, poison = _setup("dsv4", "c4", packed=True, seed=9)
    s = h.spec
    tpp = s.tokens_per_page
    h, slots = hp.alloc(h, 2 * tpp)
    dev = np.concatenate([np.arange(4 * tpp, 5 * tpp), np.arange(2 * tpp, 3 * tpp)])
    h2 = hp.backup_from_device(h, cache, "c4", slots, dev)
    want = poison.reshape(_host_pages(h2).shape).copy()
    want[:, :2] = _dev_pages(cache, "c4")[:, [4, 2]]
    np.testing.assert_array_equal(_host_pages(h2), want)


@pytest.mark.parametrize("aligned", [True, False])
def test_backup_one_layer(aligned):
    _, cache, h, poison = _setup("dsv4", "swa", seed=11)
    s = h.spec
    tpp = s.tokens_per_page
    h, slots = hp.alloc(h, tpp)
    dev = np.arange(3 * tpp, 4 * tpp) if aligned else np.arange(3 * tpp, 4 * tpp)[::-1].copy()
    h2 = hp.backup_from_device(h, cache, "swa", slots, dev, layer=2)
    want = poison.reshape(_host_pages(h2).shape).copy()
    _ref_copy(want, _dev_pages(cache, "swa"), slots, dev, s, [2])
    if aligned:
        want[2, 0] = _dev_pages(cache, "swa")[2, 3]
    np.testing.assert_array_equal(_host_pages(h2), want)


# ------------------------------------------------------------------------------------------------
# Round trips back to different device pages


@pytest.mark.parametrize("geo_name,pool", POOLS)
@pytest.mark.parametrize("aligned", [True, False])
def test_round_trip_to_different_device_pages(geo_name, pool, aligned):
    _, cache, h, _ = _setup(geo_name, pool, seed=13)
    s = h.spec
    tpp = s.tokens_per_page
    rng = np.random.default_rng(17)
    n = 3 * tpp if aligned else 3 * tpp - 2
    src_pages = np.array([2, 7, 4])
    src = (src_pages[:, None] * tpp + np.arange(tpp)).ravel()[:n]
    h, slots = hp.alloc(h, n)
    h = hp.backup_from_device(h, cache, pool, slots[:n], src)
    before = _dev_pages(cache, pool)
    dst_pages = np.array([1, 5, 3])
    dst = (dst_pages[:, None] * tpp + np.arange(tpp)).ravel()[:n]
    if not aligned:
        dst = rng.permutation(dst)
    new = hp.load_to_device(h, cache, pool, slots[:n], dst)
    after = _dev_pages(new, pool)
    want = before.copy()
    if aligned:
        want[:, dst_pages] = before[:, src_pages]          # whole pages incl. padding
    else:
        hostp = _host_pages(h)
        _ref_copy(want, hostp, dst, slots[:n], s, range(s.num_layers))
        # the tokens themselves went device -> host -> device unchanged
        check = before.copy()
        _ref_copy(check, before, dst, src, s, range(s.num_layers))
        np.testing.assert_array_equal(after, check)
    np.testing.assert_array_equal(after, want)
    # other pools' bytes are untouched
    b = cache.layout.pool(pool).placements[0].buffer
    for i, (x, y) in enumerate(zip(cache.buffers, new.buffers)):
        if i != b:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("aligned", [True, False])
def test_load_one_layer(aligned):
    _, cache, h, poison = _setup("dsv4", "c4", seed=19)
    s = h.spec
    tpp = s.tokens_per_page
    h, slots = hp.alloc(h, tpp)
    dst = np.arange(6 * tpp, 7 * tpp) if aligned else np.arange(6 * tpp, 7 * tpp)[::-1].copy()
    before = _dev_pages(cache, "c4")
    new = hp.load_to_device_per_layer(h, cache, "c4", 1, slots, dst, donate=False)
    want = before.copy()
    _ref_copy(want, _host_pages(h), dst, slots, s, [1])
    if aligned:
        want[1, 6] = _host_pages(h)[1, 0]
    np.testing.assert_array_equal(_dev_pages(new, "c4"), want)
    np.testing.assert_array_equal(_dev_pages(cache, "c4"), before)  # donate=False kept it


@settings(max_examples=5, deadline=None)
@given(st.data())
def test_round_trip_property(data):
    _, cache, h, _ = _setup("dsv4", "c4", seed=21)
    s = h.spec
    cap = cache.layout.pool("c4").capacity
    n = data.draw(st.integers(1, 3 * s.tokens_per_page), label="n")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    h, slots = hp.alloc(h, n)
    src = rng.choice(cap, n, replace=False)
    hidx = rng.permutation(slots)[:n]
    h = hp.backup_from_device(h, cache, "c4", hidx, src)
    dst = rng.choice(cap, n, replace=False)
    new = hp.load_to_device(h, cache, "c4", hidx, dst, donate=False)
    want = _dev_pages(cache, "c4").copy()
    _ref_copy(want, _dev_pages(cache, "c4"), dst, src, s, range(s.num_layers))
    np.testing.assert_array_equal(_dev_pages(new, "c4"), want)


# ------------------------------------------------------------------------------------------------
# Validation (SPEC §7) and failure atomicity


def test_missing_indices_do_nothing():
    _, cache, h, poison = _setup("dsv4", "c4")
    h, slots = hp.alloc(h, 4)
    assert hp.backup_from_device(h, cache, "c4", None, [1, 2]) is h
    assert hp.backup_from_device(h, cache, "c4", slots[:2], None) is h
    assert hp.backup_from_device(h, cache, "c4", [], []) is h
    assert hp.load_to_device(h, cache, "c4", None, None) is cache
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)


@pytest.mark.parametrize("case,match", [
    ("length", "same length"),
    ("host_oob", "host_indices"),
    ("dev_oob", "device_indices"),
    ("neg", "host_indices"),
    ("dup_host", "duplicate"),
    ("unalloc", "not allocated"),
    ("pool", "pool must be"),
    ("layer", "layer must be"),
    ("method", "method must be"),
    ("token_path", "token_path must be"),
    ("impl", "impl must be"),
    ("float", "integer"),
    ("2d", "1-D"),
])
def test_backup_validation_errors_leave_state_unchanged(case, match):
    _, cache, h, poison = _setup("dsv4", "c4")
    h, slots = hp.alloc(h, 8)
    cap = cache.layout.pool("c4").capacity
    hi, di, kw, pool = slots[:4], np.arange(4), {}, "c4"
    if case == "length":
        di = np.arange(5)
    elif case == "host_oob":
        hi = np.array([0, 1, 2, h.spec.capacity])
    elif case == "dev_oob":
        di = np.array([0, 1, 2, cap])
    elif case == "neg":
        hi = np.array([0, -1, 2, 3])
    elif case == "dup_host":
        hi = np.array([0, 1, 1, 3])
    elif case == "unalloc":
        hi = np.array([0, 1, 2, h.spec.capacity - 1])
    elif case == "pool":
        pool = "swa"
    elif case == "layer":
        kw = {"layer": 7}
    elif case == "method":
        kw = {"method": "cuda"}
    elif case == "token_path":
        kw = {"token_path": "fast"}
    elif case == "impl":
        kw = {"impl": "fast"}
    elif case == "float":
        hi = np.array([0.0, 1.0, 2.0, 3.0])
    elif case == "2d":
        hi = slots[:4].reshape(2, 2)
    with pytest.raises(ValueError, match=match):
        hp.backup_from_device(h, cache, pool, hi, di, **kw)
    assert not h.buffer.is_deleted()
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)
    # the state is still usable
    h2 = hp.backup_from_device(h, cache, "c4", slots[:4], np.arange(4))
    assert _host_pages(h2).shape[0] == h.spec.num_layers


def test_load_validation_errors():
    _, cache, h, _ = _setup("dsv4", "c4")
    h, slots = hp.alloc(h, 8)
    with pytest.raises(ValueError, match="duplicate"):
        hp.load_to_device(h, cache, "c4", slots[:2], [3, 3])
    with pytest.raises(ValueError, match="same length"):
        hp.load_to_device(h, cache, "c4", slots[:2], [3])
    with pytest.raises(ValueError, match="device_indices"):
        hp.load_to_device(h, cache, "c4", slots[:2], [3, -1])
    b = cache.layout.pool("c4").placements[0].buffer
    assert not cache.buffers[b].is_deleted()


def test_donated_state_is_rejected_and_traced_indices_are_rejected():
    _, cache, h, _ = _setup("dsv4", "c4")
    h, slots = hp.alloc(h, 4)
    h2 = hp.backup_from_device(h, cache, "c4", slots[:4], np.arange(4))
    assert h.buffer.is_deleted()          # the host buffer was donated (in-place update)
    with pytest.raises(ValueError, match="donated"):
        hp.backup_from_device(h, cache, "c4", slots[:4], np.arange(4))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda i: hp.backup_from_device(h2, cache, "c4", i, i).buffer)(
            jnp.arange(4))


def test_geometry_mismatch():
    geo = jaxkv.tiny(5)
    cache = _random_cache(geo, jaxkv.layer_major(geo, 8), 0)
    other = jaxkv.layer_major(geo, 8, indexer_align=576)
    h = hp.init_host_pool(other, "c4_indexer", 4)
    h, slots = hp.alloc(h, 4)
    with pytest.raises(ValueError, match="mirrors"):
        hp.backup_from_device(h, cache, "c4_indexer", slots[:4], np.arange(4))


# ------------------------------------------------------------------------------------------------
# Allocation


def test_alloc_rounds_up_and_free():
    _, _, h, _ = _setup("dsv4", "c4", host_pages=4)
    tpp = h.spec.tokens_per_page
    h1, a = hp.alloc(h, tpp + 1)
    assert a.dtype == np.int32 and a.size == 2 * tpp
    np.testing.assert_array_equal(a, np.arange(2 * tpp))
    assert h1.num_free_pages == 2 and h.num_free_pages == 4      # old state untouched
    h2, b = hp.alloc(h1, 1)
    np.testing.assert_array_equal(b, np.arange(2 * tpp, 3 * tpp))
    with pytest.raises(ValueError, match="free pages"):
        hp.alloc(h2, 2 * tpp)
    h3 = hp.free(h2, a[:1])                       # frees page 0
    assert h3.num_free_pages == 2
    with pytest.raises(ValueError, match="not allocated"):
        hp.free(h3, a[:1])
    h4, c = hp.alloc(h3, tpp)
    np.testing.assert_array_equal(c, np.arange(tpp))  # lowest free page first
    assert hp.free(h4, None) is h4
    with pytest.raises(ValueError, match="n_tokens"):
        hp.alloc(h4, -1)
    h5, e = hp.alloc(h4, 0)
    assert e.size == 0 and h5.num_free_pages == h4.num_free_pages


def test_host_token_len():
    geo = jaxkv.tiny(5)
    layout = jaxkv.layer_major(geo, 4)
    assert hp.host_token_len(hp.init_host_pool(layout, "c4", 2), 17) == 17 // geo.csa_ratio
    assert hp.host_token_len(hp.init_host_pool(layout, "swa", 2), 17) == 17
    full = jaxkv.layer_major(jaxkv.dsv4_flash(), 2)
    spec = hp.init_host_pool(full, "c4", 1).spec
    assert hp.host_token_len(spec, 1000) == 250
    assert (spec.page_bytes, spec.tokens_per_page) == (37440, 64)


# ------------------------------------------------------------------------------------------------
# Transfer-engine registration


def test_contiguous_buf_infos_are_real_addresses():
    _, cache, h, _ = _setup("dsv4", "swa")
    # XLA-owned poison: a buffer made by device_put of NumPy may alias the NumPy memory (zero-copy
    # depends on the allocation's alignment), and a donation of such a buffer is a copy on CPU
    h, poison = _owned_poison(h, 5)
    s = h.spec
    ptrs, lens, items = hp.contiguous_buf_infos(h)
    assert ptrs[0] == h.buffer.unsafe_buffer_pointer()
    assert lens == [s.num_pages * s.page_bytes] * s.num_layers
    assert items == [s.page_bytes] * s.num_layers
    assert h.buffer.sharding.memory_kind == s.memory_kind
    if jax.default_backend() == "cpu":  # host memory is directly readable: check the bytes
        for l, (p, n) in enumerate(zip(ptrs, lens)):
            raw = np.frombuffer((ctypes.c_uint8 * n).from_address(p), np.uint8)
            np.testing.assert_array_equal(raw, poison.reshape(s.num_layers, -1)[l])
    (rp,), (rl,), (ri,) = hp.contiguous_buf_infos(h, per="region")
    assert (rp, rl, ri) == (ptrs[0], s.nbytes, s.page_bytes)
    # in-place updates keep the registered addresses valid
    h, slots = hp.alloc(h, s.tokens_per_page)
    h2 = hp.backup_from_device(h, cache, "swa", slots, np.arange(s.tokens_per_page))
    assert hp.buffer_address(h2) == ptrs[0]
    with pytest.raises(ValueError, match="per must"):
        hp.contiguous_buf_infos(h2, per="page")


def test_memory_kind_is_host():
    _, _, h, _ = _setup("dsv4", "c4")
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" in kinds:
        assert h.spec.memory_kind == "pinned_host"
    assert h.buffer.sharding.memory_kind == h.spec.memory_kind


# ------------------------------------------------------------------------------------------------
# The "triton" method's kernel, run by Triton's interpreter on CPU: the device side is a torch CPU
# tensor, the host side the JAX host buffer written through its raw address (as on the GPU, where
# pinned host memory has the same address on the device).


def _interpret(h, cache, pool, hidx, didx, to_host, layer=None):
    torch = pytest.importorskip("torch")
    kernel = hp._copy_windows_kernel(interpret=True)
    p = cache.layout.pool(pool)
    layers = tuple(range(h.spec.num_layers)) if layer is None else (layer,)
    plan = hp._Plan(h, p, np.asarray(hidx, np.int64), np.asarray(didx, np.int64), layers,
                    dest="host" if to_host else "device", staging=False)
    b = p.placements[0].buffer
    dev = torch.from_numpy(np.asarray(cache.buffers[b]).copy())
    addr = hp.buffer_address(h)
    for width, cols, arrays in hp._windows(h, cache, pool, plan):
        meta = hp.window_params(width, dev.shape[1], h.spec.page_bytes, addr, cols, len(layers))
        arrays = hp._pad_windows(arrays, meta["ROWS"])
        grid = hp._grid(arrays[0].size, meta)
        out = torch.zeros(1, dtype=torch.int32) if to_host else dev
        kernel[grid](dev, *(torch.from_numpy(a) for a in arrays), addr, out, TO_HOST=to_host,
                     **meta)
    return dev.numpy()


@pytest.mark.parametrize("geo_name,pool", [("dsv4", "c4"), ("dsv4", "c4_indexer"),
                                           ("v32", "kv")])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("line_align", [True, False])
def test_triton_window_kernel_interpreted(monkeypatch, geo_name, pool, aligned, line_align):
    """The window kernel (Triton's interpreter, raw host address) against the numpy reference,
    with host-line-aligned warp accesses (``SHIFT``: window words counted from the 128-B host
    line of the window's first byte, the words before it masked) and without (runs 3-4)."""
    monkeypatch.setattr(hp, "_HOST_LINE_ALIGN", line_align)
    _, cache, h, poison = _setup(geo_name, pool, seed=23)
    s = h.spec
    meta = hp.window_params(s.page_bytes, s.page_bytes, s.page_bytes, hp.buffer_address(h),
                            (0,), 1)
    assert (meta["SHIFT"] > 0) == line_align          # pages are >= 512 B in every pool here
    tpp = s.tokens_per_page
    rng = np.random.default_rng(29)
    n = 2 * tpp if aligned else 2 * tpp - 3
    h, slots = hp.alloc(h, n)
    src = np.concatenate([np.arange(4 * tpp, 5 * tpp), np.arange(tpp, 2 * tpp)])[:n]
    hidx = slots[:n] if aligned else rng.permutation(slots)[:n]
    # device -> host through the raw host address
    _interpret(h, cache, pool, hidx, src, to_host=True)
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    d = _dev_pages(cache, pool)
    if aligned:
        want[:, :2] = d[:, [4, 1]]
    else:
        _ref_copy(want, d, hidx, src, s, range(s.num_layers))
    got = np.asarray(jax.device_get(h.buffer)).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    # host -> device (one layer), into other device pages
    dst = np.concatenate([np.arange(6 * tpp, 7 * tpp), np.arange(2 * tpp, 3 * tpp)])[:n]
    dev_after = _interpret(h, cache, pool, hidx, dst, to_host=False, layer=s.num_layers - 1)
    p = cache.layout.pool(pool)
    pl = p.placements
    before = np.asarray(cache.buffers[pl[0].buffer])
    want_dev = before.copy()
    l = s.num_layers - 1
    hostp = got
    for hslot, dl in zip(hidx, dst):
        hp_, hr = _token_ranges(s, hslot)
        dp_, dr = _token_ranges(s, dl)
        row = pl[l].row_base + dp_ * pl[l].row_step
        for (a, bb), (c, e) in zip(dr, hr):
            want_dev[row, pl[l].col + a:pl[l].col + bb] = hostp[l, hp_, c:e]
    if aligned:
        for j, dp_ in enumerate([6, 2]):
            row = pl[l].row_base + dp_ * pl[l].row_step
            want_dev[row, pl[l].col:pl[l].col + s.page_bytes] = hostp[l, j]
    np.testing.assert_array_equal(dev_after, want_dev)


def _ptx(meta, to_host, num_warps):
    """PTX of the window-copy kernel for an H100 (sm_90), compiled on this machine (no GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import inspect
    ptrs = {"dev_in": "*u8", "dev_row": "*i32", "dev_col": "*i32", "host_row": "*i32",
            "host_col": "*i32", "lay": "*i32", "host_addr": "i64", "out": "*i32"}
    const = dict(meta, TO_HOST=to_host)
    # positional: in the kernel's own parameter order (a constexpr out of order would silently
    # take another one's value)
    names = list(inspect.signature(hp._copy_windows_src).parameters)
    assert set(names) == set(ptrs) | set(const), names
    sig = {k: ptrs.get(k, "constexpr") for k in names}
    src = ASTSource(fn=hp._copy_windows_kernel(), signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7)})
    try:
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": 1})
    except Exception as e:  # pragma: no cover - no CUDA backend in this triton build
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    return c.asm["ptx"]


@pytest.mark.parametrize("width,cols,vec", [(37440, (0,), "v4"), (576, (0, 36864), "v4"),
                                            (8, (0, 36864), "v2")])
@pytest.mark.parametrize("to_host", [True, False])
@pytest.mark.parametrize("line_align", [True, False])
def test_triton_kernel_host_accesses_are_wide(monkeypatch, width, cols, vec, to_host,
                                              line_align):
    """The kernel compiled for sm_90: host-memory accesses are 16-B (8-B for 8-B scale slots)
    vector accesses, with and without the host-line shift (its masks must not break the
    vectorization).  The pointer made from the host address carries no alignment for the
    compiler; without the kernel's hint every host store was a 4-B st.global.b32."""
    import re
    monkeypatch.setattr(hp, "_HOST_LINE_ALIGN", line_align)
    meta = hp.window_params(width, 37440, 37440, 1 << 20, cols, 21)
    assert (meta["SHIFT"] > 0) == (line_align and width >= 512)
    ptx = _ptx(meta, to_host, max(1, min(8, meta["ROWS"] * meta["BLOCK"] // 512)))
    stores = set(re.findall(r"st\.global[.\w]*", ptx))
    loads = set(re.findall(r"ld\.global[.\w]*", ptx))
    assert stores == {f"st.global.{vec}.b32"}, stores      # host stores / device stores
    assert f"ld.global.{vec}.b32" in loads, loads


_FAKE_WIDTHS = []   # window widths (bytes) of the kernels _fake_triton_copy_fn was asked for


def _fake_triton_copy_fn(to_host, host_addr, meta, donate):
    """``hp._triton_copy_fn`` on CPU: the real kernel under Triton's interpreter, on a torch copy
    of the device buffer, and the result returned through a jit that donates the input when
    asked (as the GPU version's ``input_output_aliases`` + ``donate_argnums`` does)."""
    torch = pytest.importorskip("torch")
    kernel = hp._copy_windows_kernel(interpret=True)
    meta = dict(meta)
    _FAKE_WIDTHS.append(4 * meta["W"])
    put = jax.jit(lambda d, n: d.at[:].set(n), donate_argnums=(0,) if donate else ())

    def call(dev_buf, *arrays):
        dev = torch.from_numpy(np.asarray(dev_buf).copy())
        out = torch.zeros(1, dtype=torch.int32) if to_host else dev
        kernel[hp._grid(arrays[0].shape[0], meta)](
            dev, *(torch.from_numpy(np.array(a)) for a in arrays), host_addr, out,
            TO_HOST=to_host, **meta)
        return jnp.zeros((1,), jnp.int32) if to_host else put(dev_buf, jnp.asarray(dev.numpy()))
    return call


@pytest.mark.parametrize("geo_name,pool", [("dsv4", "c4"), ("v32", "kv")])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("device_plan,token_path", [(True, "direct"), (False, "direct"),
                                                    (True, "staged"), (False, "staged")])
def test_triton_method_orchestration_with_donated_load(monkeypatch, geo_name, pool, aligned,
                                                       device_plan, token_path):
    """backup_from_device / load_to_device with method="triton", the kernel interpreted on CPU:
    bytes against the numpy reference, and a donating token load (two window kernels, value then
    scale, the second donating the first one's result) returns a usable cache -- the second H100
    run failed there with "BlockHostUntilReady() called on deleted or donated buffer".
    ``device_plan``: the plan's checks and token windows on the device (large calls) or the
    numpy plan (small calls, ``_DEVICE_PLAN_MIN``).  ``token_path="staged"``: the full host
    page of the token case goes through device staging, the rest direct."""
    if token_path == "staged" and aligned:
        pytest.skip("page-aligned calls take the page path whatever the token path")
    monkeypatch.setattr(hp, "_DEVICE_PLAN_MIN", 0 if device_plan else 1 << 30)
    monkeypatch.setattr(hp, "_jax_triton", lambda: None)
    monkeypatch.setattr(hp, "_triton_copy_fn", _fake_triton_copy_fn)
    _, cache, h, poison = _setup(geo_name, pool, seed=79)
    s = h.spec
    if s.memory_kind != "pinned_host":
        pytest.skip("no pinned_host memory on this backend")
    tpp = s.tokens_per_page
    rng = np.random.default_rng(83)
    cap = cache.layout.pool(pool).capacity
    n = 2 * tpp if aligned else 2 * tpp - 3
    h, slots = hp.alloc(h, n)
    if aligned:
        src = (rng.permutation(cache.layout.pool(pool).num_pages)[:2, None] * tpp
               + np.arange(tpp)).ravel()
    else:
        src = rng.choice(cap, n, replace=False)
    hidx = slots[:n] if aligned else rng.permutation(slots)[:n]
    if token_path == "staged" and not aligned:   # host page 0 full (staged), page 1 partial
        hidx = np.r_[rng.permutation(slots[:tpp]), rng.permutation(slots[tpp:])[:n - tpp]]
    addr = hp.buffer_address(h)
    d = _dev_pages(cache, pool)
    _FAKE_WIDTHS.clear()
    h = hp.backup_from_device(h, cache, pool, hidx, src, method="triton",
                              token_path=token_path)
    staged_width = tpp * (s.value_bytes + s.scale_stride)
    if staged_width != s.page_bytes:   # (V3.2 pages have no padding: same width as a page)
        assert (staged_width in _FAKE_WIDTHS) == (token_path == "staged" and not aligned)
    elif token_path == "staged" and not aligned:
        assert staged_width in _FAKE_WIDTHS
    assert hp.buffer_address(h) == addr                      # written in place
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    if aligned:
        want[:, hidx[::tpp] // tpp] = d[:, src[::tpp] // tpp]
    else:
        _ref_copy(want, d, hidx, src, s, range(s.num_layers))
    np.testing.assert_array_equal(_host_pages(h), want)
    # donating loads, twice in a row (the second one donates the first one's result)
    c = jaxkv.Cache(tuple(jnp.array(x, copy=True) for x in cache.buffers), cache.layout)
    wd = d.copy()
    for k in range(2):
        dst = rng.choice(cap, n, replace=False)
        if aligned:
            dst = (rng.permutation(cache.layout.pool(pool).num_pages)[:2, None] * tpp
                   + np.arange(tpp)).ravel()
            wd[:, dst[::tpp] // tpp] = want[:, hidx[::tpp] // tpp]
        else:
            _ref_copy(wd, want, dst, hidx, s, range(s.num_layers))
        b = cache.layout.pool(pool).placements[0].buffer
        old = c.buffers[b]
        c = hp.load_to_device(h, c, pool, hidx, dst, method="triton", token_path=token_path)
        assert old.is_deleted()
        np.testing.assert_array_equal(_dev_pages(c, pool), wd)
    np.testing.assert_array_equal(_dev_pages(cache, pool), d)  # the original was never donated


def _assert_xla_refused_on_gpu(h, cache, pool, hidx, didx):
    """The "xla" method on GPU with a host-memory pool: a clear ValueError up front, both
    states intact (nothing donated, no byte changed)."""
    before_h = np.asarray(jax.device_get(h.buffer)).copy()
    before_d = _dev_pages(cache, pool)
    with pytest.raises(ValueError, match="xla method is not supported on GPU"):
        hp.backup_from_device(h, cache, pool, hidx, didx, method="xla")
    with pytest.raises(ValueError, match="xla method is not supported on GPU"):
        hp.load_to_device(h, cache, pool, hidx, didx, method="xla")
    b = cache.layout.pool(pool).placements[0].buffer
    assert not h.buffer.is_deleted() and not cache.buffers[b].is_deleted()
    np.testing.assert_array_equal(np.asarray(jax.device_get(h.buffer)), before_h)
    np.testing.assert_array_equal(_dev_pages(cache, pool), before_d)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["xla", "triton", "auto", "triton+device_plan",
                                    "triton+staged"])
@pytest.mark.parametrize("geo_name,pool", POOLS)
def test_gpu_methods_round_trip(monkeypatch, method, geo_name, pool):
    """On the GPU machine: the "triton" method (and "auto", which is "triton" there) against the
    numpy reference, loads with and without donation; "xla" is refused with a clear error (XLA
    0.11 cannot compile its host-memory gather on GPU: second H100 run).
    ``"triton+device_plan"``: "triton" with the plan's checks and token window arrays on the
    device (``_DEVICE_PLAN_MIN`` = 0; by default only calls of >= 32K indices take that path)."""
    kw = {}
    if method == "triton+device_plan":
        monkeypatch.setattr(hp, "_DEVICE_PLAN_MIN", 0)
        method = "triton"
    if method == "triton+staged":       # token path through device staging (tokens fill pages)
        monkeypatch.setattr(hp, "_DEVICE_PLAN_MIN", 0)
        method, kw = "triton", {"token_path": "staged"}
    _, cache, h, poison = _setup(geo_name, pool, seed=31)
    s = h.spec
    assert s.memory_kind == "pinned_host"
    tpp = s.tokens_per_page
    rng = np.random.default_rng(37)
    if method == "xla":
        h, slots = hp.alloc(h, 3 * tpp)
        _assert_xla_refused_on_gpu(h, cache, pool, slots[:3 * tpp - 1],
                                   np.arange(3 * tpp - 1))
        _assert_xla_refused_on_gpu(h, cache, pool, slots, np.arange(3 * tpp))
        return
    assert hp._resolve_method(method, h, cache, pool) == "triton"
    b = cache.layout.pool(pool).placements[0].buffer
    for n in (3 * tpp, 3 * tpp - 1):
        h, slots = hp.alloc(h, n)
        src = rng.choice(cache.layout.pool(pool).capacity, n, replace=False)
        if n % tpp == 0:
            src = (rng.permutation(cache.layout.pool(pool).num_pages)[:3, None] * tpp
                   + np.arange(tpp)).ravel()
        want = np.asarray(jax.device_get(h.buffer)).reshape(
            s.num_layers, s.num_pages, s.page_bytes).copy()
        d = _dev_pages(cache, pool)
        h = hp.backup_from_device(h, cache, pool, slots[:n], src, method=method, **kw)
        if n % tpp == 0:
            want[:, slots[::tpp][:3] // tpp] = d[:, src[::tpp] // tpp]
        else:
            _ref_copy(want, d, slots[:n], src, s, range(s.num_layers))
        np.testing.assert_array_equal(
            np.asarray(jax.device_get(h.buffer)).reshape(want.shape), want)
        dst = rng.choice(cache.layout.pool(pool).capacity, n, replace=False)
        if n % tpp == 0:
            dst = (rng.permutation(cache.layout.pool(pool).num_pages)[:3, None] * tpp
                   + np.arange(tpp)).ravel()
        new = hp.load_to_device(h, cache, pool, slots[:n], dst, method=method, donate=False,
                                **kw)
        wd = d.copy()
        _ref_copy(wd, want, dst, slots[:n], s, range(s.num_layers))
        if n % tpp == 0:
            wd[:, dst[::tpp] // tpp] = want[:, slots[::tpp][:3] // tpp]
        np.testing.assert_array_equal(_dev_pages(new, pool), wd)
        # donating loads, twice: the second donates the first one's result (the token path
        # chains two window kernels; the benchmark failed there in the second H100 run)
        c = jaxkv.Cache(tuple(jnp.array(x, copy=True) for x in cache.buffers), cache.layout)
        for _ in range(2):
            old = c.buffers[b]
            c = hp.load_to_device(h, c, pool, slots[:n], dst, method=method, **kw)
            assert old.is_deleted()
            np.testing.assert_array_equal(_dev_pages(c, pool), wd)


def test_real_dsv4_flash_c4_pages():
    """The real C4 pool: 21 layers, 64 slots, 37,440-B pages (value/scale split, 64-B padding)."""
    geo = jaxkv.dsv4_flash()
    pages = {p.name: 2 for p in geo.pools()}
    pages["c4"] = 5
    cache = _random_cache(geo, jaxkv.layer_major(geo, pages), 41)
    h = hp.init_host_pool(cache, "c4", 4)
    h, poison = _poison_host(h, 43)
    s = h.spec
    assert (s.num_layers, s.tokens_per_page, s.page_bytes) == (21, 64, 37440)
    h, slots = hp.alloc(h, 64 + 10)
    d = _dev_pages(cache, "c4")
    h = hp.backup_from_device(h, cache, "c4", slots[:64], np.arange(3 * 64, 4 * 64))
    rng = np.random.default_rng(47)
    src = rng.choice(5 * 64, 10, replace=False)
    h = hp.backup_from_device(h, cache, "c4", slots[64:74], src)
    want = poison.reshape(21, 4, 37440).copy()
    want[:, 0] = d[:, 3]
    _ref_copy(want, d, slots[64:74], src, s, range(21))
    np.testing.assert_array_equal(_host_pages(h), want)
    assert np.array_equal(want[:, 1, 64 * 584:], poison.reshape(21, 4, 37440)[:, 1, 64 * 584:])


def test_triton_method_refuses_without_gpu_or_pinned_memory():
    _, cache, h, poison = _setup("dsv4", "c4")
    h, slots = hp.alloc(h, 4)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="GPU"):
            hp.backup_from_device(h, cache, "c4", slots[:4], np.arange(4), method="triton")
    dev_kind = jax.devices()[0].default_memory().kind
    h2 = hp.init_host_pool(cache, "c4", 4, memory_kind=dev_kind)
    h2, s2 = hp.alloc(h2, 4)
    with pytest.raises(ValueError, match="pinned_host"):
        hp.backup_from_device(h2, cache, "c4", s2[:4], np.arange(4), method="triton")
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)


# ------------------------------------------------------------------------------------------------
# Donation and external references (the first H100 run: "Donation requested for buffer with
# external reference" in every "xla" round trip)


def _owned_poison(h, seed):
    """Poisons ``h`` through a device array copied into host memory (an XLA-owned buffer, no
    NumPy memory aliased), as opposed to ``_poison_host`` (``device_put`` of NumPy)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=h.spec.shape, dtype=np.uint8)
    dev = jax.device_put(data, jax.sharding.SingleDeviceSharding(
        h.spec.device, memory_kind=h.spec.device.default_memory().kind))
    return dataclasses.replace(h, buffer=jax.device_put(dev, h.spec.sharding)), data


def test_init_host_pool_buffer_is_donated_in_place():
    """init_host_pool's buffer is XLA-owned: an "xla" backup donates it and keeps its address."""
    _, cache, _, _ = _setup("dsv4", "c4", seed=51)
    h = hp.init_host_pool(cache, "c4", 6)
    s = h.spec
    assert not np.asarray(h.buffer).any()
    addr = hp.buffer_address(h)
    h, slots = hp.alloc(h, s.tokens_per_page)
    old = h.buffer
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no copy-on-write fallback
        h2 = hp.backup_from_device(h, cache, "c4", slots, np.arange(s.tokens_per_page),
                                   method="xla")
    assert old.is_deleted()
    assert hp.buffer_address(h2) == addr
    want = np.zeros((s.num_layers, s.num_pages, s.page_bytes), np.uint8)
    want[:, 0] = _dev_pages(cache, "c4")[:, 0]
    np.testing.assert_array_equal(_host_pages(h2), want)


@pytest.mark.parametrize("aligned", [True, False])
def test_xla_backup_falls_back_to_copy_when_donation_is_refused(monkeypatch, aligned):
    """The GPU runtime refuses to donate a buffer with an external reference (raised before the
    call runs): the "xla" method then copies (RuntimeWarning), same bytes, old state intact."""
    _, cache, h, poison = _setup("dsv4", "c4", seed=53)
    s = h.spec
    tpp = s.tokens_per_page
    name = "_xla_backup_pages" if aligned else "_xla_backup_tokens"
    real = getattr(hp, name)
    calls = []

    def fake(*a):
        calls.append(a[-1])
        if a[-1]:  # donate=True: what PJRT-GPU answers for a buffer with an external reference
            def refuse(*args):
                raise jax.errors.JaxRuntimeError(
                    "INVALID_ARGUMENT: Invalid buffer passed to Execute() as argument 0 to "
                    "replica 0: INVALID_ARGUMENT: Donation requested for buffer with external "
                    "reference")
            return refuse
        return real(*a)

    monkeypatch.setattr(hp, name, fake)
    h, slots = hp.alloc(h, 2 * tpp)
    n = 2 * tpp if aligned else 2 * tpp - 5
    src = np.arange(3 * tpp, 3 * tpp + n)
    with pytest.warns(RuntimeWarning, match="external reference"):
        h2 = hp.backup_from_device(h, cache, "c4", slots[:n], src, method="xla")
    assert calls == [True, False]
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    d = _dev_pages(cache, "c4")
    if aligned:
        want[:, :2] = d[:, 3:5]
    else:
        _ref_copy(want, d, slots[:n], src, s, range(s.num_layers))
    np.testing.assert_array_equal(_host_pages(h2), want)
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)   # not donated, not modified


def test_xla_backup_other_runtime_errors_are_not_swallowed(monkeypatch):
    _, cache, h, poison = _setup("dsv4", "c4", seed=57)

    def fake(*a):
        def fail(*args):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return fail

    monkeypatch.setattr(hp, "_xla_backup_pages", fake)
    h, slots = hp.alloc(h, h.spec.tokens_per_page)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        hp.backup_from_device(h, cache, "c4", slots, np.arange(h.spec.tokens_per_page),
                              method="xla")
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)


@pytest.mark.parametrize("aligned", [True, False])
def test_xla_backup_with_a_live_numpy_view(aligned):
    """A NumPy view of the host buffer kept alive (an external reference on GPU) does not break
    the "xla" method, and the view keeps showing the old bytes (copy-on-write, never modified
    under the reader)."""
    _, cache, h, _ = _setup("dsv4", "swa", seed=59)
    h, poison = _owned_poison(h, 61)
    s = h.spec
    tpp = s.tokens_per_page
    view = np.asarray(h.buffer)
    h, slots = hp.alloc(h, 2 * tpp)
    n = 2 * tpp if aligned else 2 * tpp - 1
    src = np.arange(n) + 4 * tpp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the fallback warns where it is taken
        h2 = hp.backup_from_device(h, cache, "swa", slots[:n], src, method="xla")
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    d = _dev_pages(cache, "swa")
    if aligned:                                  # whole pages, padding included
        want[:, slots[::tpp] // tpp] = d[:, [4, 5]]
    else:
        _ref_copy(want, d, slots[:n], src, s, range(s.num_layers))
    np.testing.assert_array_equal(_host_pages(h2), want)
    np.testing.assert_array_equal(view, poison)
    del view
    # the result is XLA-owned again: the next call donates it in place
    addr = hp.buffer_address(h2)
    h3 = hp.backup_from_device(h2, cache, "swa", slots[:n], src[::-1].copy(), method="xla")
    assert h2.buffer.is_deleted() and hp.buffer_address(h3) == addr


@pytest.mark.gpu
@pytest.mark.parametrize("geo_name,pool", [("dsv4", "c4"), ("v32", "kv")])
def test_gpu_triton_in_place_after_buf_infos(geo_name, pool):
    """On the GPU: registered addresses stay valid through "triton" page and token backups (in
    place, no donation), "xla" is refused without touching the state, and "auto" is "triton"
    (donating page and token loads included)."""
    pytest.importorskip("jax_triton")
    _, cache, h, _ = _setup(geo_name, pool, seed=67)
    h, poison = _owned_poison(h, 71)
    s = h.spec
    assert s.memory_kind == "pinned_host"
    assert hp._resolve_method("auto", h, cache, pool) == "triton"
    tpp = s.tokens_per_page
    ptrs, _, _ = hp.contiguous_buf_infos(h)
    want = poison.reshape(s.num_layers, s.num_pages, s.page_bytes).copy()
    d = _dev_pages(cache, pool)
    h, slots = hp.alloc(h, 3 * tpp)
    # "triton" token backup into the first page
    src = np.random.default_rng(73).choice(cache.layout.pool(pool).capacity, tpp - 3,
                                           replace=False)
    h = hp.backup_from_device(h, cache, pool, slots[:tpp - 3], src, method="triton")
    _ref_copy(want, d, slots[:tpp - 3], src, s, range(s.num_layers))
    _assert_xla_refused_on_gpu(h, cache, pool, slots[tpp:2 * tpp], np.arange(tpp))
    # page path and token path with "auto": in place
    h = hp.backup_from_device(h, cache, pool, slots[tpp:2 * tpp], np.arange(tpp))
    want[:, slots[tpp] // tpp] = d[:, 0]
    src2 = np.arange(2 * tpp, 3 * tpp - 2)
    h = hp.backup_from_device(h, cache, pool, slots[2 * tpp:3 * tpp - 2], src2)
    _ref_copy(want, d, slots[2 * tpp:3 * tpp - 2], src2, s, range(s.num_layers))
    assert hp.contiguous_buf_infos(h)[0] == ptrs
    np.testing.assert_array_equal(
        np.asarray(jax.device_get(h.buffer)).reshape(want.shape), want)
    # "auto" loads (triton on GPU), donating the cache buffer: a page, then tokens
    dst = np.arange(5 * tpp, 6 * tpp)
    wd = d.copy()
    wd[:, 5] = want[:, slots[tpp] // tpp]
    new = hp.load_to_device(h, cache, pool, slots[tpp:2 * tpp], dst)
    np.testing.assert_array_equal(_dev_pages(new, pool), wd)
    dst2 = np.arange(6 * tpp, 7 * tpp - 2)[::-1].copy()
    _ref_copy(wd, want, dst2, slots[2 * tpp:3 * tpp - 2], s, range(s.num_layers))
    new = hp.load_to_device(h, new, pool, slots[2 * tpp:3 * tpp - 2], dst2)
    np.testing.assert_array_equal(_dev_pages(new, pool), wd)


def test_xla_method_refused_on_gpu(monkeypatch):
    """The refusal logic, on CPU with the backend reported as "gpu": "xla" on a host-memory pool
    raises the clear ValueError before anything runs; "auto" without a usable "triton" method
    raises too; a pool in device memory may still use "xla"."""
    _, cache, h, poison = _setup("dsv4", "c4", seed=89)
    tpp = h.spec.tokens_per_page
    h, slots = hp.alloc(h, 2 * tpp)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    if h.spec.memory_kind in hp.HOST_MEMORY_KINDS:
        _assert_xla_refused_on_gpu(h, cache, "c4", slots[:tpp - 1], np.arange(tpp - 1))
        _assert_xla_refused_on_gpu(h, cache, "c4", slots, np.arange(2 * tpp))
        try:
            import jax_triton  # noqa: F401
            has_jt = True
        except ImportError:
            has_jt = False
        if not has_jt:           # no jax-triton here: "auto" cannot pick "triton"
            with pytest.raises(ValueError, match="method='auto' on GPU"):
                hp.backup_from_device(h, cache, "c4", slots, np.arange(2 * tpp))
        np.testing.assert_array_equal(np.asarray(h.buffer), poison)
    dev_kind = jax.devices()[0].default_memory().kind
    h2 = hp.init_host_pool(cache, "c4", 4, memory_kind=dev_kind)
    assert hp._resolve_method("xla", h2, cache, "c4") == "xla"
    assert hp._resolve_method("auto", h2, cache, "c4") == "xla"




# ------------------------------------------------------------------------------------------------
# The "triton" method's plan (_fast_plan): device-side checks, same decisions and errors as the
# numpy _Plan


def _fast_cases(s, cap_dev, rng):
    """(host, device) index pairs: valid pages, valid tokens, and one of each error kind."""
    tpp = s.tokens_per_page
    pages = (rng.permutation(4)[:, None] * tpp + np.arange(tpp)).ravel()
    toks = rng.permutation(4 * tpp)[:2 * tpp - 3]
    dev = rng.choice(cap_dev, 4 * tpp, replace=False)
    return {
        "pages": (pages, (rng.permutation(cap_dev // tpp)[:4, None] * tpp
                          + np.arange(tpp)).ravel()),
        "tokens": (toks, dev[:toks.size]),
        "pages_not_aligned_dev": (pages, dev),               # count a multiple, device random
        "shifted": (pages + 1 if tpp > 1 else pages, dev),   # runs not starting at a page
        "host_oob": (np.r_[toks[:-1], s.capacity], dev[:toks.size]),
        "neg": (np.r_[-1, toks[1:]], dev[:toks.size]),
        "dev_oob": (toks, np.r_[dev[:toks.size - 1], cap_dev]),
        "dup_host": (np.r_[toks[:-1], toks[0]], dev[:toks.size]),
        "dup_dev": (toks, np.r_[dev[:toks.size - 1], dev[0]]),
        "dup_page": (np.r_[pages[:tpp], pages[:tpp]], dev[:2 * tpp]),
        "unalloc": (np.r_[toks[:-1], 9 * tpp], dev[:toks.size]),
        # page-aligned calls (validated on the host at page granularity by the fast plan)
        "page_host_oob": ((np.r_[0, s.capacity // tpp][:, None] * tpp + np.arange(tpp)).ravel(),
                          (np.r_[1, 2][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_dev_oob": (pages[:2 * tpp],
                         (np.r_[1, cap_dev // tpp][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_neg": (np.r_[pages[:tpp], pages[tpp:2 * tpp] - 8 * tpp],
                     (np.r_[1, 2][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_unalloc": ((np.r_[0, 9][:, None] * tpp + np.arange(tpp)).ravel(),
                         (np.r_[1, 2][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_dup_host": (np.r_[pages[:tpp], pages[:tpp]],
                          (np.r_[1, 2][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_dup_dev": (pages[:2 * tpp], (np.r_[3, 3][:, None] * tpp + np.arange(tpp)).ravel()),
        "page_int32_top": (pages[:2 * tpp],      # a whole "page" at the top of int32
                           np.r_[np.arange(tpp), 2**31 - tpp + np.arange(tpp)]),
    }


@pytest.mark.parametrize("geo_name,pool", [("dsv4", "c4"), ("dsv4", "c4_indexer"),
                                           ("v32", "kv")])
@pytest.mark.parametrize("dest", ["host", "device"])
def test_fast_plan_matches_numpy_plan(geo_name, pool, dest):
    """Every case: either both plans raise the same ValueError text, or both take the same path
    and give the same kernel windows (pages: host-built; tokens: derived on the device)."""
    _, cache, h, _ = _setup(geo_name, pool, seed=101)
    h, _ = hp.alloc(h, 4 * h.spec.tokens_per_page)
    p = cache.layout.pool(pool)
    layers = tuple(range(h.spec.num_layers))
    rng = np.random.default_rng(103)
    for name, (hi, di) in _fast_cases(h.spec, p.capacity, rng).items():
        hi, di = np.asarray(hi, np.int32), np.asarray(di, np.int64)
        try:
            ref = hp._Plan(h, p, hi, di, layers, dest, staging=False)
        except ValueError as e:
            with pytest.raises(ValueError) as got:
                hp._fast_plan(h, p, hi, di, layers, dest, min_device=0)
            assert str(got.value) == str(e), name
            continue
        fast = hp._fast_plan(h, p, hi, di, layers, dest, min_device=0)
        assert getattr(fast, "fast", False) and fast.page_aligned == ref.page_aligned, name
        want = hp._windows(h, cache, pool, ref)
        if fast.page_aligned:
            got = hp._windows(h, cache, pool, fast)
            for (w1, c1, a1), (w2, c2, a2) in zip(want, got):
                assert (w1, c1) == (w2, c2)
                for x, y in zip(a1, a2):
                    np.testing.assert_array_equal(x, y)
            continue
        s = h.spec
        kinds = [w for w, _, _ in want]
        rows = (16, 2048)[:len(kinds)]
        got = hp._token_windows_fn(s.tokens_per_page, s.value_bytes, s.scale_stride,
                                   p.placements[0].row_step, rows)(fast.h_dev, fast.d_dev)
        for (w, _, arrays), r, dev_arrays in zip(want, rows, got):
            padded = hp._pad_windows(arrays, r)
            assert all(a.shape[0] % r == 0 for a in dev_arrays)
            keep = np.asarray(dev_arrays[0]) >= 0
            assert keep.sum() == hi.size
            ref_keep = padded[0] >= 0
            for x, y in zip(padded[:4], dev_arrays):
                np.testing.assert_array_equal(np.asarray(y)[keep], x[ref_keep])


def test_fast_plan_of_page_call_does_no_device_work(monkeypatch):
    """A page-aligned "triton" call is validated on the host at page granularity: no device
    program, no upload, no sync before its kernels (run 4: the device-checked plan cost 3.8 ms
    of a 4.3-GB page call, mostly that sync); token calls still check on the device."""
    _, cache, h, _ = _setup("dsv4", "c4", seed=7)
    h, _ = hp.alloc(h, 4 * h.spec.tokens_per_page)
    p = cache.layout.pool("c4")
    layers = tuple(range(h.spec.num_layers))
    cases = _fast_cases(h.spec, p.capacity, np.random.default_rng(11))
    calls = []
    real = hp._validate_fn
    monkeypatch.setattr(hp, "_validate_fn", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(a))
    for dest in ("host", "device"):
        plan = hp._fast_plan(h, p, *cases["pages"], layers, dest, min_device=0)
        assert plan.page_aligned and calls == []
    monkeypatch.undo()
    monkeypatch.setattr(hp, "_validate_fn", lambda *a: calls.append(a) or real(*a))
    plan = hp._fast_plan(h, p, *cases["tokens"], layers, "host", min_device=0)
    assert not plan.page_aligned and len(calls) == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_runs_of_pages_matches_whole_pages(data):
    """The fast plan's page-structure test (one np.diff pass in the caller's dtype) against the
    numpy plan's ``_whole_pages`` (int64): same answer for runs, broken runs, shifted runs,
    counts that are not multiples, int32 and int64; with the range check of the first slot of
    each run (what ``_host_page_plan`` adds) it never accepts a run that wraps around int32."""
    tpp = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    npg = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    pages = rng.integers(0, 50, npg)
    x = (pages[:, None] * tpp + np.arange(tpp)).ravel()
    kind = data.draw(st.sampled_from(["runs", "poke", "shift", "short", "top"]))
    if kind == "poke":
        x[rng.integers(x.size)] += int(rng.integers(1, 3))
    elif kind == "shift":
        x = x + 1
    elif kind == "short" and x.size > 1:
        x = x[:-1]
    elif kind == "top":    # a run ending at (or wrapping past) the top of int32
        x = np.r_[x[:tpp * (npg - 1)], (2**31 - tpp) // tpp * tpp + np.arange(tpp)]
        x = x.astype(np.int64)
        if tpp == 3:       # 2**31 - 2 is a multiple of 3: the int32 run wraps
            x[-tpp:] = 2147483646 + np.arange(tpp)
    for dtype in (np.int32, np.int64):
        xi = x.astype(dtype)          # (wraps modulo 2**32 for int32, as a caller's array would)
        want = hp._whole_pages(xi.astype(np.int64), tpp) is not None
        got = hp._runs_of_pages(xi, tpp)
        if want:
            assert got
        elif got:   # only a wrapped int32 run; the range check of the first slots rejects it
            assert dtype is np.int32 and kind == "top"
            assert not hp._in_range(xi[::tpp], 2**31 - 2 * tpp - tpp + 1)


@pytest.mark.parametrize("case,match", [("dup_host", "duplicate"), ("unalloc", "not allocated"),
                                        ("host_oob", "host_indices"), ("neg", "host_indices"),
                                        ("dev_oob", "device_indices")])
def test_triton_method_validation_errors_leave_state_unchanged(monkeypatch, case, match):
    """method="triton" validates through _fast_plan before anything runs (on this CPU box the
    method itself then cannot run: that is a different ValueError, after validation)."""
    _, cache, h, poison = _setup("dsv4", "c4")
    h, _ = hp.alloc(h, 4 * h.spec.tokens_per_page)
    hi, di = _fast_cases(h.spec, cache.layout.pool("c4").capacity,
                         np.random.default_rng(5))[case]
    with pytest.raises(ValueError, match=match):
        hp.backup_from_device(h, cache, "c4", hi, di, method="triton")
    monkeypatch.setattr(hp, "_DEVICE_PLAN_MIN", 0)       # the device checks, same errors
    with pytest.raises(ValueError, match=match):
        hp.backup_from_device(h, cache, "c4", hi, di, method="triton")
    assert not h.buffer.is_deleted()
    np.testing.assert_array_equal(np.asarray(h.buffer), poison)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_staged_split_matches_numpy(data):
    """_staged_plan_fn (device): host pages whose tpp slots all appear once are staged (each
    staging slot holds the device location of that host slot), every other token is a direct
    window, no token is lost or doubled -- against a plain-numpy split, repeated host slots
    (a load may read one slot twice) and -1 padding included."""
    tpp, V, S = 4, 8, 4           # at most 12 + 9 indices, padded to 32
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    full = rng.permutation(6)[:data.draw(st.integers(0, 3))]
    h = list((full[:, None] * tpp + np.arange(tpp)).ravel())
    h += list(rng.integers(0, 6 * tpp, size=data.draw(st.integers(0, 9))))   # may repeat
    h = rng.permutation(np.asarray(h, np.int64)) if h else np.zeros(0, np.int64)
    n = h.size
    if n == 0:
        return
    d = rng.permutation(1000)[:n]
    pad = 32 - n          # one fixed size: one compile for every example
    hp_, dp_ = np.r_[h, [-1] * pad].astype(np.int32), np.r_[d, [-1] * pad].astype(np.int32)
    src, pages, toks = hp._staged_plan_fn(tpp, V, S, 1, 2, (16, 16))(jnp.asarray(hp_),
                                                                      jnp.asarray(dp_))
    src, pages = np.asarray(src), [np.asarray(a) for a in pages]
    # numpy reference: full pages = every slot present (at least once)
    cnt = np.bincount(h, minlength=6 * tpp).reshape(6, tpp)
    want_full = set(np.flatnonzero((cnt >= 1).all(axis=1)).tolist())
    got_pages = pages[2][pages[0] >= 0]
    assert set(got_pages.tolist()) == want_full and len(got_pages) == len(want_full)
    staged = []
    for q, page in zip(pages[0][pages[0] >= 0], got_pages):
        staged += [(int(page) * tpp + t, int(src[q * tpp + t])) for t in range(tpp)]
    assert (src >= 0).sum() == len(staged) == tpp * len(want_full)
    # direct windows: value kind rows (-1 = unused); host slot = host_row * tpp + col / V
    dr, dc, hr, hc = (np.asarray(a) for a in toks[0])
    keep = hr >= 0
    direct = list(zip((hr[keep] * tpp + hc[keep] // V).tolist(),
                      (dr[keep] * tpp + dc[keep] // V).tolist()))
    # every (host slot, device loc) pair exactly once, staged or direct
    assert sorted(staged + direct) == sorted((int(a), int(b)) for a, b in zip(h, d))
    # scale windows (same ROWS here): the same tokens as the value windows
    np.testing.assert_array_equal(np.asarray(toks[1][2]) >= 0, keep)
