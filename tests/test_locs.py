"""jaxkv.locs against a plain-Python reimplementation of SPEC §4 and §9, on random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv import locs as L

SETTINGS = settings(max_examples=60, deadline=None)


def ints(lo, hi, n):
    return st.lists(st.integers(lo, hi), min_size=n, max_size=n)  # fixed shape: one compile


# ---- plain-Python references (written from SPEC text) ---------------------------------------


def ref_swa(table, f):
    if f < 0 or f >= len(table):
        s = table[-1]  # SGLang: -1 indexes the trailing -1
    else:
        s = table[f]
    return (s, True) if s > 0 else (-1, False)


def ref_compressed(f, r):
    if f >= 0 and (f + 1) % r == 0:
        return f // r, True
    return -1, False


def ref_dcp_local(p, n, i, b):
    o = p % (b * n)
    owner = (o // i) % n
    local = (o // (i * n)) * i + o % i
    return owner, (p // (b * n)) * b + local


def ref_local_len(length, n, i, r):
    base = (length // i // n) * i
    return base + min(max(length - base * n - r * i, 0), i)


# ---- tests ----------------------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from([2, 7, 64]), st.data())
def test_swa_locs(F, data):
    body = data.draw(st.lists(st.integers(0, 10_000), min_size=F - 1, max_size=F - 1))
    table = body + [-1]
    full = data.draw(ints(-3, F + 5, 40))
    s, v = jax.jit(L.swa_locs)(jnp.asarray(table, jnp.int32), jnp.asarray(full, jnp.int32))
    exp = [ref_swa(table, f) for f in full]
    assert s.dtype == jnp.int32 and v.dtype == jnp.bool_
    assert s.tolist() == [e[0] for e in exp]
    assert v.tolist() == [e[1] for e in exp]


@SETTINGS
@given(st.sampled_from([1, 2, 4, 128]), ints(-5, 2**20, 50))
def test_compressed_locs(r, full):
    c, v = jax.jit(L.compressed_locs, static_argnums=1)(jnp.asarray(full, jnp.int32), r)
    exp = [ref_compressed(f, r) for f in full]
    assert c.tolist() == [e[0] for e in exp] and v.tolist() == [e[1] for e in exp]
    # No two valid full locs map to one compressed loc (no aliasing).
    good = [x for x, ok in zip(c.tolist(), v.tolist()) if ok]
    assert len(set(good)) == len({f for f, (x, ok) in zip(full, exp) if ok})


def test_compressed_pages_line_up():
    f = jnp.arange(0, 256 * 5, dtype=jnp.int32)
    c4, v4 = L.compressed_locs(f, 4)
    c128, v128 = L.compressed_locs(f, 128)
    assert (np.asarray(c4)[np.asarray(v4)] // 64 == np.asarray(f)[np.asarray(v4)] // 256).all()
    assert (np.asarray(c128)[np.asarray(v128)] // 2
            == np.asarray(f)[np.asarray(v128)] // 256).all()


@SETTINGS
@given(st.sampled_from([(8, 256), (128, 256), (2, 8), (8, 64)]), ints(-2, 100_000, 50))
def test_state_rows(cfg, swa):
    ring, page = cfg
    out = L.state_rows(jnp.asarray(swa, jnp.int32), ring, page).tolist()
    assert out == [(s // page) * ring + s % ring if s >= 0 else -1 for s in swa]


@SETTINGS
@given(st.data())
def test_request_state_rows(data):
    n = 30
    slots = data.draw(st.lists(st.integers(-2, 50), min_size=n, max_size=n))
    pos = data.draw(st.lists(st.integers(-2, 10_000), min_size=n, max_size=n))
    out = L.request_state_rows(jnp.asarray(slots), jnp.asarray(pos), 128).tolist()
    assert out == [r * 128 + p % 128 if r >= 0 and p >= 0 else -1 for r, p in zip(slots, pos)]


@SETTINGS
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 64]), st.integers(1, 4),
       ints(-1, 5000, 60))
def test_dcp_placement(n, i, bmul, pos):
    b = i * bmul
    p = jnp.asarray(pos, jnp.int32)
    owner = L.dcp_owner(p, n, i).tolist()
    local = L.dcp_local_index(p, n, i, b).tolist()
    for x, o, l in zip(pos, owner, local):
        if x < 0:
            assert o == -1 and l == -1
        else:
            assert (o, l) == ref_dcp_local(x, n, i, b)


@pytest.mark.parametrize("n,i,b", [(1, 1, 1), (2, 1, 64), (4, 2, 8), (8, 64, 64), (3, 4, 8)])
def test_dcp_bijection_and_local_len(n, i, b):
    """(owner, local) is a bijection, each rank's locals are dense, local_len counts them."""
    T = 3 * b * n + 7
    p = jnp.arange(T, dtype=jnp.int32)
    owner = np.asarray(L.dcp_owner(p, n, i))
    local = np.asarray(L.dcp_local_index(p, n, i, b))
    assert len(set(zip(owner.tolist(), local.tolist()))) == T
    for length in [0, 1, i, i * n - 1, T // 2, T]:
        tot = 0
        for r in range(n):
            got = int(L.dcp_local_len(jnp.asarray([length]), n, i, r)[0])
            held = local[:length][owner[:length] == r]
            assert got == ref_local_len(length, n, i, r) == len(held)
            assert sorted(held.tolist()) == list(range(got))  # dense prefix 0..got-1
            tot += got
        assert tot == length


@SETTINGS
@given(st.sampled_from([1, 2, 4, 8]), ints(-3, 10**6, 50))
def test_widened(n, loc):
    w = jnp.asarray(loc, jnp.int32)
    assert L.dcp_owner_widened(w, n).tolist() == [x % n if x >= 0 else -1 for x in loc]
    assert L.dcp_physical_widened(w, n).tolist() == [x // n if x >= 0 else -1 for x in loc]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        L.compressed_locs(jnp.arange(4), 0)
    with pytest.raises(ValueError, match="block"):
        L.dcp_local_index(jnp.arange(4), 2, 4, 6)
    with pytest.raises(ValueError, match="rank"):
        L.dcp_local_len(jnp.arange(4), 2, 1, 2)
    with pytest.raises(ValueError, match="integer"):
        L.swa_locs(jnp.zeros(4, jnp.int32), jnp.zeros(3, jnp.float32))
    with pytest.raises(ValueError, match="1-D"):
        L.swa_locs(jnp.zeros((2, 2), jnp.int32), jnp.zeros(3, jnp.int32))
