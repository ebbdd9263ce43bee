"""Cache state and the reference accessors, checked byte for byte against SPEC §2 in numpy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

import jaxkv
from jaxkv import formats as F
from jaxkv import geometry as G


def poisoned(cache, seed=0):
    """The same cache with every byte random (so untouched bytes are checkable)."""
    rng = np.random.default_rng(seed)
    bufs = tuple(jnp.asarray(rng.integers(0, 256, b.shape, dtype=np.uint8)) for b in cache.buffers)
    return jaxkv.Cache(bufs, cache.layout)


def np_write(buffers, layout, pool, layer, locs, tokens):
    """Independent model of SPEC §2: writes tokens into numpy copies of the buffers."""
    p = layout.pool(pool)
    fmt, tpp = p.spec.fmt, p.tokens_per_page
    V, S = fmt.value_bytes, fmt.scale_stride
    out = [np.array(b) for b in buffers]
    pl = p.placements[layer]
    buf = out[pl.buffer]
    for n, loc in enumerate(np.asarray(locs)):
        if loc < 0:
            continue
        page, t = divmod(int(loc), tpp)
        row = (layer * p.num_pages + page) if layout.kind == "layer_major" else page
        col = pl.col
        fields = {f.name: np.ascontiguousarray(np.asarray(getattr(tokens, f.name))[n]).view(
            np.uint8) for f in fmt.fields}
        for f in fmt.fields:
            base = col + t * V if f.part == "value" else col + tpp * V + t * S
            buf[row, base + f.offset: base + f.offset + f.nbytes] = fields[f.name]
    return out


def assert_same(buffers, expected):
    for i, (a, b) in enumerate(zip(buffers, expected)):
        a = np.asarray(a)
        diff = np.argwhere(a != b)
        assert diff.size == 0, f"buffer {i}: {len(diff)} bytes differ, first at {diff[:3]}"


LAYOUTS = {
    "tiny-lm": lambda: jaxkv.layer_major(G.tiny(), {"swa": 4, "c4": 5, "c128": 3, "c4_indexer": 5,
                                                    "c4_state": 20, "c4_indexer_state": 20,
                                                    "c128_state": 33}),
    "tiny-packed": lambda: jaxkv.packed(G.tiny(), 5),
    "v32-lm": lambda: jaxkv.layer_major(G.tiny(3, v32=True), 4),
    "v32-packed": lambda: jaxkv.packed(G.tiny(3, v32=True), 4),
    "flash-lm": lambda: jaxkv.layer_major(G.dsv4_flash(), 2),
    "flash-packed": lambda: jaxkv.packed(G.dsv4_flash(), 3),
}


@functools.lru_cache(maxsize=None)
def _cache(name):
    lay = LAYOUTS[name]()
    return jaxkv.init_cache(lay.geometry, lay)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_set_tokens_bytes_match_spec(name):
    cache = poisoned(_cache(name), seed=1)
    lay = cache.layout
    rng = np.random.default_rng(2)
    for pool in lay.pools:
        if pool.spec.kind != "token":
            continue
        layer = int(rng.integers(pool.spec.num_layers))
        n = min(7, pool.capacity)
        locs = rng.choice(pool.capacity, n, replace=False).astype(np.int32)
        locs[0] = -1  # padding is skipped
        tok = F.random_tokens(pool.spec.fmt, jax.random.key(int(rng.integers(1 << 30))), n)
        expected = np_write(cache.buffers, lay, pool.name, layer, locs, tok)
        cache = jaxkv.set_tokens(cache, pool.name, layer, jnp.asarray(locs), tok)
        assert_same(cache.buffers, expected)
        back = jaxkv.get_tokens(cache, pool.name, layer, jnp.asarray(locs))
        for a, b in zip(back, tok):
            a, b = np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
            np.testing.assert_array_equal(a[1:], b[1:])
            assert not a[0].any()  # -1 reads zeros


@pytest.mark.parametrize("name", ["tiny-lm", "tiny-packed", "v32-packed"])
def test_all_layers_at_once(name):
    cache = poisoned(_cache(name), seed=3)
    lay = cache.layout
    pool = lay.pools[0]
    layers = pool.groups[-1]  # one KV-cache group: its layers share a page table
    sel = None if len(pool.groups) == 1 else layers
    locs = np.random.default_rng(4).choice(pool.capacity, 6, replace=False).astype(np.int32)
    tok = F.random_tokens(pool.spec.fmt, jax.random.key(5), (len(layers), 6))
    expected = [np.asarray(b) for b in cache.buffers]
    for i, layer in enumerate(layers):
        expected = np_write(expected, lay, pool.name, layer, locs,
                            jax.tree.map(lambda x: x[i], tok))
    cache = jaxkv.set_tokens(cache, pool.name, sel, jnp.asarray(locs), tok)
    assert_same(cache.buffers, expected)
    back = jaxkv.get_tokens(cache, pool.name, sel, jnp.asarray(locs))
    for a, b in zip(back, tok):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_packed_layers_sharing_a_slot_are_rejected():
    cache = _cache("tiny-packed")
    swa = cache.layout.pool("swa")
    assert len(swa.groups) > 1
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(14), (swa.spec.num_layers, 2))
    with pytest.raises(ValueError, match="share a slot"):
        jaxkv.set_tokens(cache, "swa", None, jnp.asarray([1, 2]), tok)


def test_scale_pad_byte_untouched():
    cache = poisoned(_cache("tiny-lm"), seed=6)
    p = cache.layout.pool("c4")
    before = np.asarray(jaxkv.read_pages(cache, "c4", 1))
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(7), 1)
    cache = jaxkv.set_tokens(cache, "c4", 1, jnp.asarray([p.tokens_per_page + 3]), tok)
    after = np.asarray(jaxkv.read_pages(cache, "c4", 1))
    pad = p.tokens_per_page * 576 + 3 * 8 + 7
    assert after[1, pad] == before[1, pad]
    np.testing.assert_array_equal(after[1, pad - 7:pad], np.asarray(tok.scale[0]))


@pytest.mark.parametrize("name", ["tiny-lm", "tiny-packed"])
def test_state_rows_sentinel_and_duplicates(name):
    cache = _cache(name)
    p = cache.layout.pool("c4_state")
    W = p.spec.fmt.width
    sentinel = np.asarray(jaxkv.get_rows(cache, "c4_state", 0, jnp.asarray([-1])))[0]
    assert (sentinel[: W // 2] == 0).all() and np.isneginf(sentinel[W // 2:]).all()
    rows = jax.random.normal(jax.random.key(8), (3, W))
    stored = p.sentinel if p.sentinel is not None else -1
    assert (p.sentinel is not None) == (cache.layout.kind == "layer_major")
    locs = jnp.asarray([5, 5, stored])  # duplicate (same row) + the stored sentinel row
    rows = rows.at[1].set(rows[0])
    c2 = jaxkv.set_rows(cache, "c4_state", 1, locs, rows)
    got = np.asarray(jaxkv.get_rows(c2, "c4_state", 1, jnp.asarray([5, -1, stored])))
    np.testing.assert_array_equal(got[0], np.asarray(rows[0]))
    np.testing.assert_array_equal(got[1], sentinel)  # -1 reads the sentinel
    np.testing.assert_array_equal(got[2], sentinel)  # the sentinel write was dropped


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_set_get_identity_random_locations(data):
    cache = _cache("tiny-packed")
    pool = data.draw(st.sampled_from(["swa", "c4", "c128", "c4_indexer"]))
    p = cache.layout.pool(pool)
    locs = data.draw(st.lists(st.integers(0, p.capacity - 1), min_size=1, max_size=12,
                              unique=True))
    layer = data.draw(st.integers(0, p.spec.num_layers - 1))
    tok = F.random_tokens(p.spec.fmt, jax.random.key(data.draw(st.integers(0, 2**30))),
                          len(locs))
    c2 = jaxkv.set_tokens(cache, pool, layer, jnp.asarray(locs, jnp.int32), tok)
    back = jaxkv.get_tokens(c2, pool, layer, jnp.asarray(locs, jnp.int32))
    for a, b in zip(back, tok):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_donation_reuses_buffer():
    cache = jaxkv.init_cache(G.tiny(), jaxkv.layer_major(G.tiny(), 4))
    cache = jaxkv.Cache(tuple(b + 0 for b in cache.buffers), cache.layout)  # own the buffers
    write = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"), donate_argnames="cache")
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(9), 3)
    ptr = cache.buffers[0].unsafe_buffer_pointer()
    new = write(cache, "swa", 2, jnp.asarray([1, 2, 3]), tok)
    assert new.buffers[0].unsafe_buffer_pointer() == ptr
    assert cache.buffers[0].is_deleted()


def test_bad_input_errors_name_argument():
    cache = _cache("tiny-lm")
    p = cache.layout.pool("swa")
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(10), 2)
    with pytest.raises(ValueError, match=r"locs\[1\] = 128 is outside \[0, 128\)"):
        jaxkv.set_tokens(cache, "swa", 0, jnp.asarray([0, p.capacity]), tok)
    with pytest.raises(ValueError, match=r"locs\[0\] = -2"):
        jaxkv.get_tokens(cache, "swa", 0, jnp.asarray([-2, 0]))
    with pytest.raises(ValueError, match="tokens must have leading shape"):
        jaxkv.set_tokens(cache, "swa", 0, jnp.asarray([0, 1, 2]), tok)
    with pytest.raises(ValueError, match="layer must be in"):
        jaxkv.set_tokens(cache, "swa", 9, jnp.asarray([0, 1]), tok)
    with pytest.raises(ValueError, match="locs must be an integer"):
        jaxkv.get_tokens(cache, "swa", 0, jnp.asarray([0.0, 1.0]))
    with pytest.raises(ValueError, match="locs must be 1-D"):
        jaxkv.get_tokens(cache, "swa", 0, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens\.nope must have dtype"):
        jaxkv.set_tokens(cache, "swa", 0, jnp.asarray([0, 1]),
                         tok._replace(nope=tok.nope.astype(jnp.float32)))
    with pytest.raises(ValueError, match="pool must be one of"):
        jaxkv.get_tokens(cache, "kv", 0, jnp.asarray([0]))
    with pytest.raises(ValueError, match="impl must be one of"):
        jaxkv.get_tokens(cache, "swa", 0, jnp.asarray([0]), impl="cuda")
    with pytest.raises(ValueError, match=r"is a token pool; use the \*_tokens"):
        jaxkv.set_rows(cache, "swa", 0, jnp.asarray([0]), jnp.zeros((1, 2048)))


def test_inside_jit_out_of_range_is_masked_not_clipped():
    cache = poisoned(_cache("tiny-lm"), seed=11)
    p = cache.layout.pool("swa")
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(12), 3)
    write = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"))
    locs = np.asarray([p.capacity, p.capacity + 5, 2**30], np.int32)  # all invalid
    new = write(cache, "swa", 1, jnp.asarray(locs), tok)
    assert_same(new.buffers, [np.asarray(b) for b in cache.buffers])
    got = jax.jit(jaxkv.get_tokens, static_argnames=("pool", "layer"))(
        cache, "swa", 1, jnp.asarray([-7, p.capacity]))
    assert not np.asarray(got.nope).view(np.uint8).any()


def test_checkify_path_reports_bad_locations():
    cache = _cache("tiny-lm")
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(13), 2)
    f = checkify.checkify(jax.jit(functools.partial(jaxkv.set_tokens, pool="swa", layer=0,
                                                    check=True)))
    err, _ = f(cache, locs=jnp.asarray([0, 1]), tokens=tok)
    err.throw()  # fine
    err, _ = f(cache, locs=jnp.asarray([0, 10_000]), tokens=tok)
    with pytest.raises(checkify.JaxRuntimeError, match="outside"):
        err.throw()


def test_read_pages_shape_and_init_geometry_mismatch():
    cache = _cache("flash-packed")
    pages = jaxkv.read_pages(cache, "c4", 3)
    assert pages.shape == (3, 37_440) and pages.dtype == jnp.uint8
    with pytest.raises(ValueError, match="layout was built for geometry"):
        jaxkv.init_cache(G.dsv4_pro(), cache.layout)
