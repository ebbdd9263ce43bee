"""One test suite for every kernel implementation (reference, Pallas, Triton).

Every implementation is compared with an independent numpy byte-level model written here (and the
jnp reference with it), on random buffers (every byte outside the written windows is checked),
random and duplicate locations, and invalid ones (-1, capacity, beyond, negative) that must be
masked.  Addressing comes from the real layouts (layer-major and packed) of tiny geometries and from
real page sizes (DSv4-Flash, DeepSeek-V3.2) with few pages.

CPU: reference, Pallas in interpret mode, Triton kernels under Triton's interpreter on torch CPU
tensors.  GPU (``pytest -m gpu tests/test_kernels.py`` on the device machine): Pallas compiled,
Triton through jax-triton, Triton on torch CUDA tensors.
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.kernels import dispatch, pallas_ops, reference
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

torch = pytest.importorskip("torch")
triton_kernels = pytest.importorskip("jaxkv.kernels.triton_kernels")

# ---------------------------------------------------------------------------------------------
# The independent numpy model


def np_token_windows(a: TokenAddressing, l: int, loc: int, scale_width: int):
    """``(row, value_col, scale_col)`` of token ``loc`` of layer ``l``, or None if invalid."""
    if not 0 <= loc < a.num_pages * a.tpp:
        return None
    page, t = divmod(int(loc), a.tpp)
    row = a.row_base[l] + page * a.row_step
    return row, a.col_base[l] + t * a.value_bytes, (a.col_base[l] + a.tpp * a.value_bytes
                                                     + t * a.scale_stride)


def np_gather(buf, locs, a):
    L, N = a.num_layers, len(locs)
    v = np.zeros((L, N, a.value_bytes), np.uint8)
    s = np.zeros((L, N, a.scale_bytes), np.uint8)
    for l in range(L):
        for i, loc in enumerate(locs):
            w = np_token_windows(a, l, loc, a.scale_bytes)
            if w is None:
                continue
            row, vc, sc = w
            v[l, i] = buf[row, vc:vc + a.value_bytes]
            s[l, i] = buf[row, sc:sc + a.scale_bytes]
    return v, s


def np_scatter(buf, locs, v, s, a):
    buf = buf.copy()
    for l in range(a.num_layers):
        for i, loc in enumerate(locs):
            w = np_token_windows(a, l, loc, a.scale_bytes)
            if w is None:
                continue
            row, vc, sc = w
            buf[row, vc:vc + a.value_bytes] = v[l, i]
            buf[row, sc:sc + a.scale_bytes] = s[l, i]
    return buf


def np_copy_tokens(src, dst, sl, dl, sa, da):
    dst = dst.copy()
    V, S = sa.value_bytes, sa.scale_stride
    for l in range(sa.num_layers):
        for x, y in zip(sl, dl):
            ws, wd = np_token_windows(sa, l, x, S), np_token_windows(da, l, y, S)
            if ws is None or wd is None:
                continue
            dst[wd[0], wd[1]:wd[1] + V] = src[ws[0], ws[1]:ws[1] + V]
            dst[wd[0], wd[2]:wd[2] + S] = src[ws[0], ws[2]:ws[2] + S]
    return dst


def np_page(a: PageAddressing, l, p):
    if not 0 <= p < a.num_pages:
        return None
    return a.row_base[l] + p * a.row_step, a.col_base[l]


def np_gather_pages(buf, pages, a):
    out = np.zeros((a.num_layers, len(pages), a.page_bytes), np.uint8)
    for l in range(a.num_layers):
        for i, p in enumerate(pages):
            w = np_page(a, l, p)
            if w is not None:
                out[l, i] = buf[w[0], w[1]:w[1] + a.page_bytes]
    return out


def np_scatter_pages(buf, pages, data, a):
    buf = buf.copy()
    for l in range(a.num_layers):
        for i, p in enumerate(pages):
            w = np_page(a, l, p)
            if w is not None:
                buf[w[0], w[1]:w[1] + a.page_bytes] = data[l, i]
    return buf


def np_copy_pages(src, dst, sp, dp, sa, da):
    dst = dst.copy()
    for l in range(sa.num_layers):
        for x, y in zip(sp, dp):
            ws, wd = np_page(sa, l, x), np_page(da, l, y)
            if ws is None or wd is None:
                continue
            dst[wd[0], wd[1]:wd[1] + da.page_bytes] = src[ws[0], ws[1]:ws[1] + sa.page_bytes]
    return dst


# ---------------------------------------------------------------------------------------------
# Implementations behind one numpy-in / numpy-out interface


class JaxImpl:
    def __init__(self, mod):
        self.mod = mod

    def gather_tokens(self, buf, locs, a):
        v, s = self.mod.gather_tokens(jnp.asarray(buf), jnp.asarray(locs), a)
        return np.asarray(v), np.asarray(s)

    def scatter_tokens(self, buf, locs, v, s, a):
        return np.asarray(self.mod.scatter_tokens(jnp.asarray(buf), jnp.asarray(locs),
                                                  jnp.asarray(v), jnp.asarray(s), a))

    def gather_pages(self, buf, pages, a):
        return np.asarray(self.mod.gather_pages(jnp.asarray(buf), jnp.asarray(pages), a))

    def scatter_pages(self, buf, pages, data, a):
        return np.asarray(self.mod.scatter_pages(jnp.asarray(buf), jnp.asarray(pages),
                                                 jnp.asarray(data), a))

    def copy_pages(self, src, dst, sp, dp, sa, da):
        return np.asarray(self.mod.copy_pages(jnp.asarray(src), jnp.asarray(dst),
                                              jnp.asarray(sp), jnp.asarray(dp), sa, da))

    def copy_tokens(self, src, dst, sl, dl, sa, da):
        return np.asarray(self.mod.copy_tokens(jnp.asarray(src), jnp.asarray(dst),
                                               jnp.asarray(sl), jnp.asarray(dl), sa, da))


class TorchImpl:
    """``triton_kernels``' torch functions (CPU: Triton interpreter; CUDA: compiled)."""

    def __init__(self, device):
        self.device = device

    def _t(self, x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def gather_tokens(self, buf, locs, a):
        v, s = triton_kernels.gather_tokens_torch(self._t(buf), self._t(locs), a)
        return v.cpu().numpy(), s.cpu().numpy()

    def scatter_tokens(self, buf, locs, v, s, a):
        b = self._t(buf)
        triton_kernels.scatter_tokens_torch(b, self._t(locs), self._t(v), self._t(s), a)
        return b.cpu().numpy()

    def gather_pages(self, buf, pages, a):
        pytest.skip("the torch surface has copy_pages_torch, not gather_pages")

    scatter_pages = gather_pages

    def copy_pages(self, src, dst, sp, dp, sa, da):
        d = self._t(dst)
        triton_kernels.copy_pages_torch(self._t(src), d, self._t(sp), self._t(dp), sa, da)
        return d.cpu().numpy()

    def copy_tokens(self, src, dst, sl, dl, sa, da):
        d = self._t(dst)
        triton_kernels.copy_tokens_torch(self._t(src), d, self._t(sl), self._t(dl), sa, da)
        return d.cpu().numpy()


def _impl(name):
    if name == "reference":
        return JaxImpl(reference)
    if name == "pallas":
        return JaxImpl(pallas_ops)
    if name == "triton_torch":
        return TorchImpl("cpu")
    if name == "triton_torch_cuda":
        return TorchImpl("cuda")
    if name == "triton_jax":
        from jaxkv.kernels import triton_jax
        return JaxImpl(triton_jax)
    raise AssertionError(name)


IMPLS = ["reference", "pallas", "triton_torch",
         pytest.param("pallas", id="pallas-gpu", marks=pytest.mark.gpu),
         pytest.param("triton_jax", id="triton_jax-gpu", marks=pytest.mark.gpu),
         pytest.param("triton_torch_cuda", id="triton_torch_cuda-gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=IMPLS)
def impl(request):
    on_gpu = any(m.name == "gpu" for m in request.node.iter_markers())
    if on_gpu and jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    return _impl(request.param)


# ---------------------------------------------------------------------------------------------
# Cases: addressing from real layouts


@functools.lru_cache(maxsize=None)
def _layouts():
    tiny, v32, flash, dsv32 = (jaxkv.tiny(5), jaxkv.tiny(4, v32=True), jaxkv.dsv4_flash(),
                               jaxkv.dsv32())
    return {
        "tiny-lm": jaxkv.layer_major(tiny, 3),
        "tiny-packed": jaxkv.packed(tiny, 3),
        "v32-lm": jaxkv.layer_major(v32, 3),
        "v32-packed": jaxkv.packed(v32, 3),
        "flash-lm": jaxkv.layer_major(flash, 2),   # real page sizes: SWA 256/page, C4 64, C128 2
        "flash-packed": jaxkv.packed(flash, 2),
        "dsv32-lm": jaxkv.layer_major(dsv32, 2),
    }


CASES = [  # (layout, pool, layers or None): DSv4 MLA, indexer, state rows, V3.2
    ("tiny-lm", "swa", None), ("tiny-lm", "c128", None), ("tiny-lm", "c4_indexer", None),
    ("tiny-lm", "c4_state", None),
    ("tiny-packed", "swa", "group0"), ("tiny-packed", "c4", None),
    ("tiny-packed", "c4_indexer", None), ("tiny-packed", "c128_state", "group0"),
    ("v32-lm", "kv", None), ("v32-packed", "indexer", None),
    ("flash-lm", "swa", (0, 7)), ("flash-lm", "c4", (0, 20)), ("flash-lm", "c128", (3,)),
    ("flash-packed", "c4", (1, 2)), ("dsv32-lm", "kv", (0, 60)),
]


def _addressing(case):
    name, pool, layers = case
    lay = _layouts()[name]
    if layers == "group0":
        layers = lay.pool(pool).groups[0]
    b, a = jaxkv.token_addressing(lay, pool, layers)
    _, pa = jaxkv.page_addressing(lay, pool, layers)
    return lay.buffer_shapes[b], a, pa


def _ids(case):
    return f"{case[0]}-{case[1]}" + ("" if case[2] is None else f"-{case[2]}")


def _rand(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _locs(rng, cap, n, *, unique=False):
    """Random valid locations plus every kind of invalid one, shuffled."""
    valid = (rng.choice(cap, size=min(n, cap), replace=False) if unique
             else rng.integers(0, cap, n))
    bad = np.array([-1, cap, cap + 3, -7, 2**30, -1], np.int64)
    locs = np.concatenate([valid, bad])
    rng.shuffle(locs)
    return locs.astype(np.int32)


def _dedup_data(locs, *arrays):
    """Makes every duplicate location carry the data of its first occurrence (state-row rule)."""
    first = {}
    for i, loc in enumerate(locs):
        first.setdefault(int(loc), i)
    src = np.array([first[int(x)] for x in locs])
    return [x[:, src] for x in arrays]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gather_tokens(impl, case):
    shape, a, _ = _addressing(case)
    rng = np.random.default_rng(zlib.crc32(_ids(case).encode()))
    buf = _rand(rng, shape)
    locs = _locs(rng, a.capacity, 9)
    locs[3] = locs[0]  # a duplicate read
    v, s = impl.gather_tokens(buf, locs, a)
    ev, es = np_gather(buf, locs, a)
    assert v.dtype == np.uint8 and v.shape == ev.shape and s.shape == es.shape
    np.testing.assert_array_equal(v, ev)
    np.testing.assert_array_equal(s, es)
    rv, rs = (np.asarray(x) for x in reference.gather_tokens(jnp.asarray(buf), jnp.asarray(locs),
                                                             a))
    np.testing.assert_array_equal(rv, ev)
    np.testing.assert_array_equal(rs, es)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_scatter_tokens(impl, case):
    shape, a, _ = _addressing(case)
    rng = np.random.default_rng(zlib.crc32(_ids(case).encode()) + 1)
    buf = _rand(rng, shape)  # random bytes: every byte the kernel must not touch is checked
    locs = _locs(rng, a.capacity, 9)
    locs[5] = locs[1]
    v, s = _rand(rng, (a.num_layers, len(locs), a.value_bytes)), _rand(
        rng, (a.num_layers, len(locs), a.scale_bytes))
    v, s = _dedup_data(locs, v, s)
    out = impl.scatter_tokens(buf, locs, v, s, a)
    expect = np_scatter(buf, locs, v, s, a)
    np.testing.assert_array_equal(out, expect)
    ref = np.asarray(reference.scatter_tokens(jnp.asarray(buf), jnp.asarray(locs),
                                              jnp.asarray(v), jnp.asarray(s), a))
    np.testing.assert_array_equal(ref, expect)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[10]], ids=_ids)
def test_scatter_duplicates_one_writer_wins(impl, case):
    """Distinct data for a duplicated location: the window holds one writer's bytes, whole."""
    shape, a, _ = _addressing(case)
    rng = np.random.default_rng(7)
    buf = _rand(rng, shape)
    loc = int(rng.integers(0, a.capacity))
    locs = np.array([loc, -1, loc, loc], np.int32)
    v = _rand(rng, (a.num_layers, 4, a.value_bytes))
    s = _rand(rng, (a.num_layers, 4, a.scale_bytes))
    out = impl.scatter_tokens(buf, locs, v, s, a)
    cands = [np_scatter(buf, locs[i:i + 1], v[:, i:i + 1], s[:, i:i + 1], a) for i in (0, 2, 3)]
    if jax.default_backend() == "cpu":  # sequential implementations: one writer, whole
        assert any(np.array_equal(out, c) for c in cands), "not one writer's bytes"
    else:  # GPU threads may interleave writers: every byte is some writer's byte
        assert np.logical_or.reduce([out == c for c in cands]).all()


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[13]], ids=_ids)
def test_roundtrip_and_empty(impl, case):
    shape, a, _ = _addressing(case)
    rng = np.random.default_rng(3)
    buf = _rand(rng, shape)
    locs = rng.choice(a.capacity, size=min(6, a.capacity), replace=False).astype(np.int32)
    v, s = impl.gather_tokens(buf, locs, a)
    np.testing.assert_array_equal(impl.scatter_tokens(buf, locs, v, s, a), buf)
    empty = np.zeros((0,), np.int32)
    v0, s0 = impl.gather_tokens(buf, empty, a)
    assert v0.shape == (a.num_layers, 0, a.value_bytes)
    assert s0.shape == (a.num_layers, 0, a.scale_bytes)


PAGE_CASES = [CASES[i] for i in (0, 3, 5, 8, 9, 12)]


@pytest.mark.parametrize("case", PAGE_CASES, ids=_ids)
def test_gather_scatter_pages(impl, case):
    shape, _, pa = _addressing(case)
    rng = np.random.default_rng(11)
    buf = _rand(rng, shape)
    n = pa.num_pages
    pages = np.array([n - 1, -1, 0, n, n - 1, -3], np.int32)
    np.testing.assert_array_equal(impl.gather_pages(buf, pages, pa),
                                  np_gather_pages(buf, pages, pa))
    upages = np.array([n - 1, -1, 0, n + 2], np.int32)
    data = _rand(rng, (pa.num_layers, 4, pa.page_bytes))
    np.testing.assert_array_equal(impl.scatter_pages(buf, upages, data, pa),
                                  np_scatter_pages(buf, upages, data, pa))


PAGE_COPY = [("tiny-lm", "swa", "tiny-lm", "swa"), ("tiny-lm", "c4_state", "tiny-lm", "c4_state"),
             ("tiny-lm", "c4", "tiny-packed", "c4"), ("v32-packed", "kv", "v32-lm", "kv"),
             ("flash-lm", "c128", "flash-packed", "c128")]


@pytest.mark.parametrize("pair", PAGE_COPY, ids=lambda p: "-".join(p))
def test_copy_pages(impl, pair):
    sname, pool, dname, _ = pair
    s_shape, _, sa = _addressing((sname, pool, None))
    d_shape, _, da = _addressing((dname, pool, None))
    if sa.page_bytes != da.page_bytes:
        sa = sa._replace(page_bytes=min(sa.page_bytes, da.page_bytes))
        da = da._replace(page_bytes=sa.page_bytes)
    if "packed" in sname or "packed" in dname:  # packed layers may share slots: one group
        lay = _layouts()[sname if "packed" in sname else dname]
        g = lay.pool(pool).groups[0][:2]
        sa, da = sa._replace(row_base=tuple(sa.row_base[i] for i in g),
                             col_base=tuple(sa.col_base[i] for i in g)), da._replace(
            row_base=tuple(da.row_base[i] for i in g), col_base=tuple(da.col_base[i] for i in g))
    rng = np.random.default_rng(5)
    src, dst = _rand(rng, s_shape), _rand(rng, d_shape)
    sp = np.array([1, 0, -1, sa.num_pages, 2 % sa.num_pages, 1], np.int32)
    dp = np.array([0, da.num_pages - 1, 1, 1, -1, 0], np.int32)  # dup dst 0 with same src page
    out = impl.copy_pages(src, dst, sp, dp, sa, da)
    expect = np_copy_pages(src, dst, sp, dp, sa, da)
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(np.asarray(reference.copy_pages(
        jnp.asarray(src), jnp.asarray(dst), jnp.asarray(sp), jnp.asarray(dp), sa, da)), expect)


@pytest.mark.parametrize("pair,page_words", [
    (PAGE_COPY[0], 1024), (PAGE_COPY[0], 8192),  # 2,376-word pages: G 2 x NCH 5; G 8 x NCH 5
    (PAGE_COPY[4], 64), (PAGE_COPY[4], 1024), (PAGE_COPY[4], 4096),  # C128: NCH 4; G 4; G 16
], ids=lambda x: "-".join(x[:2]) if isinstance(x, tuple) else str(x))
def test_copy_pages_launch_geometry(impl, pair, page_words, monkeypatch):
    """Page copies under other per-program budgets: several pages per program (G > 1, a last
    group only partly filled), several chunks per page (NCH > 1), both, with invalid and
    duplicate entries; every byte checked against the model."""
    if isinstance(impl, JaxImpl) and impl.mod is not _triton_jax_mod():
        pytest.skip("launch geometry is the Triton kernels' (torch and jax-triton)")
    monkeypatch.setitem(triton_kernels.TUNE, "page_words", page_words)
    sname, pool, dname, _ = pair
    s_shape, _, sa = _addressing((sname, pool, None))
    d_shape, _, da = _addressing((dname, pool, None))
    if "packed" in dname:
        g = _layouts()[dname].pool(pool).groups[0][:2]
        sa = sa._replace(row_base=tuple(sa.row_base[i] for i in g),
                         col_base=tuple(sa.col_base[i] for i in g))
        da = da._replace(row_base=tuple(da.row_base[i] for i in g),
                         col_base=tuple(da.col_base[i] for i in g))
    rng = np.random.default_rng(page_words)
    src, dst = _rand(rng, s_shape), _rand(rng, d_shape)
    n = min(sa.num_pages, da.num_pages)
    sp = np.concatenate([rng.permutation(sa.num_pages)[:n], [-1, sa.num_pages, 0]])
    dp = np.concatenate([rng.permutation(da.num_pages)[:n], [0, 1, da.num_pages + 5]])
    perm = rng.permutation(len(sp))
    sp, dp = sp[perm].astype(np.int32), dp[perm].astype(np.int32)
    meta = triton_kernels.page_params(sa, da, s_shape[1], d_shape[1])
    out = impl.copy_pages(src, dst, sp, dp, sa, da)
    np.testing.assert_array_equal(out, np_copy_pages(src, dst, sp, dp, sa, da),
                                  err_msg=f"geometry {meta}")


def _triton_jax_mod():
    from jaxkv.kernels import triton_jax
    return triton_jax


@pytest.mark.parametrize("budget", [1, 64, 1024, 4096])
def test_page_geometry_covers_every_word(budget):
    """(BLOCK, NCH, G): chunks cover the page exactly once, BLOCK a power of two, <= 20 %
    padding unless BLOCK hit its floor, G x BLOCK = the budget."""
    for words in [1, 2, 3, 7, 100, 216, 1024, 1056, 4680, 5248, 18720]:
        block, nch, g = triton_kernels.page_geometry(words, budget)
        assert block & (block - 1) == 0 and g >= 1
        assert (nch - 1) * block < words <= nch * block
        assert words >= 0.8 * nch * block or block <= 32 or block == triton_kernels._pow2(words)
        assert g * block == max(block, triton_kernels._pow2(budget))
    assert triton_kernels.page_geometry(216, 1024) == (256, 1, 4)      # C128: 4 pages a program
    assert triton_kernels.page_geometry(18720, 1024) == (1024, 19, 1)  # SWA: as before


TOKEN_COPY = [("tiny-lm", "swa", "tiny-packed", "swa"), ("tiny-packed", "c4", "tiny-lm", "c4"),
              ("tiny-lm", "c4_indexer", "tiny-lm", "c4_indexer"),
              ("tiny-lm", "c128_state", "tiny-packed", "c128_state"),
              ("v32-lm", "kv", "v32-packed", "kv"), ("flash-lm", "swa", "flash-packed", "swa")]


@pytest.mark.parametrize("pair", TOKEN_COPY, ids=lambda p: "-".join(p))
def test_copy_tokens(impl, pair):
    sname, pool, dname, _ = pair
    packed = _layouts()[sname if "packed" in sname else dname]
    g = packed.pool(pool).groups[0][:3]
    s_shape, sa, _ = _addressing((sname, pool, g))
    d_shape, da, _ = _addressing((dname, pool, g))
    rng = np.random.default_rng(9)
    src, dst = _rand(rng, s_shape), _rand(rng, d_shape)
    sl = _locs(rng, sa.capacity, 8)
    dl = _locs(rng, da.capacity, len(sl) + 8, unique=True)[:len(sl)]
    out = impl.copy_tokens(src, dst, sl, dl, sa, da)
    expect = np_copy_tokens(src, dst, sl, dl, sa, da)
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(np.asarray(reference.copy_tokens(
        jnp.asarray(src), jnp.asarray(dst), jnp.asarray(sl), jnp.asarray(dl), sa, da)), expect)


# ---------------------------------------------------------------------------------------------
# The compiled kernels (sm_90 PTX, compiled on this machine without a GPU)

_SIGS = {  # argument types of the non-constexpr parameters, in order
    "gather_tokens": ["*u8", "*i32", "*i32", "*i32", "i32", "*u8", "*u8"],
    "scatter_tokens": ["*u8", "*i32", "*i32", "*i32", "*u8", "*u8", "i32", "*u8"],
    "copy_tokens": ["*u8", "*i32", "*i32", "*i32", "*i32", "*i32", "*i32", "i32", "*u8", "*u8"],
    "copy_pages": ["*u8", "*i32", "*i32", "*i32", "*i32", "*i32", "*i32", "i32", "*u8", "*u8"],
}


def _ptx(name, meta, num_warps, *, scalar_div16):
    """PTX of kernel ``name`` for an H100.  Pointers are 16-B aligned (torch and jax-triton both
    specialise on that); ``scalar_div16``: the int scalar (N / P) carries Triton's
    divisible-by-16 specialisation (torch launches with such a value) or not (jax-triton)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = triton_kernels.jit_kernel(name)
    if not hasattr(fn, "arg_names"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    types = _SIGS[name]
    sig = {fn.arg_names[i]: t for i, t in enumerate(types)}
    sig.update({k: "constexpr" for k in meta})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types)
             if t.startswith("*") or scalar_div16}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in meta.items()})
    try:
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": 1})
    except Exception as e:  # pragma: no cover - a triton build without the CUDA backend
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    return c.asm["ptx"]


def _mem_ops(ptx):
    import re
    return set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("pool", ["swa", "c4", "c128"])
def test_compiled_kernels_move_16_byte_vectors(pool):
    """Every kernel compiles for sm_90 (the CPU suite runs them interpreted only), and with
    the alignment hints the page-side value windows and whole pages move as 16-B vectors
    (v2.b64): without them the page side was 8-B b64 accesses (loaded row/column bases carry
    no alignment for the compiler).  The torch-like and jax-triton-like compilations (N / P
    with or without divisibility) do the same data accesses."""
    geo = jaxkv.dsv4_flash()
    lay = jaxkv.layer_major(geo, {p.name: (64 if p.name == pool else 2) for p in geo.pools()})
    b, a = jaxkv.token_addressing(lay, pool)
    _, pa = jaxkv.page_addressing(lay, pool)
    C = lay.buffer_shapes[b][1]
    page = dict(triton_kernels.page_params(pa, pa, C, C), ZERO=0)
    tok = triton_kernels.token_params(a, C)
    ctok = triton_kernels.copy_tokens_meta(a, a, C, C)
    nw = triton_kernels.num_warps_for(tok["BT"] * tok["VWP"])
    for div in (True, False):
        ops = _mem_ops(_ptx("copy_pages", page, triton_kernels.PAGE_WARPS, scalar_div16=div))
        assert {"ld.global.v2.b64", "st.global.v2.b64"} <= ops, ops
        assert not ops & {"ld.global.b64", "st.global.b64"}, ops
        for name, meta in (("gather_tokens", tok), ("scatter_tokens", tok),
                           ("copy_tokens", ctok)):
            ops = _mem_ops(_ptx(name, meta, nw, scalar_div16=div))
            assert {"ld.global.v2.b64", "st.global.v2.b64"} <= ops, (name, ops)
            if name != "copy_tokens":  # (its 8-B scale slot is one b64 word)
                assert not ops & {"ld.global.b64", "st.global.b64"}, (name, ops)


# ---------------------------------------------------------------------------------------------
# Properties of the reference against the model (fast; hypothesis)

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # the GPU machine has no hypothesis: the property test is CPU-only anyway
    given = None


def _reference_matches_model(tpp, V, S, L, seed):
    rng = np.random.default_rng(seed)
    pages = 3
    pb = tpp * (V + S) + 5
    a = TokenAddressing(row_base=tuple(l * pages for l in range(L)), col_base=(0,) * L,
                        row_step=1, tpp=tpp, num_pages=pages, value_bytes=V, scale_stride=S,
                        scale_bytes=max(S - 1, 0))
    buf = _rand(rng, (L * pages, pb))
    locs = _locs(rng, a.capacity, 5)
    v, s = reference.gather_tokens(jnp.asarray(buf), jnp.asarray(locs), a)
    ev, es = np_gather(buf, locs, a)
    np.testing.assert_array_equal(np.asarray(v), ev)
    np.testing.assert_array_equal(np.asarray(s), es)
    nv = _rand(rng, ev.shape)
    ns = _rand(rng, es.shape)
    nv, ns = _dedup_data(locs, nv, ns)
    out = reference.scatter_tokens(jnp.asarray(buf), jnp.asarray(locs), jnp.asarray(nv),
                                   jnp.asarray(ns), a)
    np.testing.assert_array_equal(np.asarray(out), np_scatter(buf, locs, nv, ns, a))


# ---------------------------------------------------------------------------------------------
# Surface


def test_dispatch_picks_and_rejects():
    assert dispatch._resolve("pallas", "gather_tokens") == "pallas"
    if jax.default_backend() == "cpu":
        assert dispatch._resolve("auto", "scatter_tokens") == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch._resolve("cuda", "gather_tokens")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU behaviour")
def test_triton_jax_needs_gpu():
    from jaxkv.kernels import triton_jax
    _, a, _ = _addressing(CASES[0])
    with pytest.raises(RuntimeError, match="needs a GPU"):
        triton_jax.gather_tokens(jnp.zeros((9, 9), jnp.uint8), jnp.zeros((1,), jnp.int32), a)


def test_torch_wrappers_validate():
    shape, a, pa = _addressing(CASES[0])
    buf = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="locs must be a 1-D torch.int32"):
        triton_kernels.gather_tokens_torch(buf, torch.zeros(3, dtype=torch.int64), a)
    with pytest.raises(ValueError, match="buf must be a 2-D torch.uint8"):
        triton_kernels.gather_tokens_torch(buf.float(), torch.zeros(3, dtype=torch.int32), a)
    with pytest.raises(ValueError, match="too small"):
        triton_kernels.gather_tokens_torch(buf[:1], torch.zeros(3, dtype=torch.int32), a)
    with pytest.raises(ValueError, match="value must be"):
        triton_kernels.scatter_tokens_torch(buf, torch.zeros(2, dtype=torch.int32),
                                            torch.zeros((1, 2, 3), dtype=torch.uint8),
                                            torch.zeros((1, 2, 3), dtype=torch.uint8), a)
    with pytest.raises(ValueError, match="same length"):
        triton_kernels.copy_pages_torch(buf, buf.clone(), torch.zeros(2, dtype=torch.int32),
                                        torch.zeros(3, dtype=torch.int32), pa, pa)
    with pytest.raises(ValueError, match="page sizes differ"):
        triton_kernels.copy_pages_torch(buf, buf.clone(), torch.zeros(2, dtype=torch.int32),
                                        torch.zeros(2, dtype=torch.int32), pa,
                                        pa._replace(page_bytes=pa.page_bytes - 1))


def test_public_accessors_route_through_impls():
    """jaxkv.set_tokens / get_tokens give identical bytes with every CPU implementation."""
    geo = jaxkv.tiny(5)
    lay = jaxkv.layer_major(geo, 3)
    cache = jaxkv.init_cache(geo, lay)
    rng = np.random.default_rng(1)
    cap = lay.pool("c128").capacity
    locs = jnp.asarray(rng.choice(cap, 3, replace=False).astype(np.int32))
    toks = jaxkv.formats.random_tokens(geo.mla, jax.random.key(0), (2, 3))
    outs = []
    for impl_name in ("reference", "pallas"):
        c = jaxkv.set_tokens(cache, "c128", None, locs, toks, impl=impl_name)
        got = jaxkv.get_tokens(c, "c128", None, locs, impl=impl_name)
        outs.append([np.asarray(b) for b in c.buffers])
        for x, y in zip(got, toks):
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                          np.asarray(y).view(np.uint8))
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)


if given is not None:
    test_reference_matches_model = settings(max_examples=10, deadline=None)(given(
        tpp=st.sampled_from([1, 2, 4]), V=st.sampled_from([3, 8, 16]), S=st.sampled_from([0, 4]),
        L=st.integers(1, 3), seed=st.integers(0, 2**16))(_reference_matches_model))


# Last in the file: a failure here (a 32-bit offset overflow) may poison the CUDA context.
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton_torch_cuda", "triton_jax", "pallas"])
def test_beyond_2gib_gpu(name):
    """Tokens past byte 2**31 of a 3.4 GB buffer land exactly where the model says."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rows, pb = 2_000_000, 1728  # C128 pages (2 tokens / page): 3.46 GB
    a = TokenAddressing(row_base=(0, rows // 2), col_base=(0, 0), row_step=1, tpp=2,
                        num_pages=rows // 2, value_bytes=576, scale_stride=8, scale_bytes=7)
    rng = np.random.default_rng(0)
    cap = a.capacity
    locs = np.array([cap - 1, cap - 2, 5, cap - 4, -1, cap], np.int32)
    v = _rand(rng, (2, len(locs), 576))
    s = _rand(rng, (2, len(locs), 7))
    impl = _impl(name)
    if name == "triton_torch_cuda":
        buf = torch.zeros((rows, pb), dtype=torch.uint8, device="cuda")
        triton_kernels.scatter_tokens_torch(buf, torch.from_numpy(locs).cuda(),
                                            torch.from_numpy(v).cuda(), torch.from_numpy(s).cuda(),
                                            a)
        gv, gs = (x.cpu().numpy() for x in triton_kernels.gather_tokens_torch(
            buf, torch.from_numpy(locs).cuda(), a))
        tail = buf[-1].cpu().numpy()
    elif name == "pallas":  # 32-bit offsets in the Pallas Triton lowering: refused, not wrong
        with pytest.raises(ValueError, match="below 2 GiB"):
            impl.mod.scatter_tokens(jnp.zeros((rows, pb), jnp.uint8), jnp.asarray(locs),
                                    jnp.asarray(v), jnp.asarray(s), a)
        return
    else:
        buf = impl.mod.scatter_tokens(jnp.zeros((rows, pb), jnp.uint8), jnp.asarray(locs),
                                      jnp.asarray(v), jnp.asarray(s), a)
        gv, gs = (np.asarray(x) for x in impl.mod.gather_tokens(buf, jnp.asarray(locs), a))
        tail = np.asarray(buf[-1])
    ok = (locs >= 0) & (locs < cap)
    np.testing.assert_array_equal(gv[:, ok], v[:, ok])
    np.testing.assert_array_equal(gs[:, ok], s[:, ok])
    assert not gv[:, ~ok].any() and not gs[:, ~ok].any()
    np.testing.assert_array_equal(tail[576:1152], v[1, 0])  # loc cap-1 = page -1, token 1


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    want = "triton" if dispatch._available("triton") else "pallas"
    for op in ("gather_tokens", "scatter_tokens", "copy_pages", "copy_tokens"):
        assert dispatch._resolve("auto", op) == want


def test_auto_follows_the_arrays_platform(monkeypatch):
    """impl='auto' picks by the platform of the arrays it is given, not only JAX's default
    backend: a CPU cache on a GPU machine (default backend 'gpu') gets the CPU choice (the GPU
    machine's DRAM transfer benchmark failed with 'triton_kernel_call not found for platform
    cpu' before)."""
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_available", lambda name: True)
    cpu_array = jnp.zeros((4, 8), jnp.uint8)
    assert dispatch._resolve("auto", "gather_tokens") == "triton"  # nothing concrete: default
    assert dispatch._resolve("auto", "gather_tokens", cpu_array) == "reference"
    assert dispatch._resolve("auto", "copy_pages", cpu_array, cpu_array) == "reference"
    seen = []
    jax.jit(lambda b: seen.append(dispatch._resolve("auto", "gather_tokens", b)) or b)(cpu_array)
    assert seen == ["triton"]  # under jit the operands are tracers: the default backend decides
