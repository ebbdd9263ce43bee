"""DCP: placement, localization, sharded writes, decode + merge vs the single-device oracle, reshard.

Runs on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxkv
from jaxkv import attention as A
from jaxkv import dcp
from jaxkv import formats as F

NDEV = len(jax.devices())
_set = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer", "impl", "check"))
_ref_decode = jax.jit(A.sparse_decode, static_argnames=("layer", "topk", "scale", "base", "impl"))
needs8 = pytest.mark.skipif(NDEV < 8, reason="needs 8 (simulated) devices: XLA_FLAGS "
                            "--xla_force_host_platform_device_count=8 before jax is imported")


# ---------------------------------------------------------------------------------------------
# Plain-Python SPEC §9 (the independent reference)


def py_owner(p, n, I, B):
    o = p % (B * n)
    return (o // I) % n


def py_local(p, n, I, B):
    o = p % (B * n)
    return (p // (B * n)) * B + (o // (I * n)) * I + o % I


def py_local_len(L, n, I, r):
    base = (L // I // n) * I
    return base + min(max(L - base * n - r * I, 0), I)


def py_local_pos(p, n, I):
    """Index of position p in its owner's local sequence (the owned positions in order)."""
    owner = (p // I) % n
    return sum(1 for x in range(p) if (x // I) % n == owner)


def np_locs(pos, bt, blk):
    """numpy paged locations: bt[p // blk] * blk + p % blk (-1 for -1)."""
    pos = np.asarray(pos)
    out = np.full(pos.shape, -1, np.int64)
    for idx in np.ndindex(pos.shape):
        p = pos[idx]
        if p >= 0:
            out[idx] = bt[idx[0], p // blk] * blk + p % blk
    return out.astype(np.int32)


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 2, 3, 4, 8]), I=st.sampled_from([1, 2, 4]),
       m=st.integers(1, 4), data=st.data())
def test_placement_matches_spec(n, I, m, data):
    B = I * m
    pos = data.draw(st.lists(st.integers(0, 4 * B * n), min_size=16, max_size=16))
    got_o = np.asarray(dcp.owner(jnp.asarray(pos), n, I))
    got_l = np.asarray(dcp.local_index(jnp.asarray(pos), n, I, B))
    for p, o, l in zip(pos, got_o, got_l):
        assert o == py_owner(p, n, I, B)
        assert l == py_local(p, n, I, B)
    L = data.draw(st.integers(0, 5 * B * n))
    lens = np.asarray(dcp.local_len(jnp.full((n,), L), n, I, jnp.arange(n))).tolist()
    assert lens == [py_local_len(L, n, I, r) for r in range(n)]
    assert sum(lens) == L
    # local_len counts the owned positions below L
    assert lens == [sum(1 for p in range(L) if py_owner(p, n, I, B) == r) for r in range(n)]


def test_widened_equals_interleave_one():
    """SGLang's widened loc space (owner loc % N, slot loc // N) is the I = 1 placement."""
    g = jnp.arange(0, 640)
    for n in (1, 2, 4, 8):
        for B in (1, 8, 16):
            np.testing.assert_array_equal(dcp.owner_widened(g, n), dcp.owner(g, n, 1))
            np.testing.assert_array_equal(dcp.physical_widened(g, n), dcp.local_index(g, n, 1, B))


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([1, 2, 4, 8]), I=st.sampled_from([1, 2, 8]), data=st.data())
def test_localize_topk_vs_python(n, I, data):
    Bq, K = 3, 12
    rows = [data.draw(st.lists(st.integers(-1, 200), min_size=K, max_size=K)) for _ in range(Bq)]
    idx = jnp.asarray(rows, jnp.int32)
    for r in range(n):
        got = np.asarray(dcp.localize_topk(idx, n, I, r))
        comp, cnt = dcp.localize_topk(idx, n, I, r, compact=True)
        comp, cnt = np.asarray(comp), np.asarray(cnt)
        for b, row in enumerate(rows):
            want = [py_local_pos(p, n, I) if p >= 0 and (p // I) % n == r else -1 for p in row]
            assert got[b].tolist() == want
            kept = [x for x in want if x >= 0]
            assert cnt[b] == len(kept)
            assert comp[b].tolist() == kept + [-1] * (K - len(kept))


def test_localize_topk_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        dcp.localize_topk(jnp.zeros((1, 2), jnp.int32), 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# Scenario: the same tokens in a single-device cache and in a DCP cache


_init = jax.jit(jaxkv.init_cache, static_argnums=(0, 1))
_rand = jax.jit(F.random_tokens, static_argnums=(0, 2))


class Scenario:
    """Random requests written into an unsharded reference cache and a DCP-N cache.

    The tokens depend only on (geometry, lens, seed), so scenarios of different N share them.
    """

    def __init__(self, geo, n, interleave, lens, seed=0, ref=True, sharded=True):
        rng = np.random.default_rng(seed)
        self.geo, self.n, self.lens = geo, n, np.asarray(lens, np.int32)
        Bq = len(lens)
        ps = geo.page_size
        maxlen = max(int(self.lens.max()), 1)
        # reference: full pages of page_size positions, distinct ids >= 1
        Pr = math.ceil(maxlen / ps)
        self.ref_bt = rng.permutation(np.arange(1, Bq * Pr + 1)).reshape(Bq, Pr).astype(np.int32)
        self.ref_sbt = rng.permutation(np.arange(1, Bq * Pr + 1)).reshape(Bq, Pr).astype(np.int32)
        ref_pages = {p.name: (Bq * Pr + 1 if p.kind == "token" else 4) for p in geo.pools()}
        # DCP: virtual blocks of page_size * n positions (their own random ids)
        drng = np.random.default_rng(seed * 1000 + n)
        Pd = math.ceil(maxlen / (ps * n))
        nd = Bq * Pd + 2
        self.dcp_bt = drng.permutation(np.arange(1, nd))[:Bq * Pd].reshape(Bq, Pd).astype(np.int32)
        self.dcp_sbt = drng.permutation(np.arange(1, nd))[:Bq * Pd].reshape(Bq, Pd).astype(
            np.int32)
        self.mesh = dcp.make_mesh(n)
        self.ref = _init(geo, jaxkv.layer_major(geo, ref_pages)) if ref else None
        dpages = {p.name: (nd if p.kind == "token" else 4) for p in geo.pools()}
        self.dc = (dcp.init_dcp_cache(geo, dpages, self.mesh, interleave=interleave)
                   if sharded else None)
        key = jax.random.key(seed)
        self.written = {}
        for pool, count, table in self.pool_plan():
            spec = geo.pool(pool)
            tpp = geo.pool_tokens_per_page(pool)
            T = max(int(count.max()), 1)
            pos = np.arange(T)[None, :].repeat(Bq, 0)
            pos = np.where(pos < count[:, None], pos, -1)
            rl = np_locs(pos, self.ref_sbt if table == "swa" else self.ref_bt, tpp).reshape(-1)
            dl = np_locs(pos, self.dcp_sbt if table == "swa" else self.dcp_bt,
                         tpp * n).reshape(-1)
            key, k = jax.random.split(key)
            toks = _rand(spec.fmt, k, (spec.num_layers, rl.shape[0]))
            if ref:
                self.ref = _set(self.ref, pool, None, jnp.asarray(rl), toks)
            if sharded:
                self.dc = dcp.set_tokens_dcp(self.dc, pool, None, jnp.asarray(dl), toks)
            self.written[pool] = (pos, dl, toks)

    def pool_plan(self):
        g = self.geo
        if g.is_dsv4:
            return [("swa", self.lens, "swa"), ("c4", self.lens // g.csa_ratio, "full"),
                    ("c4_indexer", self.lens // g.csa_ratio, "full"),
                    ("c128", self.lens // g.hca_ratio, "full")]
        return [("kv", self.lens, "full"), ("indexer", self.lens, "full")]

    def kwargs(self, which):
        kw = {"seq_lens": jnp.asarray(self.lens)}
        if which == "ref":
            kw["block_table"] = jnp.asarray(self.ref_bt)
            if self.geo.is_dsv4:
                kw["swa_block_table"] = jnp.asarray(self.ref_sbt)
        else:
            kw["block_table"] = jnp.asarray(self.dcp_bt)
            if self.geo.is_dsv4:
                kw["swa_block_table"] = jnp.asarray(self.dcp_sbt)
        return kw


def _queries(geo, Bq, H, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
    q = jax.random.normal(k1, (Bq, H, geo.mla.width), jnp.float32)
    iq = jax.random.normal(k2, (Bq, 4, geo.indexer_dim), jnp.float32)
    iw = jax.random.normal(k3, (Bq, 4), jnp.float32)
    return q, iq, iw


def _rel(a, b):
    """Relative error: per output row (request, head) max |a - b| / max |b| (LSE: per element,
    relative to max(|b|, 1)); -inf patterns must agree exactly."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    assert np.array_equal(np.isfinite(a), fin), "finite patterns differ"
    if b.ndim == 3:
        den = np.maximum(np.max(np.abs(b), axis=-1, keepdims=True), 1e-30)
        return float(np.max(np.abs(a - b) / den, initial=0.0))
    return float(np.max(np.abs(a[fin] - b[fin]) / np.maximum(np.abs(b[fin]), 1.0), initial=0.0))


GEOS = {"dsv4": lambda: jaxkv.tiny(3, page_size=16, swa_window=8, hca_ratio=8),
        "v32": lambda: jaxkv.tiny(2, page_size=8, v32=True)}


def _lens(geo):
    # 1 and 5 are shorter than the DCP width (N = 2 / 8), the others span several virtual blocks
    return [1, 5, 2 * geo.page_size * 8 - 3, 3 * geo.page_size + 2]


_REF = {}


def _reference(model):
    """Reference outputs of every tested (layer, base), computed once per model."""
    if model not in _REF:
        geo = GEOS[model]()
        sc = Scenario(geo, 1, 1, _lens(geo), seed=7, sharded=False)
        q, iq, iw = _queries(geo, len(sc.lens), 16, 7)
        layers = range(geo.num_layers) if geo.is_dsv4 else [1]
        # base "2" on the layer that selects with the indexer (DSv4 C4 / V3.2 DSA); "e" on all
        keys = [(layer, "e") for layer in layers] + [(1, "2")]
        res = {(layer, base): _ref_decode(q, sc.ref, layer, index_q=iq, index_w=iw, base=base,
                                          **sc.kwargs("ref"))
               for layer, base in keys}
        _REF[model] = (q, iq, iw, res)
    return _REF[model]


_SC = {}


def _scenario(model, n, interleave):
    """The DCP-N scenario holding the reference's tokens (built once; decode tests share it)."""
    if (model, n, interleave) not in _SC:
        geo = GEOS[model]()
        _SC[(model, n, interleave)] = Scenario(geo, n, interleave, _lens(geo), seed=7, ref=False)
    return _SC[(model, n, interleave)]


@needs8
@pytest.mark.parametrize("model", ["dsv4", "v32"])
@pytest.mark.parametrize("n,interleave", [(1, 1), (2, 1), (2, "page"), (4, 1), (4, "page"),
                                          (8, 1), (8, "page")])  # N = 1: I has no effect
def test_decode_matches_reference(model, n, interleave):
    """DCP decode (all-gather q, local attention, LSE merge) == the oracle.  The default merge
    (auto) here: whatever dcp.auto_method picks for 4 x 16 x 512 f32 (with the run-3 tables:
    the all-to-all of the packed partials at every N; test_auto_method)."""
    geo = GEOS[model]()
    q, iq, iw, res = _reference(model)
    sc = _scenario(model, n, interleave)
    for i, (layer, base) in enumerate(sorted(res)):
        # fewer compilations: DSv4 layer 0 (SWA only; every layer attends the window too) only
        # at I = 1; base "2" at N in {2, 8}
        if geo.is_dsv4 and layer == 0 and interleave != 1:
            continue
        if base == "2" and n not in (2, 8):
            continue
        ro, rl = res[(layer, base)]
        do, dl = dcp.decode(sc.dc, q, layer, index_q=iq, index_w=iw, base=base,
                            **sc.kwargs("dcp"))
        assert do.shape == ro.shape and dl.shape == rl.shape
        assert np.all(np.isfinite(np.asarray(do)))
        assert _rel(do, ro) <= 1e-5, (layer, base)
        assert _rel(dl, rl) <= 1e-5, (layer, base)
    # request 0 (L = 1) lives on rank 0 only: every other rank had no keys for it
    assert np.isfinite(np.asarray(res[sorted(res)[0]][1])[0]).all()


@needs8
def test_decode_compact_and_all_to_all_merge():
    """Compacted top-k lists and the explicit merge methods (V3.2, N = 4; the reference and the
    DCP scenario are shared with test_decode_matches_reference: lengths 1 and 5 shorter than or
    about N, 125 over several virtual blocks)."""
    q, iq, iw, res = _reference("v32")
    sc = _scenario("v32", 4, 1)
    ro, rl = res[(1, "e")]
    # all_to_all_packed: test_merge_vs_numpy_with_empty_ranks; auto ("packed" with the run-3
    # tables): test_decode_matches_reference; packed_gather: test_merge_packed_vs_numpy_...
    for compact, method in ((True, "reduce_scatter"), (False, "all_to_all"), (True, "packed_rs")):
        do, dl = dcp.decode(sc.dc, q, 1, index_q=iq, index_w=iw, compact=compact,
                            method=method, **sc.kwargs("dcp"))
        assert _rel(do, ro) <= 1e-5 and _rel(dl, rl) <= 1e-5


@needs8
def test_sharded_writes_land_at_spec_slots():
    """Each device's shard holds exactly the tokens it owns, at SPEC §9's local slot."""
    geo = GEOS["v32"]()
    n, I = 4, 2
    sc = Scenario(geo, n, I, [13, 40], seed=3, ref=False)
    pos, dl, toks = sc.written["kv"]
    tpp = geo.pool_tokens_per_page("kv")
    value, _ = F.to_parts(geo.mla, jax.tree_util.tree_map(lambda x: x[0], toks))
    value = np.asarray(value)
    buf = sc.dc.buffers[sc.dc.layout.pool("kv").placements[0].buffer]
    shards = {s.device.id: np.asarray(s.data) for s in buf.addressable_shards}
    devs = [d.id for d in sc.mesh.devices.reshape(-1)]
    rows = sc.dc.layout.pool("kv").num_pages * geo.num_layers
    expected = [np.zeros((rows, buf.shape[1]), np.uint8) for _ in range(n)]
    pb = sc.dc.layout.pool("kv").page_bytes
    for i, g in enumerate(dl):
        if g < 0:
            continue
        r, l = py_owner(int(g), n, I, tpp), py_local(int(g), n, I, tpp)
        page, t = divmod(l, tpp)  # layer 0: rows [0, num_pages)
        expected[r][page, t * 656:(t + 1) * 656] = value[i]
    for r in range(n):
        got = shards[devs[r]]
        assert got.shape == (rows, pb)
        # layer 0 rows only (other layers hold other random tokens)
        np.testing.assert_array_equal(got[:sc.dc.layout.pool("kv").num_pages],
                                      expected[r][:sc.dc.layout.pool("kv").num_pages])
    # replicated indexer: every device holds the same bytes
    ib = sc.dc.buffers[sc.dc.layout.pool("indexer").placements[0].buffer]
    ish = [np.asarray(s.data) for s in ib.addressable_shards]
    for s in ish[1:]:
        np.testing.assert_array_equal(s, ish[0])
    assert ish[0].shape == ib.shape


@needs8
def test_read_back_and_bad_locs():
    geo = GEOS["dsv4"]()
    sc = _scenario("dsv4", 8, 1)  # lengths 1, 5, 253, 50 (shared with the decode tests)
    for pool in ("swa", "c4", "c4_indexer", "c128"):
        pos, dl, toks = sc.written[pool]
        got = dcp.get_tokens_dcp(sc.dc, pool, None, jnp.asarray(dl))
        for a, b in zip(F.to_parts(geo.pool(pool).fmt, got),
                        F.to_parts(geo.pool(pool).fmt, toks)):
            a, b = np.asarray(a), np.asarray(b)
            ok = dl >= 0
            np.testing.assert_array_equal(a[:, ok], b[:, ok])
            assert not a[:, ~ok].any()  # padding reads zeros
    cap = sc.dc.global_capacity("c4")
    with pytest.raises(ValueError, match="outside"):
        dcp.set_tokens_dcp(sc.dc, "c4", 0, jnp.asarray([cap]),
                           F.random_tokens(geo.mla, jax.random.key(0), 1))
    with pytest.raises(ValueError, match="interleave"):
        dcp.init_dcp_cache(geo, 4, sc.mesh, interleave=3)
    with pytest.raises(ValueError, match="axis"):
        dcp.init_dcp_cache(geo, 4, sc.mesh, axis_name="tp")


# ---------------------------------------------------------------------------------------------
# The merge


def _run_merge(n, outs, lses, base, method="reduce_scatter"):
    mesh = dcp.make_mesh(n)
    f = jax.jit(dcp.shard_map(lambda o, l: dcp.merge(o[0], l[0], "dcp", base, method=method),
                              mesh=mesh, in_specs=(jax.sharding.PartitionSpec("dcp"),) * 2,
                              out_specs=(jax.sharding.PartitionSpec(None, "dcp"),) * 2))
    return f(jnp.asarray(outs), jnp.asarray(lses))


def _np_merge(outs, lses, base):
    outs, lses = np.asarray(outs, np.float64), np.asarray(lses, np.float64)
    b = math.e if base == "e" else 2.0
    w = np.where(np.isfinite(lses), b ** np.where(np.isfinite(lses), lses, 0), 0.0)
    tot = w.sum(0)
    lse = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1)) / math.log(b), -np.inf)
    o = (outs * w[..., None]).sum(0) / np.where(tot > 0, tot, 1)[..., None]
    return o, lse


@needs8
@pytest.mark.parametrize("n,base,method", [
    (n, b, "reduce_scatter") for n in (1, 2, 4, 8) for b in ("e", "2")] + [
    (2, "e", "all_to_all"), (8, "2", "all_to_all"), (4, "e", "all_to_all_packed"),
    (8, "2", "all_to_all_packed")])
def test_merge_vs_numpy_with_empty_ranks(n, base, method):
    rng = np.random.default_rng(n)
    Bq, h, Dv = 3, 2, 16
    H = n * h
    outs = rng.normal(size=(n, Bq, H, Dv)).astype(np.float32)
    lses = (rng.normal(size=(n, Bq, H)) * 30).astype(np.float32)  # large spreads: needs the max
    lses[0, 0, :] = -np.inf  # rank 0 has no keys for request 0
    outs[0, 0, :] = np.nan  # ... and garbage output: must contribute exactly zero
    lses[:, 1, 0] = -np.inf  # nobody has keys for (request 1, head 0)
    outs[:, 1, 0] = np.inf
    outs_clean = np.where(np.isfinite(lses)[..., None], outs, 0.0)
    _assert_merged(*_run_merge(n, outs, lses, base, method), *_np_merge(outs_clean, lses, base))


def _assert_merged(o, l, wo, wl):
    """A merge result (o, l) against the numpy merge (wo, wl) of inputs where nobody has keys for
    (request 1, head 0): no NaN, values within float32 rounding, -inf exactly where expected."""
    o, l = np.asarray(o), np.asarray(l)
    assert not np.isnan(o).any() and not np.isnan(l).any()
    np.testing.assert_allclose(o, wo, rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isfinite(l), np.isfinite(wl))
    np.testing.assert_allclose(l[np.isfinite(l)], wl[np.isfinite(wl)], rtol=1e-6)
    assert (o[1, 0] == 0).all() and l[1, 0] == -np.inf


@needs8
def test_empty_rank_contributes_exactly_zero():
    """A rank with lse = -inf changes nothing, bit for bit: merging [a, empty] == merging [a]."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 2, 4, 8)).astype(np.float32)
    la = rng.normal(size=(1, 2, 4)).astype(np.float32)
    o1, l1 = _run_merge(1, a, la, "e")
    outs = np.concatenate([a, np.full_like(a, np.nan)])
    lses = np.concatenate([la, np.full_like(la, -np.inf)])
    o2, l2 = _run_merge(2, outs, lses, "e")
    # rank 0's heads of the 2-rank merge are heads [0, 2): compare with the same heads
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(o1))
    np.testing.assert_array_equal(np.asarray(l2), np.asarray(l1))


def _np_pack(outs, lses, n):
    """numpy pack_partials, written out: [rank][chunk r, b] = [o(b, heads of r).ravel() | lse]."""
    N, Bq, H, Dv = outs.shape
    h = H // n
    packed = np.zeros((N, n, Bq, h * (Dv + 1)), np.float32)
    for src in range(N):
        for r in range(n):
            for b in range(Bq):
                packed[src, r, b, :h * Dv] = outs[src, b, r * h:(r + 1) * h].reshape(-1)
                packed[src, r, b, h * Dv:] = lses[src, b, r * h:(r + 1) * h]
    return packed


def test_pack_partials_layout_and_round_trip():
    rng = np.random.default_rng(5)
    outs = rng.normal(size=(1, 3, 8, 6)).astype(np.float32)
    lses = rng.normal(size=(1, 3, 8)).astype(np.float32)
    lses[0, 1, 2] = -np.inf
    for n in (1, 2, 4, 8):
        got = np.asarray(dcp.pack_partials(outs[0], lses[0], n))
        np.testing.assert_array_equal(got, _np_pack(outs, lses, n)[0])
        o, l = dcp.unpack_partials(got, dv=6)
        np.testing.assert_array_equal(np.asarray(o), outs[0])
        np.testing.assert_array_equal(np.asarray(l), lses[0])
    with pytest.raises(ValueError, match="multiple of n"):
        dcp.pack_partials(outs[0], lses[0], 3)
    with pytest.raises(ValueError, match="lse must be"):
        dcp.pack_partials(outs[0], lses[0, :, :4], 2)
    with pytest.raises(ValueError, match="dv"):
        dcp.unpack_partials(np.zeros((2, 3, 10), np.float32), dv=6)


def _run_merge_packed(n, packed, base, dv, collective="all_to_all"):
    mesh = dcp.make_mesh(n)
    f = jax.jit(dcp.shard_map(lambda p: dcp.merge_packed(p[0], "dcp", base, dv=dv,
                                                         collective=collective),
                              mesh=mesh, in_specs=(jax.sharding.PartitionSpec("dcp"),),
                              out_specs=(jax.sharding.PartitionSpec(None, "dcp"),) * 2))
    return f(jnp.asarray(packed))


@needs8
@pytest.mark.parametrize("n,base", [(1, "e"), (2, "e"), (2, "2"), (4, "e"), (8, "2")])
def test_merge_packed_vs_numpy_with_empty_ranks(n, base):
    """merge_packed on the producer layout == numpy merge; empty ranks (NaN garbage) add 0."""
    rng = np.random.default_rng(10 + n)
    Bq, h, Dv = 3, 2, 16
    H = n * h
    outs = rng.normal(size=(n, Bq, H, Dv)).astype(np.float32)
    lses = (rng.normal(size=(n, Bq, H)) * 30).astype(np.float32)
    lses[0, 0, :] = -np.inf
    outs[0, 0, :] = np.nan
    lses[:, 1, 0] = -np.inf
    outs[:, 1, 0] = np.inf
    if n > 1:
        lses[n - 1, 2, :] = -np.inf  # a different empty rank for request 2
        outs[n - 1, 2, :] = -np.inf
    packed = _np_pack(outs, lses, n)
    o, l = map(np.asarray, _run_merge_packed(n, packed, base, Dv))
    wo, wl = _np_merge(np.where(np.isfinite(lses)[..., None], outs, 0.0), lses, base)
    _assert_merged(o, l, wo, wl)
    # the all-gather and reduce-scatter transports of the same layout: the same bytes arrive,
    # so the same merge gives the same bits (packed_rs sanitizes the empty ranks' garbage to
    # o = 0 / lse = -inf before its sum: NaN + 0 would be NaN); and method="packed" /
    # "packed_rs" / "auto" on unpacked input
    for collective in ("all_gather", "reduce_scatter"):
        o2, l2 = map(np.asarray, _run_merge_packed(n, packed, base, Dv, collective))
        np.testing.assert_array_equal(o2, o)
        np.testing.assert_array_equal(l2, l)
    for method in ("packed", "packed_rs", "auto"):
        _assert_merged(*_run_merge(n, outs, lses, base, method), wo, wl)


@needs8
def test_merge_packed_empty_rank_exactly_zero_and_bad_input():
    """[a, empty] merged packed == [a] merged, bit for bit; wrong packed shapes are refused."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(1, 2, 4, 17)).astype(np.float32)
    la = rng.normal(size=(1, 2, 4)).astype(np.float32)
    o1, l1 = _run_merge_packed(1, _np_pack(a, la, 1), "e", 17)
    outs = np.concatenate([a, np.full_like(a, np.nan)])
    lses = np.concatenate([la, np.full_like(la, -np.inf)])
    for collective in dcp.COLLECTIVES:
        o2, l2 = _run_merge_packed(2, _np_pack(outs, lses, 2), "e", 17, collective)
        np.testing.assert_array_equal(np.asarray(o2), np.asarray(o1))
        np.testing.assert_array_equal(np.asarray(l2), np.asarray(l1))
    mesh = dcp.make_mesh(2)
    bad = jnp.zeros((2, 3, 2 * 17 + 1), jnp.float32)  # rows not a multiple of dv + 1
    with pytest.raises(ValueError, match="packed must be"):
        dcp.shard_map(lambda p: dcp.merge_packed(p[0], "dcp", dv=16), mesh=mesh,
                      in_specs=(jax.sharding.PartitionSpec("dcp"),),
                      out_specs=(jax.sharding.PartitionSpec(None, "dcp"),) * 2)(bad[:, None])
    with pytest.raises(ValueError, match="collective must be"):
        _run_merge_packed(2, _np_pack(outs, lses, 2), "e", 17, "psum")
    with pytest.raises(ValueError, match="method must be"):
        _run_merge(2, outs, lses, "e", "psum")


@needs8
def test_merge_packed_has_no_full_size_intermediate():
    """The optimized HLO of merge_packed (N = 2) never materializes an [N, B, h, Dv] array: the
    received partials are merged in one elementwise pass (the old merge wrote N * B*h*Dv)."""
    import re
    n, Bq, h, Dv = 2, 16, 64, 512  # compiled only (the sizes of a real decode batch)
    mesh = dcp.make_mesh(n)
    f = jax.jit(dcp.shard_map(lambda p: dcp.merge_packed(p[0], "dcp", dv=Dv), mesh=mesh,
                              in_specs=(jax.sharding.PartitionSpec("dcp"),),
                              out_specs=(jax.sharding.PartitionSpec(None, "dcp"),) * 2))
    arg = jax.ShapeDtypeStruct((n, n, Bq, h * (Dv + 1)), jnp.float32)
    text = f.lower(arg).compile().as_text()
    entry = text[text.index("ENTRY"):]
    sizes = []
    for ln in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (fusion|copy|concatenate)\(", ln)
        if m:
            sizes.append(int(np.prod([int(d) for d in m.group(1).split(",")])))
    assert sizes and max(sizes) < n * Bq * h * Dv, sizes
    assert Bq * h * Dv in sizes  # the merged output, written once


def test_auto_method(monkeypatch):
    """auto: no collective at N = 1; packed_rs up to auto_rs_max_bytes(N) of partials per rank
    (B*H*Dv*4), else packed_gather up to auto_gather_max_bytes(N), else one all-to-all (packed
    if the producer packs).  The rule is checked with patched tables (the real ones are
    measurements the lead updates), the measured N = 2 gather entry as it is."""
    assert dcp.auto_method(64, 128, 512, 1) == "reduce_scatter"
    assert dcp.auto_method(1, 128, 512, 1, packed_input=True) == "reduce_scatter"
    # run 3 (2 x H200): the all-gather transport lost at every T, so N = 2 never picks it
    assert dcp.AUTO_GATHER_MAX_BYTES[2] == 0
    assert all(dcp.auto_method(T, 128, 512, 2) != "packed_gather" for T in (1, 2, 4, 256))

    def expect(T, H, Dv, n, packed_input):
        b = T * H * Dv * 4
        if b <= dcp.auto_rs_max_bytes(n):
            return "packed_rs"
        if b <= dcp.auto_gather_max_bytes(n):
            return "packed_gather"
        return "packed" if packed_input else "all_to_all_packed"

    T1 = 128 * 512 * 4  # one token of 128 heads x 512
    for rs, ga in ((0, 0), (T1, 0), (0, 2 * T1), (T1, 4 * T1)):
        monkeypatch.setattr(dcp, "AUTO_RS_MAX_BYTES", {2: rs})
        monkeypatch.setattr(dcp, "AUTO_GATHER_MAX_BYTES", {2: ga})
        for n in (2, 3, 4, 8):
            # other N: the N = 2 entry at the same received bytes, / (N - 1)
            assert dcp.auto_rs_max_bytes(n) == rs // (n - 1)
            assert dcp.auto_gather_max_bytes(n) == ga // (n - 1)
            for T in (1, 2, 3, 4, 16, 256):
                for pi in (False, True):
                    assert dcp.auto_method(T, 128, 512, n, packed_input=pi) == expect(
                        T, 128, 512, n, pi), (rs, ga, n, T, pi)
        # exactly at a limit: that transport; one byte's worth (one token of one head) more: not
        if rs:
            assert dcp.auto_method(rs // 4, 1, 1, 2) == "packed_rs"
            assert dcp.auto_method(rs // 4 + 1, 1, 1, 2) == ("packed_gather" if ga > rs else
                                                              "all_to_all_packed")
        if ga:
            assert dcp.auto_method(ga // 4, 1, 1, 2, packed_input=True) == (
                "packed_gather" if ga > rs else "packed_rs")
            assert dcp.auto_method(ga // 4 + 1, 1, 1, 2, packed_input=True) == "packed"
    # an explicit per-N entry wins over the scaled N = 2 one
    monkeypatch.setattr(dcp, "AUTO_RS_MAX_BYTES", {2: T1, 4: 8 * T1})
    assert dcp.auto_method(8, 128, 512, 4) == "packed_rs"
    assert dcp.auto_method(9, 128, 512, 4) == "all_to_all_packed"
    assert set(dcp.METHODS) >= {"auto", "reduce_scatter", "all_to_all", "all_to_all_packed",
                                "packed", "packed_gather", "packed_rs"}


def test_merge_partials_bases_agree():
    rng = np.random.default_rng(2)
    outs = rng.normal(size=(3, 2, 4, 8)).astype(np.float32)
    lse_e = rng.normal(size=(3, 2, 4)).astype(np.float32) * 5
    oe, le = dcp.merge_partials(outs, lse_e, "e")
    o2, l2 = dcp.merge_partials(outs, lse_e * np.float32(A.LOG2E), "2")
    np.testing.assert_allclose(np.asarray(o2), np.asarray(oe), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(le) * A.LOG2E, rtol=1e-5)
    with pytest.raises(ValueError, match="base"):
        dcp.merge_partials(outs, lse_e, "10")


# ---------------------------------------------------------------------------------------------
# N -> M re-sharding


@needs8
@pytest.mark.parametrize("model,n,m", [("dsv4", 8, 2), ("v32", 1, 4), ("v32", 4, 1),
                                       ("v32", 2, 8)])
def test_reshard_bit_exact(model, n, m):
    geo = GEOS[model]()
    lens = [5, 2 * geo.page_size * max(n, m) - 3, 1]
    src = Scenario(geo, n, 1 if n != 4 else "page", lens, seed=n * 10 + m, ref=False)
    rng = np.random.default_rng(n * 100 + m)
    ps = geo.page_size
    Pd = math.ceil(max(lens) / (ps * m))
    nd = len(lens) * Pd + 3
    dmesh = dcp.make_mesh(m, devices=jax.devices()[::-1])  # other devices, other order
    dst = dcp.init_dcp_cache(geo, {p.name: (nd if p.kind == "token" else 4)
                                   for p in geo.pools()}, dmesh,
                             interleave="page" if m == 2 else 1)
    # poison: fill every dst buffer with random bytes; untouched bytes must survive
    poison = tuple(jax.device_put(
        jnp.asarray(rng.integers(0, 256, b.shape, np.uint8)), b.sharding) for b in dst.buffers)
    dst = dst.__class__(poison, dst.layout, dst.mesh, dst.axis_name, dst.interleave)
    dbt = rng.permutation(np.arange(1, nd))[:len(lens) * Pd].reshape(len(lens), Pd)
    dsbt = rng.permutation(np.arange(1, nd))[:len(lens) * Pd].reshape(len(lens), Pd)
    kw = dict(seq_lens=np.asarray(lens), src_block_table=src.dcp_bt, dst_block_table=dbt)
    if geo.is_dsv4:
        kw.update(src_swa_block_table=src.dcp_sbt, dst_swa_block_table=dsbt)
    out = dcp.reshard_request(src.dc, dst, **kw)
    for pool, count, table in src.pool_plan():
        tpp = geo.pool_tokens_per_page(pool)
        lo = np.maximum(src.lens - geo.swa_window, 0) if pool == "swa" else 0 * src.lens
        T = max(int(count.max()), 1)
        pos = np.arange(T)[None, :].repeat(len(lens), 0)
        pos = np.where((pos < count[:, None]) & (pos >= lo[:, None]), pos, -1)
        d_l = np_locs(pos, dsbt if table == "swa" else dbt, tpp * m).reshape(-1)
        got = dcp.get_tokens_dcp(out, pool, None, jnp.asarray(d_l))
        # the moved tokens are, bit for bit, the ones originally written into the DCP-N cache
        _, _, wt = src.written[pool]
        keep = pos.reshape(-1) >= 0
        for x, y in zip(F.to_parts(geo.pool(pool).fmt, got), F.to_parts(geo.pool(pool).fmt, wt)):
            np.testing.assert_array_equal(np.asarray(x)[:, keep], np.asarray(y)[:, keep])
        if pool in ("c4", "kv"):  # every other slot of the pool still holds the poison
            others = np.setdiff1d(np.arange(out.global_capacity(pool)), d_l[keep]).astype(np.int32)
            a = dcp.get_tokens_dcp(dst, pool, None, jnp.asarray(others))
            b = dcp.get_tokens_dcp(out, pool, None, jnp.asarray(others))
            for x, y in zip(F.to_parts(geo.mla, a), F.to_parts(geo.mla, b)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for p, x, y in zip(out.layout.pools, dst.buffers, out.buffers):  # state pools untouched
        if p.spec.kind == "state":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_capacity_numbers():
    v32 = jaxkv.dsv32()
    c = dcp.kv_capacity(v32, 80e9, 8)
    assert c["bytes_per_token_sharded"] == 656 * 61
    assert c["bytes_per_token_replicated"] == 132 * 61
    assert c["gain"] == pytest.approx((656 + 132) / (656 / 8 + 132))
    assert dcp.kv_capacity(v32, 80e9, 1)["gain"] == pytest.approx(1.0)
    pro = jaxkv.dsv4_pro()
    c = dcp.kv_capacity(pro, 80e9, 2)
    sh = 584 * (30 / 4 + 31 / 128)
    rep = 132 * 30 / 4
    assert c["gain"] == pytest.approx((sh + rep) / (sh / 2 + rep))
    assert 1 < c["gain"] < 2


@needs8
def test_capacity_report_of_a_cache():
    geo = GEOS["dsv4"]()
    mesh = dcp.make_mesh(4)
    dc = dcp.init_dcp_cache(geo, {p.name: (6 if p.kind == "token" else 4) for p in geo.pools()},
                            mesh)
    rep = dcp.capacity(dc)
    lay = dc.layout
    assert rep["pools"]["c4"]["global_tokens"] == 4 * rep["pools"]["c4"]["local_tokens"]
    assert lay.pool("c4_indexer").num_pages == 4 * lay.pool("c4").num_pages
    assert rep["pools"]["c4_indexer"]["local_tokens"] == rep["pools"]["c4"]["global_tokens"]
    assert rep["device_bytes"] == lay.nbytes
    # per-device bytes of each buffer = what a shard holds
    for p, b in zip(lay.pools, dc.buffers):
        shard = b.addressable_shards[0].data
        assert shard.size == lay.pool(p.name).num_pages * p.spec.num_layers * p.page_bytes


# ---------------------------------------------------------------------------------------------
# GPUs (device machine: python -m pytest -m gpu tests/test_dcp.py)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["dsv4", "v32"])
def test_decode_and_reshard_on_gpus(model):
    """The CPU correctness test at N = number of GPUs (f32 with HIGHEST matmul precision)."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        pytest.skip(f"needs >= 2 GPUs, found {len(gpus)}")
    n = len(gpus)
    geo = GEOS[model]()
    lens = [1, n - 1 or 1, 2 * geo.page_size * n - 3, 3 * geo.page_size + 2]
    for interleave in (1, "page"):
        ref = Scenario(geo, 1, 1, lens, seed=9)
        sc = Scenario(geo, n, interleave, lens, seed=9, ref=False)
        q, iq, iw = _queries(geo, len(lens), 2 * n, 9)
        layers = range(geo.num_layers) if geo.is_dsv4 else [1]
        for layer in layers:
            for base in ("e", "2"):
                for method in ("reduce_scatter", "all_to_all", "all_to_all_packed", "packed",
                               "packed_gather", "packed_rs"):
                    ro, rl = _ref_decode(q, ref.ref, layer, index_q=iq, index_w=iw, base=base,
                                         **ref.kwargs("ref"))
                    do, dl = dcp.decode(sc.dc, q, layer, index_q=iq, index_w=iw, base=base,
                                        method=method, **sc.kwargs("dcp"))
                    assert _rel(do, ro) <= 1e-5, (interleave, layer, base, method)
                    assert _rel(dl, rl) <= 1e-5, (interleave, layer, base, method)
        # 1 -> N re-sharding on the GPUs, bit-exact
        one = ref  # its DCP-1 cache holds the same tokens
        kw = dict(seq_lens=np.asarray(lens), src_block_table=one.dcp_bt,
                  dst_block_table=sc.dcp_bt)
        if geo.is_dsv4:
            kw.update(src_swa_block_table=one.dcp_sbt, dst_swa_block_table=sc.dcp_sbt)
        empty = dcp.init_dcp_cache(geo, {p.name: p.num_pages for p in sc.dc.layout.pools},
                                   sc.mesh, interleave=interleave)
        moved = dcp.reshard_request(one.dc, empty, **kw)
        for pool in ("c4", "kv"):
            if pool not in sc.written:
                continue
            _, dl, toks = sc.written[pool]
            got = dcp.get_tokens_dcp(moved, pool, None, jnp.asarray(dl))
            ok = dl >= 0
            for a, b in zip(F.to_parts(geo.mla, got), F.to_parts(geo.mla, toks)):
                np.testing.assert_array_equal(np.asarray(a)[:, ok], np.asarray(b)[:, ok])
