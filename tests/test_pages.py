"""jaxkv.pages: whole-page copies, token copies and layout conversion on Cache values.

Checked against numpy models over the raw buffers (every byte of the destination), for the
reference and Pallas (interpret) implementations; the Triton kernels behind the same ops are
tested in test_kernels.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv import pages

IMPLS = ["reference", "pallas"]


def _random_cache(geo, layout, seed):
    rng = np.random.default_rng(seed)
    c = jaxkv.init_cache(geo, layout)
    return jaxkv.Cache(tuple(jnp.asarray(rng.integers(0, 256, b.shape, dtype=np.uint8))
                             for b in c.buffers), layout)


def _bytes(cache):
    return [np.array(b) for b in cache.buffers]


def _page_view(buf, pl, page, page_bytes):
    return buf[pl.row_base + page * pl.row_step, pl.col:pl.col + page_bytes]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pool", ["swa", "c128", "c4_indexer"])
def test_copy_pages_between_caches(impl, pool):
    geo = jaxkv.tiny(5)
    src = _random_cache(geo, jaxkv.layer_major(geo, 4), 0)
    dst = _random_cache(geo, jaxkv.layer_major(geo, 6), 1)
    sp = np.array([3, 1, -1, 2], np.int32)
    dp = np.array([0, 5, 4, -1], np.int32)
    out = pages.copy_pages(src, dst, pool, sp, dp, impl=impl)
    p_s, p_d = src.layout.pool(pool), dst.layout.pool(pool)
    expect = _bytes(dst)
    sbuf = _bytes(src)
    for l in range(p_s.spec.num_layers):
        ps, pd = p_s.placements[l], p_d.placements[l]
        for x, y in zip(sp, dp):
            if x >= 0 and y >= 0:
                expect[pd.buffer][pd.row_base + y * pd.row_step, pd.col:pd.col + p_d.page_bytes] = \
                    _page_view(sbuf[ps.buffer], ps, x, p_s.page_bytes)
    for got, want in zip(_bytes(out), expect):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_pages_state_pool_keeps_sentinel(impl):
    geo = jaxkv.tiny(5)
    lay = jaxkv.layer_major(geo, 4)
    src = _random_cache(geo, lay, 2)
    dst = jaxkv.init_cache(geo, lay)
    p = lay.pool("c4_state")
    out = pages.copy_pages(src, dst, "c4_state", np.array([0, 1], np.int32),
                           np.array([p.sentinel, 2], np.int32), impl=impl)
    rows = jaxkv.get_rows(out, "c4_state", None, jnp.asarray([p.sentinel, 2], jnp.int32))
    kv, score = np.split(np.asarray(rows[:, 0]), 2, axis=-1)
    assert (kv == 0).all() and np.isneginf(score).all()  # sentinel untouched
    want = jaxkv.get_rows(src, "c4_state", None, jnp.asarray([1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(rows[:, 1]).view(np.uint8),
                                  np.asarray(want[:, 0]).view(np.uint8))


def test_copy_pages_validation():
    geo = jaxkv.tiny(5)
    lm = jaxkv.init_cache(geo, jaxkv.layer_major(geo, 4))
    pk = jaxkv.init_cache(geo, jaxkv.packed(geo, 4))
    two = np.array([1, 2], np.int32)
    with pytest.raises(ValueError, match="pages differ"):
        pages.copy_pages(lm, pk, "swa", two, two)
    with pytest.raises(ValueError, match="same length"):
        pages.copy_pages(lm, lm, "c4", two, np.array([1], np.int32))
    with pytest.raises(ValueError, match=r"src_pages\[1\] = 4 is outside \[0, 4\)"):
        pages.copy_pages(lm, lm, "c4", np.array([1, 4], np.int32), two)
    with pytest.raises(ValueError, match=r"dst_pages\[1\] = -2 .*-1 is the only"):
        pages.copy_pages(lm, lm, "c4", two, np.array([1, -2], np.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        pages.copy_pages(lm, lm, "c4", two, two, impl="cuda")
    with pytest.raises(ValueError, match="must be a jaxkv Cache"):
        pages.copy_pages(lm.buffers, lm, "c4", two, two)
    with pytest.raises(ValueError, match="share a slot"):
        pages.copy_tokens(lm, pk, "swa", two, two)  # packed SWA groups share slots
    with pytest.raises(ValueError, match="pool must be one of"):
        pages.copy_pages(lm, lm, "nope", two, two)


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_tokens_layer_major_to_packed(impl):
    """SWA 32/page layer-major -> 8/page packed, one KV-cache group; reads back identical."""
    geo = jaxkv.tiny(5)
    src = _random_cache(geo, jaxkv.layer_major(geo, 3), 3)
    dst_layout = jaxkv.packed(geo, 6)
    dst = _random_cache(geo, dst_layout, 4)
    group = dst_layout.pool("swa").groups[0]
    rng = np.random.default_rng(5)
    sl = rng.choice(src.layout.pool("swa").capacity, 7, replace=False).astype(np.int32)
    dl = rng.choice(dst_layout.pool("swa").capacity, 7, replace=False).astype(np.int32)
    sl[2] = -1
    out = pages.copy_tokens(src, dst, "swa", sl, dl, layers=group, impl=impl)
    keep = sl >= 0
    for l in group:
        a = jaxkv.get_tokens(out, "swa", l, jnp.asarray(dl[keep]))
        b = jaxkv.get_tokens(src, "swa", l, jnp.asarray(sl[keep]))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                          np.asarray(y).view(np.uint8))
    # nothing but those tokens changed: compare with a numpy-side copy of the byte windows
    expect = _bytes(dst)[0]
    s_pool, d_pool = src.layout.pool("swa"), dst_layout.pool("swa")
    sbuf = _bytes(src)[s_pool.placements[0].buffer]
    V, S = 576, 8
    for l in group:
        ps, pd = s_pool.placements[l], d_pool.placements[l]
        for x, y in zip(sl[keep], dl[keep]):
            (sp_, st), (dp_, dt) = divmod(x, s_pool.tokens_per_page), divmod(
                y, d_pool.tokens_per_page)
            srow, drow = ps.row_base + sp_, pd.row_base + dp_
            expect[drow, pd.col + dt * V:pd.col + dt * V + V] = \
                sbuf[srow, ps.col + st * V:ps.col + st * V + V]
            so = ps.col + s_pool.tokens_per_page * V + st * S
            do = pd.col + d_pool.tokens_per_page * V + dt * S
            expect[drow, do:do + S] = sbuf[srow, so:so + S]  # pad byte travels too
    np.testing.assert_array_equal(_bytes(out)[0], expect)


def test_copy_tokens_under_jit_with_donation():
    geo = jaxkv.tiny(5)
    lay = jaxkv.layer_major(geo, 3)
    src, dst = _random_cache(geo, lay, 6), _random_cache(geo, lay, 7)
    f = jax.jit(lambda s, d, a, b: pages.copy_tokens(s, d, "c4", a, b, impl="reference"),
                donate_argnums=1)
    locs = jnp.asarray([1, 2, 3], jnp.int32)
    bad = jnp.asarray([4, 10**6, -1], jnp.int32)  # traced: out of range masked, not clipped
    want = _bytes(dst)
    out = f(src, dst, locs, bad)
    got = jaxkv.get_tokens(out, "c4", None, jnp.asarray([4], jnp.int32))
    ref = jaxkv.get_tokens(src, "c4", None, jnp.asarray([1], jnp.int32))
    for x, y in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    b = lay.pool("c4").placements[0].buffer
    diff = np.argwhere(_bytes(out)[b] != want[b])
    assert len(diff) and set(diff[:, 0]) <= {l * 3 + 0 for l in range(2)}  # page 0 only (loc 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_convert_layout_v32_identity_roundtrip(impl):
    """V3.2: packed slots are not shared, so the identity mapping converts both ways."""
    geo = jaxkv.tiny(3, v32=True)
    pk = jaxkv.packed(geo, 4)
    lm = jaxkv.layer_major(geo, pages.equivalent_layer_major_pages(pk))
    c = _random_cache(geo, lm, 8)
    there = pages.convert_layout(c, pk, impl=impl)
    back = pages.convert_layout(there, lm, impl=impl)
    for pool in ("kv", "indexer"):
        cap = lm.pool(pool).capacity
        locs = jnp.arange(cap, dtype=jnp.int32)
        for got in (there, back):
            a = jaxkv.get_tokens(got, pool, None, locs)
            b = jaxkv.get_tokens(c, pool, None, locs)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                              np.asarray(y).view(np.uint8))


def test_convert_layout_dsv4_groups_need_maps():
    geo = jaxkv.tiny(5)
    pk = jaxkv.packed(geo, 8)
    lm = jaxkv.layer_major(geo, pages.equivalent_layer_major_pages(pk))
    c = jaxkv.init_cache(geo, lm)
    with pytest.raises(ValueError, match="identity"):
        pages.convert_layout(c, pk)
    with pytest.raises(ValueError, match="capacities differ"):
        pages.convert_layout(c, jaxkv.layer_major(geo, 5))
    with pytest.raises(ValueError, match="one map per KV-cache group|must hold"):
        pages.convert_layout(c, pk, loc_maps={"swa": jnp.zeros(lm.pool("swa").capacity,
                                                               jnp.int32)})
    cap = pk.pool("swa").capacity
    same = [jnp.arange(cap, dtype=jnp.int32)] * len(pk.pool("swa").groups)
    with pytest.raises(ValueError, match="share a packed slot"):
        pages.convert_layout(c, pk, loc_maps={"swa": same})
    with pytest.raises(ValueError, match="geometry"):
        pages.convert_layout(c, jaxkv.packed(jaxkv.tiny(4, v32=True), 4))
    with pytest.raises(ValueError, match="equivalent|multiple"):
        pages.equivalent_layer_major_pages(jaxkv.packed(geo, 3))  # SWA 8/block vs 32/page


@pytest.mark.parametrize("impl", ["reference"])  # Pallas runs the same copy_tokens kernel above
def test_convert_layout_dsv4_with_group_maps_roundtrip(impl):
    """Layer-major -> packed (every group of every pool on its own blocks) -> layer-major."""
    geo = jaxkv.tiny(5)
    nb = 16
    pk = jaxkv.packed(geo, nb)
    lm = jaxkv.layer_major(geo, pages.equivalent_layer_major_pages(pk))
    c = _random_cache(geo, lm, 9)
    rng = np.random.default_rng(10)
    ngroups = sum(len(p.groups) for p in pk.pools)
    per = nb // ngroups
    fwd, inv, kept = {}, {}, {}
    k = 0
    for p in pk.pools:
        cap, tpp = p.capacity, p.tokens_per_page
        fm, im, kp = [], [], []
        for _ in p.groups:
            n = per * tpp
            src = rng.choice(cap, n, replace=False)
            if lm.pool(p.name).sentinel is not None:
                src = src[src != lm.pool(p.name).sentinel]
            m = np.full(cap, -1, np.int32)
            m[src] = k * per * tpp + np.arange(len(src))
            back = np.full(cap, -1, np.int32)
            back[m[src]] = src
            fm.append(jnp.asarray(m))
            im.append(jnp.asarray(back))
            kp.append(src.astype(np.int32))
            k += 1
        fwd[p.name], inv[p.name], kept[p.name] = fm, im, kp
    there = pages.convert_layout(c, pk, loc_maps=fwd, impl=impl)
    back = pages.convert_layout(there, lm, loc_maps=inv, impl=impl)
    for p in pk.pools:
        for g, src in zip(p.groups, kept[p.name]):
            for l in (g[0], g[-1]):
                a = jaxkv.get_tokens(back, p.name, l, jnp.asarray(src))
                b = jaxkv.get_tokens(c, p.name, l, jnp.asarray(src))
                for x, y in zip(a, b):
                    np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                                  np.asarray(y).view(np.uint8))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU behaviour")
def test_triton_impl_on_cpu_says_gpu():
    geo = jaxkv.tiny(5)
    c = jaxkv.init_cache(geo, jaxkv.layer_major(geo, 3))
    with pytest.raises(RuntimeError, match="needs a GPU"):
        pages.copy_pages(c, c, "c4", np.array([1], np.int32), np.array([2], np.int32),
                         impl="triton")
