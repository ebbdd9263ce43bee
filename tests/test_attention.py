"""The reference sparse MLA decode (jaxkv.attention) against plain numpy (float64)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv import attention as A
from jaxkv import formats as F

_decode = jax.jit(A.sparse_decode, static_argnames=("layer", "topk", "scale", "base", "impl"))
_rand = jax.jit(F.random_tokens, static_argnums=(0, 2))
_deq = jax.jit(F.dequantize, static_argnums=0)


def np_attend(q, kv, valid, dv=512, scale=None, base="e"):
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    Bq, h, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((Bq, h, dv))
    lse = np.full((Bq, h), -np.inf)
    for b in range(Bq):
        ks = kv[b][np.asarray(valid[b])]
        if len(ks) == 0:
            continue
        s = q[b] @ ks.T * scale  # [h, t]
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        out[b] = (p @ ks[:, :dv]) / p.sum(-1, keepdims=True)
        lse[b] = (m[:, 0] + np.log(p.sum(-1)))
    if base == "2":
        lse = lse * math.log2(math.e)
    return out, lse


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isfinite(a), np.isfinite(b))
    if b.ndim == 3:
        den = np.maximum(np.abs(b).max(-1, keepdims=True), 1e-30)
        return float((np.abs(a - b) / den).max(initial=0))
    f = np.isfinite(b)
    return float((np.abs(a[f] - b[f]) / np.maximum(np.abs(b[f]), 1.0)).max(initial=0))


@pytest.mark.parametrize("base", ["e", "2"])
def test_attend_vs_numpy(base):
    rng = np.random.default_rng(0)
    Bq, h, T, D = 4, 3, 37, 576
    q = rng.normal(size=(Bq, h, D)).astype(np.float32)
    kv = (rng.normal(size=(Bq, T, D)) * 2).astype(np.float32)
    valid = rng.random((Bq, T)) < 0.6
    valid[2] = False  # a request with no keys
    kv[~valid] = np.nan  # invalid rows may hold anything
    out, lse = A.attend(q, kv, valid, base=base)
    want_o, want_l = np_attend(q, np.where(valid[..., None], kv, 0), valid, base=base)
    assert rel(out, want_o) <= 1e-5 and rel(lse, want_l) <= 1e-5
    assert (np.asarray(out)[2] == 0).all() and (np.asarray(lse)[2] == -np.inf).all()
    assert not np.isnan(np.asarray(out)).any()


def test_attend_scale_and_errors():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 2, 512)).astype(np.float32)
    kv = rng.normal(size=(1, 5, 512)).astype(np.float32)
    valid = np.ones((1, 5), bool)
    out, lse = A.attend(q, kv, valid, scale=0.3, dv=256)
    wo, wl = np_attend(q, kv, valid, dv=256, scale=0.3)
    assert rel(out, wo) <= 1e-5 and rel(lse, wl) <= 1e-5
    with pytest.raises(ValueError, match="base"):
        A.attend(q, kv, valid, base="10")
    with pytest.raises(ValueError, match="shapes"):
        A.attend(q, kv[:, :, :500], valid)
    with pytest.raises(ValueError, match="dv"):
        A.attend(q, kv, valid, dv=600)


def test_select_topk_and_scores():
    rng = np.random.default_rng(2)
    Bq, Hi, T, Di = 3, 4, 20, 128
    iq = rng.normal(size=(Bq, Hi, Di)).astype(np.float32)
    iw = rng.normal(size=(Bq, Hi)).astype(np.float32)
    keys = rng.normal(size=(Bq, T, Di)).astype(np.float32)
    valid = rng.random((Bq, T)) < 0.7
    valid[1, 3:] = False
    s = np.asarray(A.indexer_scores(iq, iw, keys, valid))
    want = np.einsum("bh,bht->bt", iw, np.maximum(np.einsum("bhd,btd->bht", iq, keys), 0))
    np.testing.assert_allclose(s[valid], want[valid], rtol=1e-5, atol=1e-4)
    assert (s[~valid] == -np.inf).all()
    for k in (1, 5, 25):
        idx = np.asarray(A.select_topk(jnp.asarray(s), k))
        assert idx.shape == (Bq, k)
        for b in range(Bq):
            nv = int(valid[b].sum())
            order = np.argsort(-want[b][valid[b]], kind="stable")
            cand = np.flatnonzero(valid[b])[order][:k]
            assert sorted(idx[b][idx[b] >= 0].tolist()) == sorted(cand.tolist())
            assert (idx[b] >= 0).sum() == min(k, nv)


def test_paged_locs():
    bt = np.array([[3, 1, -1], [2, 5, 4]], np.int32)
    pos = np.array([[0, 5, 8, 9, 12, -1], [0, 4, 11, 12, 3, 7]], np.int32)
    got = np.asarray(A.paged_locs(pos, bt, 4))
    want = [[12, 5, -1, -1, -1, -1], [8, 20, 19, -1, 11, 23]]
    assert got.tolist() == want


def _setup(geo, lens, seed):
    """A cache with random tokens at every position of each request (one block table)."""
    rng = np.random.default_rng(seed)
    Bq = len(lens)
    P = max(math.ceil(max(lens) / geo.page_size), 1)
    bt = rng.permutation(np.arange(1, Bq * P + 1)).reshape(Bq, P).astype(np.int32)
    sbt = rng.permutation(np.arange(1, Bq * P + 1)).reshape(Bq, P).astype(np.int32)
    pages = {p.name: (Bq * P + 1 if p.kind == "token" else 4) for p in geo.pools()}
    cache = jax.jit(jaxkv.init_cache, static_argnums=(0, 1))(geo, jaxkv.layer_major(geo, pages))
    key = jax.random.key(seed)
    rows = {}  # pool -> (f32[L, Bq, T, W] dequantized rows by position)
    set_ = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"))
    pools = ([("swa", 1, sbt), ("c4", geo.csa_ratio, bt), ("c4_indexer", geo.csa_ratio, bt),
              ("c128", geo.hca_ratio, bt)] if geo.is_dsv4 else [("kv", 1, bt), ("indexer", 1, bt)])
    for pool, r, table in pools:
        spec = geo.pool(pool)
        tpp = geo.pool_tokens_per_page(pool)
        T = P * tpp
        locs = np.full((Bq, T), -1, np.int32)
        for b in range(Bq):
            for p in range(lens[b] // r):
                locs[b, p] = table[b, p // tpp] * tpp + p % tpp
        key, k = jax.random.split(key)
        toks = _rand(spec.fmt, k, (spec.num_layers, Bq * T))
        cache = set_(cache, pool, None, jnp.asarray(locs.reshape(-1)), toks)
        deq = np.asarray(_deq(spec.fmt, toks)).reshape(spec.num_layers, Bq, T, -1)
        rows[pool] = np.where((locs >= 0)[None, :, :, None], deq, np.nan)
    return cache, bt, sbt, rows


@pytest.mark.parametrize("model", ["dsv4", "v32"])
def test_sparse_decode_vs_numpy(model):
    geo = (jaxkv.tiny(3, page_size=16, swa_window=8, hca_ratio=8) if model == "dsv4"
           else jaxkv.tiny(2, page_size=8, v32=True))
    lens = [1, 3, 45, 70]
    cache, bt, sbt, rows = _setup(geo, lens, seed=3)
    rng = np.random.default_rng(4)
    Bq, h, Hi = len(lens), 3, 4
    q = rng.normal(size=(Bq, h, geo.mla.width)).astype(np.float32)
    iq = rng.normal(size=(Bq, Hi, geo.indexer_dim)).astype(np.float32)
    iw = rng.normal(size=(Bq, Hi)).astype(np.float32)
    k = geo.indexer_topk
    for layer in range(geo.num_layers):
        for base in ("e", "2"):
            out, lse = _decode(q, cache, layer, seq_lens=jnp.asarray(lens),
                                       block_table=jnp.asarray(bt),
                                       swa_block_table=jnp.asarray(sbt) if geo.is_dsv4 else None,
                                       index_q=iq, index_w=iw, base=base)
            # numpy: which rows does this layer see?
            kv_rows, valid = [], []
            for b, L in enumerate(lens):
                sel = []
                if geo.is_dsv4:
                    sel += [rows["swa"][layer, b, p] for p in range(max(0, L - geo.swa_window), L)]
                    ratio = geo.compress_ratios[layer]
                    if ratio == geo.csa_ratio:
                        li = geo.pool("c4").local_layer(layer)
                        n4 = L // ratio
                        keys = rows["c4_indexer"][li, b, :n4]
                        sc = np.einsum("h,ht->t", iw[b], np.maximum(iq[b] @ keys.T, 0))
                        top = np.argsort(-sc, kind="stable")[:k]
                        sel += [rows["c4"][li, b, p] for p in top]
                    elif ratio == geo.hca_ratio:
                        li = geo.pool("c128").local_layer(layer)
                        sel += [rows["c128"][li, b, p] for p in range(L // ratio)]
                else:
                    keys = rows["indexer"][layer, b, :L]
                    sc = np.einsum("h,ht->t", iw[b], np.maximum(iq[b] @ keys.T, 0))
                    top = np.argsort(-sc, kind="stable")[:k]
                    sel += [rows["kv"][layer, b, p] for p in top]
                kv_rows.append(sel)
            T = max(len(s) for s in kv_rows)
            kvn = np.zeros((Bq, T, geo.mla.width))
            vn = np.zeros((Bq, T), bool)
            for b, sel in enumerate(kv_rows):
                if sel:
                    kvn[b, :len(sel)] = np.stack(sel)
                    vn[b, :len(sel)] = True
            wo, wl = np_attend(q, kvn, vn, base=base)
            assert rel(out, wo) <= 1e-5, (layer, base)
            assert rel(lse, wl) <= 1e-5, (layer, base)


def test_sparse_decode_errors():
    geo = jaxkv.tiny(3, page_size=16, swa_window=8, hca_ratio=8)
    cache = jaxkv.init_cache(geo, jaxkv.layer_major(geo, 3))
    q = jnp.zeros((1, 2, 512))
    kw = dict(seq_lens=jnp.asarray([5]), block_table=jnp.asarray([[1]]))
    with pytest.raises(ValueError, match="swa_block_table"):
        A.sparse_decode(q, cache, 0, **kw)
    with pytest.raises(ValueError, match="index_q"):
        A.sparse_decode(q, cache, 1, swa_block_table=jnp.asarray([[1]]), **kw)
    with pytest.raises(ValueError, match="q must be"):
        A.sparse_decode(jnp.zeros((1, 2, 576)), cache, 0, swa_block_table=jnp.asarray([[1]]),
                        **kw)
    with pytest.raises(ValueError, match="layer"):
        A.sparse_decode(q, cache, 9, swa_block_table=jnp.asarray([[1]]), **kw)
