"""jaxkv.offload: retract -> resume round trips, bit-exact, checked against a numpy byte model.

Every cache starts with every byte random ("poison"), so a byte the offload should not touch is
checkable: the expected buffers are computed in numpy from SPEC §2's page layout (value part at
``t*V``, scale part at ``tpp*V + t*S``, only the written scale bytes) and compared whole.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jaxkv
from jaxkv import formats as F
from jaxkv import offload as O

GEO = jaxkv.tiny()  # 5 layers: swa x5, c4 x2, c128 x2; page 32; C4 ring 8, C128 ring 16


def layouts():
    return {
        "layer_major": jaxkv.layer_major(GEO, {"swa": 6, "c4": 12, "c128": 24, "c4_indexer": 12,
                                               "c4_state": 40, "c4_indexer_state": 40,
                                               "c128_state": 40}),
        "packed": jaxkv.packed(GEO, 40),
    }


LAYOUTS = layouts()


def random_cache(layout, seed=0):
    rng = np.random.default_rng(seed)
    bufs = tuple(jnp.asarray(rng.integers(0, 256, s, dtype=np.uint8))
                 for s in layout.buffer_shapes)
    return jaxkv.Cache(bufs, layout)


def keys_of(layout):
    return [(p.name, g) for p in layout.pools for g in range(len(p.groups))]


# ------------------------------------------------------------------------------------------------
# numpy model of the bytes


def token_ranges(layout, pool, layer, loc):
    """[(buffer, row, col_start, col_stop)] of the bytes a token owns (value + written scale)."""
    p = layout.pool(pool)
    fmt, tpp = p.spec.fmt, p.tokens_per_page
    pl = p.placements[layer]
    page, t = divmod(int(loc), tpp)
    row = pl.row_base + page * pl.row_step
    out = [(pl.buffer, row, pl.col + t * fmt.value_bytes, pl.col + (t + 1) * fmt.value_bytes)]
    if fmt.scale_bytes:
        s0 = pl.col + tpp * fmt.value_bytes + t * fmt.scale_stride
        out.append((pl.buffer, row, s0, s0 + fmt.scale_bytes))
    return out


def np_token(bufs, layout, pool, layer, loc):
    return np.concatenate([bufs[b][r, c0:c1] for b, r, c0, c1 in
                           token_ranges(layout, pool, layer, loc)])


def np_put(bufs, layout, pool, layer, loc, data):
    i = 0
    for b, r, c0, c1 in token_ranges(layout, pool, layer, loc):
        bufs[b][r, c0:c1] = data[i:i + c1 - c0]
        i += c1 - c0


def np_move(src_bufs, dst_bufs, layout, key, src_locs, dst_locs):
    """Expected effect of save(src_locs) + load(dst_locs) on numpy buffers (in place on dst)."""
    pool, g = key
    for layer in layout.pool(pool).groups[g]:
        for s, d in zip(src_locs, dst_locs):
            if d < 0:
                continue
            tok = (np_token(src_bufs, layout, pool, layer, s) if s >= 0 else
                   np.zeros(sum(c1 - c0 for _, _, c0, c1 in token_ranges(layout, pool, layer, 0)),
                            np.uint8))
            np_put(dst_bufs, layout, pool, layer, d, tok)


def assert_bytes_equal(cache, expected):
    for i, (a, b) in enumerate(zip(cache.buffers, expected)):
        a = np.asarray(a)
        diff = np.argwhere(a != b)
        assert diff.size == 0, f"buffer {i}: {len(diff)} bytes differ, first at {diff[:3].tolist()}"


def np_bufs(cache):
    return [np.array(b) for b in cache.buffers]


class Pages:
    """A toy page allocator for the location-level tests: in the packed layout every (pool, group)
    takes whole blocks from one shared free list (a block belongs to one group at a time); in the
    layer-major layout each pool has its own pages.  Page 0 and sentinel rows are never handed
    out."""

    def __init__(self, layout, rng):
        self.layout, self.rng = layout, rng
        if layout.kind == "packed":
            self.free = {None: list(range(1, layout.pools[0].num_pages))}
        else:
            self.free = {}
            for p in layout.pools:
                first = 0 if p.spec.kind == "state" else 1  # layer-major state rows: sentinel last
                last = p.num_pages - (1 if p.sentinel is not None else 0)
                self.free[p.name] = list(range(first, last))

    def _list(self, pool):
        return self.free[None if self.layout.kind == "packed" else pool]

    def take(self, key, n):
        """n distinct random locations of (pool, group) in freshly taken pages; None if full."""
        p = self.layout.pool(key[0])
        need = -(-n // p.tokens_per_page)
        free = self._list(key[0])
        if need > len(free):
            return None
        pick = [free.pop(int(self.rng.integers(len(free)))) for _ in range(need)]
        slots = np.concatenate([np.arange(pg * p.tokens_per_page, (pg + 1) * p.tokens_per_page)
                                for pg in pick]) if pick else np.zeros(0, np.int64)
        locs = self.rng.permutation(slots)[:n].astype(np.int32)
        return locs, pick

    def give_back(self, key, pages):
        self._list(key[0]).extend(pages)


# ------------------------------------------------------------------------------------------------
# Location level


@pytest.mark.parametrize("kind", ["layer_major", "packed"])
@pytest.mark.parametrize("pool", [p.name for p in GEO.pools()])
def test_round_trip_per_pool(kind, pool):
    layout = LAYOUTS[kind]
    cache = random_cache(layout, seed=1)
    rng = np.random.default_rng(2)
    pages = Pages(layout, rng)
    before = np_bufs(cache)
    expected = np_bufs(cache)
    src, dst = {}, {}
    for key in keys_of(layout):
        if key[0] != pool:
            continue
        n = int(rng.integers(3, 20))
        src[key], _ = pages.take(key, n)
        dst[key], _ = pages.take(key, n)
    copy = O.save_locs(cache, src, budget=O.HostBudget(1 << 30))
    assert copy.host_kind == O.host_kinds()[0]
    # the copy's bytes are the tokens' bytes, layer by layer
    for key, locs in src.items():
        e = copy.entry(*key)
        got = copy.pool_bytes(*key)
        for li, layer in enumerate(e.layers):
            for j, loc in enumerate(locs):
                np.testing.assert_array_equal(got[li, j], np_token(before, layout, pool, layer, loc))
        np_move(before, expected, layout, key, locs, dst[key])
    out = O.load_locs(cache, copy, dst)
    assert_bytes_equal(out, expected)
    assert_bytes_equal(cache, before)  # the input cache is unchanged (no donation)


@pytest.mark.parametrize("kind,host_kind,transfer", [
    ("layer_major", "pinned_host", "device_put"), ("packed", "pinned_host", "device_put"),
    ("layer_major", "pinned_host", "jit"), ("packed", "unpinned_host", "device_put"),
    ("layer_major", "numpy", "device_put")])
def test_whole_cache_round_trip(kind, host_kind, transfer):
    """Every pool group at once, padding (-1) included, into different new locations; every host
    memory kind (pinned, unpinned, the NumPy fallback) and both transfer paths."""
    layout = LAYOUTS[kind]
    cache = random_cache(layout, seed=3)
    rng = np.random.default_rng(4)
    pages = Pages(layout, rng)
    before, expected = np_bufs(cache), np_bufs(cache)
    src, dst = {}, {}
    for key in keys_of(layout):
        n = int(rng.integers(1, 12))
        s, _ = pages.take(key, n)
        d, _ = pages.take(key, n)
        s[rng.random(n) < 0.2] = -1  # saved as zeros
        d[rng.random(n) < 0.2] = -1  # skipped on load
        src[key], dst[key] = s, d
        np_move(before, expected, layout, key, s, d)
    budget = O.HostBudget(1 << 30)
    copy = O.save_locs(cache, src, budget=budget, host_kind=host_kind, transfer=transfer)
    assert copy.host_kind == host_kind
    assert budget.used == copy.nbytes == sum(e.nbytes for e in copy.entries)
    assert copy.nbytes >= sum(len(e.layers) * e.count * e.item_bytes for e in copy.entries)
    if host_kind != "numpy":
        assert copy.data.sharding.memory_kind == host_kind
    else:
        assert isinstance(copy.data, np.ndarray)
    out = O.load_locs(cache, copy, dst, free=True)
    assert copy.freed and budget.used == 0
    assert_bytes_equal(out, expected)


def test_host_copy_is_exact_tokens_and_state_rows():
    """The saved bytes decode to the very tokens / rows written (independent of the byte model)."""
    layout = LAYOUTS["layer_major"]
    cache = jaxkv.init_cache(GEO, layout)
    key = jax.random.key(5)
    locs = jnp.asarray([33, 40, 70, 95], jnp.int32)
    toks = F.random_tokens(GEO.mla, key, (GEO.pool("c4").num_layers, 4))
    cache = jaxkv.set_tokens(cache, "c4", None, locs, toks)
    rows = jax.random.normal(key, (2, 3, GEO.c128_state_width), jnp.float32)
    rlocs = jnp.asarray([3, 17, 29], jnp.int32)
    cache = jaxkv.set_rows(cache, "c128_state", None, rlocs, rows)
    copy = O.save_locs(cache, {"c4": locs, "c128_state": rlocs}, budget=O.HostBudget(1 << 30))
    new = jnp.asarray([88, 64, 72, 95], jnp.int32)
    newr = jnp.asarray([5, 6, 7], jnp.int32)
    out = O.load_locs(jaxkv.init_cache(GEO, layout), copy, {"c4": new, "c128_state": newr})
    got = jaxkv.get_tokens(out, "c4", None, new)
    for a, b in zip(got, toks):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(jaxkv.get_rows(out, "c128_state", None, newr)),
                                  np.asarray(rows))


def test_sources_restore_deduplicated_rows():
    layout = LAYOUTS["layer_major"]
    cache = random_cache(layout, seed=6)
    before, expected = np_bufs(cache), np_bufs(cache)
    src = np.array([3, 9, 12], np.int32)
    copy = O.save_locs(cache, {"c4_state": src}, budget=O.HostBudget(1 << 30))
    dst = np.array([20, 21, 22, 23, -1], np.int32)
    pick = np.array([2, 0, 0, 1, 1], np.int32)  # duplicates of one saved row are legal
    np_move(before, expected, layout, ("c4_state", 0), src[pick], dst)
    out = O.load_locs(cache, copy, {"c4_state": dst}, sources={"c4_state": pick})
    assert_bytes_equal(out, expected)


def test_empty_save_short_circuits():
    layout = LAYOUTS["packed"]
    cache = random_cache(layout)
    budget = O.HostBudget(0)
    h = O.start_save_locs(cache, {("swa", 0): np.zeros(0, np.int32)}, budget=budget)
    assert h.done()
    copy = h.wait()
    assert copy.entries == () and copy.nbytes == 0 and copy.data is None and budget.used == 0
    assert O.load_locs(cache, copy, {}) is cache


def test_budget_exceeded_changes_nothing():
    layout = LAYOUTS["layer_major"]
    cache = random_cache(layout, seed=7)
    before = np_bufs(cache)
    locs = {"swa": np.arange(32, 64, dtype=np.int32), "c4": np.arange(8, 16, dtype=np.int32)}
    need = O.save_locs(cache, locs, budget=O.HostBudget(1 << 30)).nbytes
    budget = O.HostBudget(need + 100)
    keep = O.save_locs(cache, {"c128": np.array([2, 3], np.int32)}, budget=budget)
    used = budget.used
    assert used > 100
    with pytest.raises(O.HostBudgetExceeded, match="host budget"):
        O.start_save_locs(cache, locs, budget=budget)
    assert budget.used == used
    assert_bytes_equal(cache, before)
    keep.free()
    keep.free()  # idempotent
    assert budget.used == 0
    with pytest.raises(ValueError, match="freed"):
        _ = keep.data
    with pytest.raises(ValueError, match="freed"):
        O.load_locs(cache, keep, {"c128": np.array([4, 5], np.int32)})
    ok = O.save_locs(cache, locs, budget=budget)  # fits once the other copy is freed
    assert budget.used == ok.nbytes == need


def test_default_budget_follows_xla_cap(monkeypatch):
    monkeypatch.setattr(O, "_DEFAULT_BUDGET", None)
    monkeypatch.setenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "0.5")
    assert O.default_budget().limit == 1 << 29
    monkeypatch.setattr(O, "_DEFAULT_BUDGET", None)
    monkeypatch.delenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")
    assert O.default_budget().limit == 64 << 30
    monkeypatch.setattr(O, "_DEFAULT_BUDGET", None)


def test_bad_arguments_raise_and_change_nothing():
    lm, pk = LAYOUTS["layer_major"], LAYOUTS["packed"]
    cache = random_cache(lm, seed=8)
    b = O.HostBudget(1 << 30)
    with pytest.raises(ValueError, match="unknown pool"):
        O.save_locs(cache, {"kv": np.array([1])}, budget=b)
    with pytest.raises(ValueError, match=r"outside \[0, 192\)"):
        O.save_locs(cache, {"swa": np.array([40, 192])}, budget=b)
    with pytest.raises(ValueError, match="1-D"):
        O.save_locs(cache, {"swa": np.zeros((2, 2), np.int32)}, budget=b)
    with pytest.raises(ValueError, match="integer"):
        O.save_locs(cache, {"swa": np.array([1.0])}, budget=b)
    assert b.used == 0
    copy = O.save_locs(cache, {"swa": np.array([40, 41]), "c4_state": np.array([1, 2])}, budget=b)
    with pytest.raises(ValueError, match="page 0"):
        O.load_locs(cache, copy, {"swa": np.array([64, 5])})
    with pytest.raises(ValueError, match="sentinel"):
        O.load_locs(cache, copy, {"c4_state": np.array([3, 39])})
    with pytest.raises(ValueError, match="saved 2"):
        O.load_locs(cache, copy, {"swa": np.array([64])})
    with pytest.raises(ValueError, match="does not hold"):
        O.load_locs(cache, copy, {"c4": np.array([9, 10])})
    with pytest.raises(ValueError, match="not a saved entry"):
        O.load_locs(cache, copy, {"swa": np.array([64])}, sources={"swa": np.array([2])})
    with pytest.raises(ValueError, match="different layout"):
        O.load_locs(random_cache(pk), copy, {})
    pcache = random_cache(pk)
    with pytest.raises(ValueError, match=r"\('swa', group\)"):
        O.save_locs(pcache, {"swa": np.array([9])}, budget=b)
    with pytest.raises(ValueError, match="group must be in"):
        O.save_locs(pcache, {("swa", 7): np.array([9])}, budget=b)
    with pytest.raises(ValueError, match="host_kind"):
        O.save_locs(cache, {"swa": np.array([40])}, budget=b, host_kind="disk")
    assert b.used == copy.nbytes


def test_save_is_async_and_survives_in_place_updates():
    """Start a save, then let the 'next decode step' overwrite those pages in place (donated):
    the host copy still holds the bytes as they were when the save started."""
    layout = LAYOUTS["layer_major"]
    cache = random_cache(layout, seed=9)
    before = np_bufs(cache)
    locs = np.arange(64, 96, dtype=np.int32)
    h = O.start_save_locs(cache, {"swa": locs}, budget=O.HostBudget(1 << 30))
    assert isinstance(h, O.SaveHandle)
    write = jax.jit(jaxkv.set_tokens, static_argnames=("pool", "layer"), donate_argnames="cache")
    toks = F.random_tokens(GEO.mla, jax.random.key(1), (GEO.num_layers, 32))
    write(cache, "swa", None, jnp.asarray(locs), toks)  # `cache` is donated from here on
    copy = h.wait()
    assert h.done()
    got = copy.pool_bytes("swa")
    for layer in range(GEO.num_layers):
        for j, loc in enumerate(locs):
            np.testing.assert_array_equal(got[layer, j], np_token(before, layout, "swa", layer, loc))


def test_bucket():
    for n in list(range(0, 300)) + [1000, 4097, 123457]:
        b = O.bucket(n)
        assert n <= b <= max(n, 16) * 9 // 8 + 1
    assert len({O.bucket(n) for n in range(1000, 2000)}) <= 10


# ------------------------------------------------------------------------------------------------
# Interleavings at the location level: admit / retract / resume over many requests


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["layer_major", "packed"]), seed=st.integers(0, 2**31 - 1),
       ops=st.lists(st.tuples(st.sampled_from(["admit", "admit", "retract", "resume"]),
                              st.integers(0, 7), st.sampled_from([2, 5, 9])),
                    min_size=4, max_size=14))
def test_interleavings_bit_exact(kind, seed, ops):
    layout = LAYOUTS[kind]
    rng = np.random.default_rng(seed)
    cache = random_cache(layout, seed=seed % 1000)
    model = np_bufs(cache)
    pages = Pages(layout, rng)
    live, retracted = {}, {}  # req -> {key: (locs, pages)} / req -> (HostCopy, counts)
    budget = O.HostBudget(1 << 30)
    keys = keys_of(layout)
    for op, req, n in ops:
        if op == "admit" and req not in live and req not in retracted:
            got = {}
            for key in keys:
                t = pages.take(key, n)
                if t is None:
                    break
                got[key] = t
            if len(got) < len(keys):  # out of pages: give back what was taken
                for key, (_, pg) in got.items():
                    pages.give_back(key, pg)
                continue
            for key, (locs, _) in got.items():  # the request writes its cache
                pool, g = key
                p = layout.pool(pool)
                for layer in p.groups[g]:
                    data = rng.integers(0, 256, (n, p.spec.fmt.value_bytes
                                                 + p.spec.fmt.scale_bytes), dtype=np.uint8)
                    for j, loc in enumerate(locs):
                        np_put(model, layout, pool, layer, loc, data[j])
            cache = jaxkv.Cache(tuple(jnp.asarray(b) for b in model), layout)
            live[req] = got
        elif op == "retract" and req in live:
            got = live.pop(req)
            copy = O.save_locs(cache, {k: v[0] for k, v in got.items()}, budget=budget)
            for key, (_, pg) in got.items():
                pages.give_back(key, pg)
            retracted[req] = (copy, {k: len(v[0]) for k, v in got.items()}, got)
        elif op == "resume" and req in retracted:
            copy, counts, old = retracted[req]
            got = {}
            for key in keys:
                t = pages.take(key, counts[key])
                if t is None:
                    break
                got[key] = t
            if len(got) < len(keys):
                for key, (_, pg) in got.items():
                    pages.give_back(key, pg)
                continue
            del retracted[req]
            # expected: the saved bytes (as they were at retract) land in the new locations
            saved = {k: copy.pool_bytes(*k) for k in keys}
            for key, (locs, _) in got.items():
                e = copy.entry(*key)
                for li, layer in enumerate(e.layers):
                    for j, loc in enumerate(locs):
                        np_put(model, layout, key[0], layer, loc, saved[key][li, j])
            cache = O.load_locs(cache, copy, {k: v[0] for k, v in got.items()}, free=True)
            live[req] = got
            del src_model
        assert_bytes_equal(cache, model)
    for copy, _, _ in retracted.values():
        copy.free()
    assert budget.used == 0


# ------------------------------------------------------------------------------------------------
# Request level (jaxkv.alloc)

from jaxkv import alloc as A  # noqa: E402

NSWA, NFULL, NREQ = 10, 16, 6
LM_REQ = jaxkv.layer_major(GEO, {"swa": NSWA, "c4": NFULL, "c128": NFULL, "c4_indexer": NFULL,
                                 "c4_state": NSWA * GEO.c4_ring + 1,
                                 "c4_indexer_state": NSWA * GEO.c4_ring + 1,
                                 "c128_state": max(NSWA, NREQ) * GEO.c128_ring + 1})


def np_request_locs(state, slot, scope):
    """Independent SPEC §4 translation of a request's positions 0..T-1 (plain numpy)."""
    cfg = state.cfg
    T = int(np.asarray(state.lengths)[slot])
    pt = np.asarray(state.page_table)[slot]
    table = np.asarray(state.full_to_swa)
    pos = np.arange(T)
    f = pt[pos // cfg.page_size] * cfg.page_size + pos % cfg.page_size
    s = table[f]
    sv = s > 0
    out = {"swa": (s, sv)}
    for name, r in (("c4", GEO.csa_ratio), ("c4_indexer", GEO.csa_ratio),
                    ("c128", GEO.hca_ratio)):
        out[name] = (f // r, (f + 1) % r == 0)
    for name, ring in (("c4_state", GEO.c4_ring), ("c4_indexer_state", GEO.c4_ring),
                       ("c128_state", GEO.c128_ring)):
        out[name] = ((s // cfg.swa_page) * ring + s % ring, sv)
    if scope == "request":
        out["c128_state"] = (slot * GEO.c128_ring + pos % GEO.c128_ring, np.ones(T, bool))
    return out


def logical(bufs, layout, locs):
    """{pool: {position: bytes of every layer}} of a request (positions valid in each pool)."""
    out = {}
    for pool, (l, v) in locs.items():
        p = layout.pool(pool)
        out[pool] = {int(t): np.concatenate([np_token(bufs, layout, pool, layer, l[t])
                                             for layer in range(p.spec.num_layers)])
                     for t in np.nonzero(v)[0]}
    return out


def expected_after_load(before, layout, new, old, snap, *, reset_ring_of=None):
    """The buffers a load should leave: ``before`` with every saved position (valid in the old
    and the new locations) written at its new location; with ``reset_ring_of=slot`` the
    request-scoped C128 state ring of that slot first reset to the sentinel (``scope="request"``)."""
    expected = [x.copy() for x in before]
    if reset_ring_of is not None:
        for r in reset_ring_of * GEO.c128_ring + np.arange(GEO.c128_ring):
            for layer in range(GEO.pool("c128_state").num_layers):
                np_put(expected, layout, "c128_state", layer, r,
                       O._sentinel_bytes(GEO.c128_state_width))
    for pool, (l, v) in new.items():
        p = layout.pool(pool)
        for t in np.nonzero(v & old[pool][1])[0]:
            data = snap[pool][int(t)].reshape(p.spec.num_layers, -1)
            for layer in range(p.spec.num_layers):
                np_put(expected, layout, pool, layer, l[t], data[layer])
    return expected


def admit(state, n):
    state, slots, status = A.admit(state, jnp.asarray([n], jnp.int32))
    assert int(status[0]) == A.OK
    return state, int(slots[0])


@pytest.mark.parametrize("scope", ["page", "request"])
def test_request_retract_resume_bit_exact(scope):
    layout = LM_REQ
    cfg = A.config_from_layout(layout, NREQ, 120)
    state = A.init_state(cfg)
    state, a = admit(state, 75)
    state, b = admit(state, 40)
    cache = random_cache(layout, seed=11)
    old = np_request_locs(state, a, scope)
    snap = logical(np_bufs(cache), layout, old)
    budget = O.HostBudget(1 << 30)
    h = O.start_save(cache, state, a, c128_state_scope=scope, budget=budget)
    copy, state = O.finish_save(h, state, a)
    assert int(np.asarray(state.lengths)[a]) == -1  # released only after the copy landed
    state, filler = admit(state, 70)  # takes the freed pages: the resume gets different ones
    state, a2 = admit(state, 75)
    new = np_request_locs(state, a2, scope)
    assert not np.array_equal(new["swa"][0], old["swa"][0])
    before = np_bufs(cache)
    out = O.load(cache, state, copy, a2, free=True)
    assert budget.used == 0
    # expected: the poisoned cache with the request's entries written at their new locations
    expected = expected_after_load(before, layout, new, old, snap,
                                   reset_ring_of=a2 if scope == "request" else None)
    assert_bytes_equal(out, expected)
    assert logical(expected, layout, new)["c4"].keys() == snap["c4"].keys()


def test_resume_tail_only_swa_writes_nothing_into_page_0():
    """SPEC §6's hole: the new allocation has fewer SWA slots than were saved.  The seed trusts
    the saved mask and writes into SWA loc 0; we restore only rows valid before and after."""
    layout = LM_REQ
    cfg = A.config_from_layout(layout, NREQ, 120)
    state = A.init_state(cfg)
    state, a = admit(state, 90)
    cache = random_cache(layout, seed=12)
    old = np_request_locs(state, a, "page")
    snap = logical(np_bufs(cache), layout, old)
    copy, state = O.retract(cache, state, a, budget=O.HostBudget(1 << 30))
    state, _ = admit(state, 33)
    state, a2 = admit(state, 90)
    # a smaller tail-only allocation: the older half of the window lost its SWA slots
    pt = np.asarray(state.page_table)[a2]
    pos = np.arange(90)
    f = pt[pos // cfg.page_size] * cfg.page_size + pos % cfg.page_size
    table = np.asarray(state.full_to_swa).copy()
    lost = pos[(table[f] > 0)][:GEO.swa_window // 2]
    table[f[lost]] = 0
    import dataclasses
    state = dataclasses.replace(state, full_to_swa=jnp.asarray(table))
    new = np_request_locs(state, a2, "page")
    assert new["swa"][1].sum() < old["swa"][1].sum()
    before = np_bufs(cache)
    out = O.load(cache, state, copy, a2)
    got = np_bufs(out)
    swa = layout.pool("swa")
    for layer in range(swa.spec.num_layers):  # page 0 of every SWA layer: untouched
        row = swa.placements[layer].row_base
        np.testing.assert_array_equal(got[0][row], before[0][row])
    assert_bytes_equal(out, expected_after_load(before, layout, new, old, snap))


def test_request_budget_exceeded_leaves_cache_and_allocator_untouched():
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, a = admit(state, 60)
    cache = random_cache(layout, seed=13)
    before = np_bufs(cache)
    snap = jax.tree_util.tree_map(np.asarray, state)
    budget = O.HostBudget(1000)
    with pytest.raises(O.HostBudgetExceeded, match="needs"):
        O.retract(cache, state, a, budget=budget)
    assert budget.used == 0
    assert_bytes_equal(cache, before)
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(snap)):
        np.testing.assert_array_equal(np.asarray(x), y)
    with pytest.raises(ValueError, match="not the request"):
        O.finish_save(O.start_save(cache, state, a, budget=O.HostBudget(1 << 30)), state, a + 1)
    with pytest.raises(ValueError, match="not a live request"):
        O.save(cache, state, a + 1, budget=O.HostBudget(1 << 30))
    copy = O.save(cache, state, a, budget=O.HostBudget(1 << 30))
    state2, b = admit(state, 61)
    with pytest.raises(ValueError, match="saved 60"):
        O.load(cache, state2, copy, b)
    with pytest.raises(ValueError, match="packed"):
        O.save(random_cache(LAYOUTS["packed"]), state, a)


def test_empty_request_short_circuits():
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, a = admit(state, 0)
    cache = random_cache(layout, seed=14)
    budget = O.HostBudget(0)
    copy, state = O.retract(cache, state, a, budget=budget)
    assert copy.entries == () and copy.nbytes == 0
    out, state, slot = O.resume(cache, state, copy)
    assert slot >= 0 and out is cache


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), scope=st.sampled_from(["page", "request"]),
       ops=st.lists(st.tuples(st.sampled_from(["admit", "extend", "retract", "resume"]),
                              st.integers(0, 5), st.sampled_from([1, 7, 20, 45])),
                    min_size=4, max_size=12))
def test_request_interleavings_bit_exact(seed, scope, ops):
    """Random admit / extend / retract / resume over many requests: every resumed request reads
    back bit-exact (positions valid before and after), and every load changes only the resumed
    request's locations (plus its reset request-scoped rows)."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    cache = random_cache(layout, seed=seed % 97)
    budget = O.HostBudget(1 << 30)
    live, saved = {}, {}  # request id -> slot; request id -> (HostCopy, snapshot, old locs)
    for op, rid, n in ops:
        if op == "admit" and rid not in live and rid not in saved:
            state2, slots, status = A.admit(state, jnp.asarray([n], jnp.int32))
            if int(status[0]) == A.OK:
                state, live[rid] = state2, int(slots[0])
        elif op == "extend" and rid in live:
            state2, status = A.extend(state, jnp.asarray([live[rid]], jnp.int32),
                                      jnp.asarray([n], jnp.int32), max_new=45)
            if int(status[0]) == A.OK:
                state = state2
        elif op == "retract" and rid in live:
            slot = live.pop(rid)
            old = np_request_locs(state, slot, scope)
            snap = logical(np_bufs(cache), layout, old)
            copy, state = O.retract(cache, state, slot, c128_state_scope=scope, budget=budget)
            saved[rid] = (copy, snap, old)
        elif op == "resume" and rid in saved:
            copy, snap, old = saved[rid]
            before = np_bufs(cache)
            out, state2, slot = O.resume(cache, state, copy)
            if slot < 0:
                assert out is cache
                continue
            del saved[rid]
            state, cache, live[rid] = state2, out, slot
            new = np_request_locs(state, slot, scope)
            got = logical(np_bufs(cache), layout, new)
            for pool, (l, v) in new.items():
                for t in np.nonzero(v & old[pool][1])[0]:
                    assert np.array_equal(got[pool][int(t)], snap[pool][int(t)]), (pool, t)
            assert_bytes_equal(cache, expected_after_load(
                before, layout, new, old, snap,
                reset_ring_of=slot if scope == "request" else None))
    for copy, _, _ in saved.values():
        copy.free()
    assert budget.used == 0
    A.check_invariants(state)


def test_batch_retract_resume_and_atomic_budget():
    """retract_batch / resume_batch: several requests at once; a batch that does not fit the
    budget charges nothing and dispatches nothing; a resume without room changes nothing."""
    layout = LM_REQ
    cfg = A.config_from_layout(layout, NREQ, 120)
    state = A.init_state(cfg)
    state, slots, status = A.admit(state, jnp.asarray([50, 17, 90], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=15)
    olds = [np_request_locs(state, s, "page") for s in slots]
    snaps = [logical(np_bufs(cache), layout, o) for o in olds]
    one = O.save(cache, state, slots[0], budget=O.HostBudget(1 << 30)).nbytes
    budget = O.HostBudget(one + 10)
    with pytest.raises(O.HostBudgetExceeded):
        O.start_save_batch(cache, state, slots, budget=budget)
    assert budget.used == 0
    with pytest.raises(ValueError, match="twice"):
        O.start_save_batch(cache, state, [slots[0], slots[0]], budget=budget)
    budget = O.HostBudget(1 << 30)
    copies, state = O.retract_batch(cache, state, slots, budget=budget)
    assert (np.asarray(state.lengths)[slots] == -1).all()
    # fill the pool so that the batch cannot come back: nothing changes
    full, fslot, fst = A.admit(state, jnp.asarray([120] * (NREQ - 1), jnp.int32), atomic=False)
    out, st2, got = O.resume_batch(cache, full, copies)
    assert got == [-1, -1, -1] and out is cache and st2 is full and not copies[0].freed
    state, _ = admit(state, 40)  # different pages for the resumed requests
    out, state, new_slots = O.resume_batch(cache, state, copies)
    assert all(c.freed for c in copies) and budget.used == 0
    got = np_bufs(out)
    for s, old, snap in zip(new_slots, olds, snaps):
        new = np_request_locs(state, s, "page")
        now = logical(got, layout, new)
        for pool, (_, v) in new.items():
            for t in np.nonzero(v & old[pool][1])[0]:
                assert np.array_equal(now[pool][int(t)], snap[pool][int(t)]), (s, pool, t)
    A.check_invariants(state)


@pytest.mark.gpu
@pytest.mark.parametrize("transfer", O.TRANSFERS)
def test_gpu_pinned_round_trip_flash(transfer):
    """On the GPU: copies live in pinned_host memory, and a DSv4-Flash request round-trips
    bit-exact into different pages (both transfer paths)."""
    geo = jaxkv.dsv4_flash()
    ns, nf = 8, 12
    layout = jaxkv.layer_major(geo, {"swa": ns, "c4": nf, "c128": nf, "c4_indexer": nf,
                                     "c4_state": ns * 8 + 1, "c4_indexer_state": ns * 8 + 1,
                                     "c128_state": ns * 128 + 1})
    assert jax.devices()[0].platform == "gpu"
    assert O.host_kinds()[0] == "pinned_host"
    state = A.init_state(A.config_from_layout(layout, 4, 1500))
    state, a = admit(state, 1300)
    cache = random_cache(layout, seed=21)
    copy, state = O.finish_save(O.start_save(cache, state, a, budget=O.HostBudget(1 << 34),
                                             transfer=transfer), state, a)
    assert copy.data.sharding.memory_kind == "pinned_host"
    assert copy._lease.code.sharding.memory_kind == "pinned_host"  # the load's plan code too
    state, _ = admit(state, 300)
    state, a2 = admit(state, 1300)
    out = O.load(cache, state, copy, a2, donate=False)
    again = O.save(out, state, a2, budget=O.HostBudget(1 << 34))
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(copy.data))


def test_request_scoped_state_is_reset_before_load():
    """A short request (T < ring) restores T request-scoped rows; the other rows of its new slot
    read the sentinel [0 | -inf], whatever the slot's previous owner left there."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, a = admit(state, 5)
    cache = random_cache(layout, seed=16)
    copy, state = O.retract(cache, state, a, c128_state_scope="request",
                            budget=O.HostBudget(1 << 30))
    state, other = admit(state, 3)  # takes slot a: the resumed request gets another slot
    state, a2 = admit(state, 5)
    assert a2 != a
    out = O.load(cache, state, copy, a2)
    ring = GEO.c128_ring
    rows = jaxkv.get_rows(out, "c128_state", None, jnp.asarray(a2 * ring + np.arange(ring)))
    rows = np.asarray(rows)
    old = np.asarray(jaxkv.get_rows(cache, "c128_state", None,
                                    jnp.asarray(a * ring + np.arange(5))))
    np.testing.assert_array_equal(rows[:, :5].view(np.uint8), old.view(np.uint8))
    sentinel = O._sentinel_bytes(GEO.c128_state_width).view(np.float32)
    np.testing.assert_array_equal(rows[:, 5:], np.broadcast_to(sentinel, rows[:, 5:].shape))


def test_v32_and_no_memory_kinds_fallback(monkeypatch):
    """V3.2 pools at the location level; a backend without memory kinds falls back to NumPy."""
    geo = jaxkv.tiny(3, v32=True)
    layout = jaxkv.layer_major(geo, 6)
    cache = random_cache(layout, seed=17)
    before, expected = np_bufs(cache), np_bufs(cache)
    src = {"kv": np.array([70, 65, 100], np.int32), "indexer": np.array([64, 99], np.int32)}
    dst = {"kv": np.array([130, 131, -1], np.int32), "indexer": np.array([190, 66], np.int32)}

    class NoMemories:
        def addressable_memories(self):
            raise NotImplementedError

    assert O.host_kinds(NoMemories()) == ("numpy",)
    monkeypatch.setattr(O, "host_kinds", lambda device=None: ("numpy",))
    copy = O.save_locs(cache, src, budget=O.HostBudget(1 << 30))
    assert copy.host_kind == "numpy" and isinstance(copy.data, np.ndarray)
    for k in src:
        np_move(before, expected, layout, (k, 0), src[k], dst[k])
    assert_bytes_equal(O.load_locs(cache, copy, dst), expected)


def test_allocator_bug_is_caught_before_dispatch():
    """A new SWA location inside the reserved page 0 (an allocator bug, what the seed's saved-mask
    trust amounts to) is a ValueError for the whole batch, and the cache is unchanged."""
    import dataclasses
    layout = LM_REQ
    cfg = A.config_from_layout(layout, NREQ, 120)
    state = A.init_state(cfg)
    state, a = admit(state, 40)
    cache = random_cache(layout, seed=18)
    before = np_bufs(cache)
    copy, state = O.retract(cache, state, a, budget=O.HostBudget(1 << 30))
    state, a2 = admit(state, 40)
    pt = np.asarray(state.page_table)[a2]
    f = pt[39 // cfg.page_size] * cfg.page_size + 39 % cfg.page_size
    table = np.asarray(state.full_to_swa).copy()
    table[f] = 5  # SWA page 0
    bad = dataclasses.replace(state, full_to_swa=jnp.asarray(table))
    with pytest.raises(ValueError, match="reserved page 0"):
        O.load(cache, bad, copy, a2, donate=True)
    assert_bytes_equal(cache, before)
    assert not copy.freed


# ------------------------------------------------------------------------------------------------
# Device staging: about the saved bytes; a batch keeps a bounded amount in flight


def test_staging_is_about_the_saved_bytes():
    """The device staging of a save is the saved bytes plus at most 1/8 bucket padding, and the
    compiled gather (XLA's memory analysis, checked independently here) uses at most the staging
    plus one more staging of temporaries -- never a copy of a cache buffer."""
    layout = LAYOUTS["layer_major"]
    cache = random_cache(layout, seed=21)
    rng = np.random.default_rng(21)
    pool_locs, useful = {}, 0
    for p in layout.pools:
        n = int(rng.integers(17, 70))
        locs = rng.integers(0, p.capacity, n)  # a save reads any location in range
        pool_locs[p.name] = locs.astype(np.int32)
        fmt = p.spec.fmt
        useful += p.spec.num_layers * n * (fmt.value_bytes + fmt.scale_bytes)  # independent
    h = O.start_save_locs(cache, pool_locs, budget=O.HostBudget(1 << 30), impl="reference")
    copy = h.wait()
    mem = h.gather_memory
    assert mem.staging == copy.nbytes
    assert useful <= copy.nbytes <= useful + useful // 8
    # independent memory analysis of the same program
    locs = [jnp.asarray(O._pad(pool_locs[e.pool], e.padded)) for e in copy.entries]
    keys = tuple((e.pool, e.layers) for e in copy.entries)
    m = O._gather.lower(cache.buffers, locs, layout=layout, keys=keys,
                        impl="reference").compile().memory_analysis()
    assert (mem.output, mem.temp) == (m.output_size_in_bytes, m.temp_size_in_bytes)
    assert m.output_size_in_bytes == copy.nbytes
    biggest_buffer = max(int(np.prod(s)) for s in layout.buffer_shapes)
    assert m.temp_size_in_bytes <= copy.nbytes + copy.nbytes // 4 + (1 << 16)
    assert m.temp_size_in_bytes < biggest_buffer  # the cache is never copied or widened
    assert mem.device_bytes <= O.gather_bound(copy.nbytes)
    copy.free()


def test_gather_too_large_refused_before_dispatch(monkeypatch):
    layout = LAYOUTS["layer_major"]
    cache = random_cache(layout, seed=22)
    before = np_bufs(cache)
    budget = O.HostBudget(1 << 30)
    monkeypatch.setattr(O, "gather_bound", lambda staging: 0)
    with pytest.raises(O.GatherTooLarge, match="device bytes"):
        O.save_locs(cache, {"c4": np.array([40, 41, 90], np.int32)}, budget=budget,
                    impl="reference")
    assert budget.used == 0
    assert_bytes_equal(cache, before)


@pytest.mark.parametrize("limit", [0, None])
def test_batch_save_bounds_staging_in_flight(monkeypatch, limit):
    """max_inflight_bytes=0: every earlier save is awaited before the next gather is queued (one
    staging alive at a time); the default (1 GiB) queues a small batch without waiting.  Both
    give the same bytes."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, slots, status = A.admit(state, jnp.asarray([50, 17, 90], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=23)
    ref = [O.save(cache, state, s, budget=O.HostBudget(1 << 30)) for s in slots]
    waited, real_wait = [], O.SaveHandle.wait

    def spy(self):
        waited.append(self)
        return real_wait(self)

    monkeypatch.setattr(O.SaveHandle, "wait", spy)
    hs = O.start_save_batch(cache, state, slots, budget=O.HostBudget(1 << 30),
                            max_inflight_bytes=limit)
    assert waited == (hs[:-1] if limit == 0 else [])
    for h, r in zip(hs, ref):
        assert np.array_equal(np.asarray(h.wait().data), np.asarray(r.data))
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        O.start_save_batch(cache, state, slots, max_inflight_bytes=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_gpu_gather_memory_flash_sized(impl):
    """On the GPU, with a DSv4-Flash cache of benchmark size (c4 buffer 3.2 GB): a 65,536-token
    request's gather needs at most about twice its staging (the H100 run once asked for 12 GiB,
    4x the c4 buffer, here), and the saved bytes are the cache's."""
    geo = jaxkv.dsv4_flash()
    nf, ns = 16 * 256 + 2, 34
    layout = jaxkv.layer_major(geo, {"swa": ns, "c4": nf, "c128": nf, "c4_indexer": nf,
                                     "c4_state": ns * 8 + 1, "c4_indexer_state": ns * 8 + 1,
                                     "c128_state": ns * 128 + 1})
    key = jax.random.key(5)
    bufs = []
    for i, (r, c) in enumerate(layout.buffer_shapes):
        w = jax.random.bits(jax.random.fold_in(key, i), (r, c // 4), jnp.uint32)
        bufs.append(jax.lax.bitcast_convert_type(w, jnp.uint8).reshape(r, c))
    cache = jaxkv.Cache(tuple(bufs), layout)
    rng = np.random.default_rng(5)
    c4 = rng.choice(np.arange(64, layout.pool("c4").capacity), 16384, replace=False)
    locs = {"c4": c4.astype(np.int32), "c4_indexer": c4.astype(np.int32),
            "c128": rng.choice(np.arange(2, layout.pool("c128").capacity), 512,
                               replace=False).astype(np.int32)}
    h = O.start_save_locs(cache, locs, budget=O.HostBudget(1 << 34), impl=impl)
    copy = h.wait()
    m = h.gather_memory
    print(f"impl {impl} -> {m}")
    assert m.device_bytes <= O.gather_bound(copy.nbytes)
    assert m.temp < int(np.prod(layout.buffer_shapes[1]))
    got = copy.pool_bytes("c4")
    b, a = jaxkv.cache.token_addressing(layout, "c4")
    sample = rng.integers(0, 16384, 8)
    host_buf = np.asarray(cache.buffers[b])
    for layer in (0, 20):
        for i in sample:
            page, t = divmod(int(c4[i]), 64)
            row = a.row_base[layer] + page * a.row_step
            v0 = a.col_base[layer] + t * a.value_bytes
            assert np.array_equal(got[layer, i, :a.value_bytes],
                                  host_buf[row, v0:v0 + a.value_bytes])


def test_batch_planning_syncs_do_not_grow_with_the_batch(monkeypatch):
    """start_save_batch / load_batch fetch the batch's translation from the device once: the
    number of device->host fetches (jax.device_get, np.asarray of a jax.Array) is the same for a
    batch of 1 and of 3 requests (no sync inside the per-request loop, which would serialise each
    request's planning behind the previous request's transfer).  Bytes still round-trip."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, slots, status = A.admit(state, jnp.asarray([50, 17, 90], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=31)
    ref = [O.save(cache, state, s, budget=O.HostBudget(1 << 30)) for s in slots]  # compiles
    out_ref = O.load_batch(cache, state, ref, slots)
    calls = []
    real_get = jax.device_get
    array_type = type(jnp.zeros(1))
    real_array = array_type.__array__

    def get_spy(x):
        calls.append("device_get")
        return real_get(x)

    def array_spy(self, *a, **k):
        calls.append("__array__")
        return real_array(self, *a, **k)

    monkeypatch.setattr(jax, "device_get", get_spy)
    monkeypatch.setattr(array_type, "__array__", array_spy)
    counts = {}
    for batch in (slots[:1], slots):
        del calls[:]
        hs = O.start_save_batch(cache, state, batch, budget=O.HostBudget(1 << 30))
        save_calls = len(calls)
        copies = [h.wait() for h in hs]
        del calls[:]
        out = O.load_batch(cache, state, copies, batch)
        counts[len(batch)] = (save_calls, len(calls))
        monkeypatch.setattr(array_type, "__array__", real_array)
        for c, r in zip(copies, ref):
            assert np.array_equal(np.asarray(c.data), np.asarray(r.data))
        if len(batch) == len(slots):
            assert_bytes_equal(out, np_bufs(out_ref))
        monkeypatch.setattr(array_type, "__array__", array_spy)
    assert counts[1] == counts[3], counts
    assert counts[3][0] >= 1  # the spies do see the one translation fetch


def _saved_batch_and_reference(seed):
    """Three requests saved with start_save_batch, a random target cache, and the bytes of
    loading them into it one request at a time (the reference for load_batch)."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, slots, status = A.admit(state, jnp.asarray([50, 17, 90], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=seed)
    copies = [h.wait() for h in O.start_save_batch(cache, state, slots,
                                                   budget=O.HostBudget(1 << 30))]
    target = random_cache(layout, seed=seed + 1)
    ref = np_bufs(target)
    for c, s in zip(copies, slots):
        ref = np_bufs(O.load(jaxkv.Cache(tuple(jnp.asarray(b) for b in ref), layout), state, c,
                             s))
    return state, slots, copies, target, ref


@pytest.mark.parametrize("limit", [0, None])
def test_load_batch_window_gives_the_same_bytes(limit):
    """load_batch's sliding window of host-to-device copies (max_inflight_bytes=0 awaits every
    earlier copy, None queues the whole small batch) restores the same bytes."""
    state, slots, copies, target, ref = _saved_batch_and_reference(37)
    out = O.load_batch(target, state, copies, slots, max_inflight_bytes=limit)
    assert_bytes_equal(out, ref)


def test_request_copy_masks_and_state_rows_follow_the_numpy_translation():
    """The device-computed plan (translation + masks + compaction in one program) saves exactly
    the numpy model's entries: per token pool the valid tokens in token order, per state pool the
    distinct valid rows ascending; the copy's masks and state-row indices (views of its host code)
    equal np_request_locs / np.unique, for requests of different lengths in one batch."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, slots, status = A.admit(state, jnp.asarray([75, 3, 120], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=41)
    bufs = np_bufs(cache)
    copies = [h.wait() for h in O.start_save_batch(cache, state, slots,
                                                   budget=O.HostBudget(1 << 30))]
    for s, copy in zip(slots, copies):
        old = np_request_locs(state, s, "page")
        for pool, (locs, valid) in old.items():
            np.testing.assert_array_equal(copy.masks[pool], valid)
            p = layout.pool(pool)
            if p.spec.kind == "state":
                uniq, inv = np.unique(locs[valid], return_inverse=True)
                idx = np.full(len(valid), -1)
                idx[valid] = inv.reshape(-1)
                np.testing.assert_array_equal(copy.meta["state_index"][pool], idx)
                saved = uniq
            else:
                saved = locs[valid]
            if not len(saved):
                assert copy.entry(pool) is None
                continue
            got = copy.pool_bytes(pool)
            assert got.shape[:2] == (p.spec.num_layers, len(saved))
            for layer in (0, p.spec.num_layers - 1):
                want = np.stack([np_token(bufs, layout, pool, layer, x) for x in saved])
                np.testing.assert_array_equal(got[layer], want)
        copy.free()


@pytest.mark.parametrize("order", ["default", "run3"])
def test_load_batch_queues_copies_ahead_of_scatters(monkeypatch, order):
    """Queue order of load_batch (a GPU copy into a new device array waits for the work already
    queued on the compute stream, so a copy queued after a scatter would wait for it): every
    request's host-to-device copy is queued before the previous request's scatter, and the first
    copy before the batch's planning program.  The run-3 order (``ahead=False, early=False``,
    the benchmark's A/B row) queues each scatter right after its copy.  Both restore the same
    bytes as loading one request at a time."""
    state, slots, copies, target, ref = _saved_batch_and_reference(41)
    events, staged = [], {}
    real_put, real_plan_fns = jax.device_put, O._plan_fns
    data_ids = {id(c.data): k for k, c in enumerate(copies)}

    def put_spy(x, *a, **k):
        out = real_put(x, *a, **k)
        if id(x) in data_ids:
            events.append(("copy", data_ids[id(x)]))
            staged[id(out)] = data_ids[id(x)]
        return out

    def wrap_scatter(f):
        def g(buffers, staging, *a, **k):
            events.append(("scatter", staged.get(id(staging))))
            return f(buffers, staging, *a, **k)
        return g

    def plan_fns_spy(*a):
        fns = real_plan_fns(*a)

        def load(*x, **k):
            events.append(("plan", None))
            return fns.load(*x, **k)
        return fns._replace(load=load)

    monkeypatch.setattr(jax, "device_put", put_spy)
    monkeypatch.setattr(O, "_plan_fns", plan_fns_spy)
    monkeypatch.setattr(O, "_scatter", wrap_scatter(O._scatter))
    if order == "default":
        out = O.load_batch(target, state, copies, slots)
    else:
        sl, lens = O._check_slots(state, slots)
        out = O._load_batch(target, state, copies, sl, lens, impl="auto", donate=False,
                            free=False, limit=O.MAX_INFLIGHT_BYTES, ahead=False, early=False)
    monkeypatch.setattr(jax, "device_put", real_put)
    assert_bytes_equal(out, ref)
    pos = {e: n for n, e in enumerate(events)}
    n = len(copies)
    assert [e for e in events if e[0] == "scatter"] == [("scatter", k) for k in range(n)], events
    assert [e for e in events if e[0] == "copy"] == [("copy", k) for k in range(n)], events
    if order == "default":
        assert pos[("copy", 0)] < pos[("plan", None)], events
        for k in range(n - 1):
            assert pos[("copy", k + 1)] < pos[("scatter", k)], events
    else:
        assert pos[("plan", None)] < pos[("copy", 0)], events
        for k in range(n - 1):
            assert pos[("scatter", k)] < pos[("copy", k + 1)], events


def test_load_batch_early_copies_respect_the_window(monkeypatch):
    """With max_inflight_bytes=0 only one copy is queued before the planning program (one copy
    always goes); the others follow it, each after the oldest in flight was awaited."""
    layout = LM_REQ
    state = A.init_state(A.config_from_layout(layout, NREQ, 120))
    state, slots, status = A.admit(state, jnp.asarray([50, 17, 90], jnp.int32))
    slots = [int(x) for x in np.asarray(slots)]
    cache = random_cache(layout, seed=43)
    copies = [h.wait() for h in O.start_save_batch(cache, state, slots,
                                                   budget=O.HostBudget(1 << 30))]
    events = []
    real_before, real_plan_fns = O._LoadWindow.before, O._plan_fns

    def before(self, nbytes):
        events.append(("await", len(self.inflight)))
        return real_before(self, nbytes)

    def plan_fns_spy(*a):
        fns = real_plan_fns(*a)

        def load(*x, **k):
            events.append(("plan", None))
            return fns.load(*x, **k)
        return fns._replace(load=load)

    monkeypatch.setattr(O._LoadWindow, "before", before)
    monkeypatch.setattr(O, "_plan_fns", plan_fns_spy)
    target = random_cache(layout, seed=44)
    out = O.load_batch(target, state, copies, slots, max_inflight_bytes=0)
    assert events == [("plan", None), ("await", 1), ("await", 1)], events
    ref = O.load_batch(target, state, copies, slots)
    assert_bytes_equal(out, np_bufs(ref))
