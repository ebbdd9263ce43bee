"""jaxkv.alloc: a hypothesis state machine against a plain-Python model, exhaustion, checked
release, translations, layouts and DCP widening."""
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import jaxkv
from jaxkv import alloc as A

# Layer-major style: separate full and SWA spaces; SWA pages = full pages (8 tokens).
CFG_LM = A.AllocConfig(page_size=8, num_pages=10, max_requests=4, max_len=48, window=6,
                       swa_page=8, num_swa_pages=7)
# Packed style: one shared space; SWA blocks of 4 tokens (window spans up to 3 of them).
CFG_PK = A.AllocConfig(page_size=8, num_pages=16, max_requests=4, max_len=48, window=6,
                       swa_page=4, num_swa_pages=16, shared=True)

B_ADMIT, B_EXT, B_REL = 3, 4, 3
MAX_NEWS = (1, 20)  # few static values: few compiles


def leaves(state):
    return [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(state)]


def same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape
                                    and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def demand(cfg, L, L2):
    """(full pages, SWA pages) a request needs to grow from L to L2 (plain Python)."""
    nf = math.ceil(L2 / cfg.page_size) - math.ceil(L / cfg.page_size)

    def live(n):
        if n <= 0:
            return set()
        return set(range(max(n - cfg.window, 0) // cfg.swa_page, (n - 1) // cfg.swa_page + 1))
    ns = len(live(L2) - live(L))
    return nf, ns


def held(cfg, L):
    """(full pages, SWA pages) a request of length L holds."""
    return demand(cfg, 0, L)


STEPS = {"n": 0}


@jax.jit
def inspect(state):
    """Token tables and SWA locs/masks of every slot, in one dispatch: ([R, max_len] x 3)."""
    cfg = state.cfg
    slots = jnp.arange(cfg.max_requests, dtype=jnp.int32)
    sw, m = A.request_swa_locs(state, slots, cfg.max_len)
    return A.token_table(state, slots, cfg.max_len), sw, m


@jax.jit
def do_admit(state, lengths, atomic):
    state, slots, status = A.admit(state, lengths, atomic=atomic)
    return state, (slots, status) + inspect(state)


@functools.partial(jax.jit, static_argnames="max_new")
def do_extend(state, slots, num, atomic, max_new):
    state, status = A.extend(state, slots, num, max_new=max_new, atomic=atomic)
    return state, (status,) + inspect(state)


@functools.partial(jax.jit, static_argnames="check")
def do_release(state, slots, atomic, check):
    state, status = A.release(state, slots, atomic=atomic, check=check)
    return state, (status,) + inspect(state)


def snapshot(state):
    return [np.asarray(x) for x in inspect(state)]


class AllocMachine(RuleBasedStateMachine):
    cfg = CFG_LM
    check = True  # release(check=...): static, one value per machine (compile time)

    @initialize()
    def init(self):
        self.state = A.init_state(self.cfg)
        self.model = {}        # slot -> length
        self.tables = {}       # slot -> list of full locs (positions 0..L-1)
        self.retracted = []    # lengths of evicted requests, to resume
        self.snap = snapshot(self.state)

    # ---- model helpers ----
    def free_expected(self):
        cfg = self.cfg
        uf = sum(held(cfg, L)[0] for L in self.model.values())
        us = sum(held(cfg, L)[1] for L in self.model.values())
        if cfg.shared:
            return [cfg.num_pages - 1 - uf - us]
        return [cfg.num_pages - 1 - uf, cfg.num_swa_pages - 1 - us]

    def fits(self, reqs):
        """Expected OK/NO_SPACE of valid rows (L, L2) in order (prefix semantics)."""
        free = self.free_expected()
        cum_f = cum_s = 0
        out = []
        for L, L2 in reqs:
            nf, ns = demand(self.cfg, L, L2)
            cum_f += nf
            cum_s += ns
            if self.cfg.shared:
                out.append(cum_f + cum_s <= free[0])
            else:
                out.append(cum_f <= free[0] and cum_s <= free[1])
        return out

    def apply_status(self, before, status, expected, atomic):
        """Checks status against the model's expectation; returns the rows applied."""
        exp = list(expected)
        if atomic and any(e not in (A.OK, A.PAD) for e in exp):
            exp = [A.SKIPPED if e == A.OK else e for e in exp]
        assert status.tolist() == exp, (status.tolist(), exp)
        if not any(e == A.OK for e in exp):
            assert same(before, leaves(self.state)), "failed call changed the state"
        return [e == A.OK for e in exp]

    # ---- rules ----
    @rule(lengths=st.lists(st.integers(-1, 50), min_size=B_ADMIT, max_size=B_ADMIT),
          resume=st.booleans(), atomic=st.booleans())
    def admit(self, lengths, resume, atomic):
        STEPS["n"] += 1
        if resume and self.retracted:
            lengths[0] = self.retracted.pop()
        before = leaves(self.state)
        self.state, out = do_admit(self.state, jnp.asarray(lengths, jnp.int32), atomic)
        slots, status, *self.snap = jax.device_get(out)
        free_slots = [r for r in range(self.cfg.max_requests) if r not in self.model]
        valid = [L >= 0 and L <= self.cfg.max_len for L in lengths]
        # Rows that get a slot, in order; fit is a prefix among them.
        rows, exp_slot, k = [], [], 0
        for i, L in enumerate(lengths):
            if valid[i] and k < len(free_slots):
                rows.append(i)
                exp_slot.append(free_slots[k])
                k += 1
        fit = self.fits([(0, lengths[i]) for i in rows])
        expected = []
        for i, L in enumerate(lengths):
            if L < 0:
                expected.append(A.PAD)
            elif not valid[i]:
                expected.append(A.BAD)
            elif i in rows:
                expected.append(A.OK if fit[rows.index(i)] else A.NO_SPACE)
            else:
                expected.append(A.NO_SPACE)  # no free slot
        applied = self.apply_status(before, status, expected, atomic)
        for i, ok in enumerate(applied):
            if ok:
                slot = exp_slot[rows.index(i)]
                assert int(slots[i]) == slot
                self.model[slot] = lengths[i]
                self.tables[slot] = self.snap[0][slot, :lengths[i]].tolist()
            else:
                assert int(slots[i]) == -1

    @rule(data=st.data(), max_new=st.sampled_from(MAX_NEWS), atomic=st.booleans())
    def extend(self, data, max_new, atomic):
        STEPS["n"] += 1
        live = sorted(self.model)
        pool = live + [-1, 0, 1, 2, 3, 7]  # live slots, padding, possibly free / bad slots
        slots = data.draw(st.lists(st.sampled_from(pool), min_size=B_EXT, max_size=B_EXT))
        num = data.draw(st.lists(st.integers(0, max_new + 1), min_size=B_EXT, max_size=B_EXT))
        before = leaves(self.state)
        self.state, out = do_extend(self.state, jnp.asarray(slots, jnp.int32),
                                    jnp.asarray(num, jnp.int32), atomic, max_new=max_new)
        status, *self.snap = jax.device_get(out)
        counts = {s: slots.count(s) for s in slots}
        expected, reqs, idx = [], [], []
        for i, (s, n) in enumerate(zip(slots, num)):
            if s < 0:
                expected.append(A.PAD)
                continue
            ok = (s in self.model and counts[s] == 1 and n <= max_new
                  and self.model[s] + n <= self.cfg.max_len)
            expected.append(A.BAD if not ok else None)
            if ok:
                reqs.append((self.model[s], self.model[s] + n))
                idx.append(i)
        for i, f in zip(idx, self.fits(reqs)):
            expected[i] = A.OK if f else A.NO_SPACE
        applied = self.apply_status(before, status, expected, atomic)
        for i, ok in enumerate(applied):
            if ok:
                s = slots[i]
                self.model[s] += num[i]
                new = self.snap[0][s, :self.model[s]].tolist()
                assert new[:len(self.tables[s])] == self.tables[s], "existing tokens moved"
                self.tables[s] = new

    @rule(data=st.data(), evict=st.booleans(), atomic=st.booleans())
    def release(self, data, evict, atomic):
        check = self.check
        STEPS["n"] += 1
        pool = sorted(self.model) + [-1, 0, 1, 3, 9]
        slots = data.draw(st.lists(st.sampled_from(pool), min_size=B_REL, max_size=B_REL))
        before = leaves(self.state)
        self.state, out = do_release(self.state, jnp.asarray(slots, jnp.int32), atomic,
                                     check=check)
        status, *self.snap = jax.device_get(out)
        counts = {s: slots.count(s) for s in slots}
        expected = [A.PAD if s < 0 else (A.OK if s in self.model and counts[s] == 1 else A.BAD)
                    for s in slots]
        applied = self.apply_status(before, status, expected, atomic)
        for s, ok in zip(slots, applied):
            if ok:
                L = self.model.pop(s)
                del self.tables[s]
                if evict:
                    self.retracted.append(L)

    # ---- invariants ----
    @invariant()
    def consistent(self):
        if not hasattr(self, "state"):
            return
        A.check_invariants(self.state)  # no page twice, free + used = total, SWA mapping owned
        assert np.asarray(self.state.nfree).tolist() == self.free_expected()
        lens = np.asarray(self.state.lengths)
        assert {i: int(L) for i, L in enumerate(lens) if L >= 0} == self.model
        locs = [f for t in self.tables.values() for f in t]
        ps = self.cfg.page_size
        assert len(set(locs)) == len(locs) and min(locs, default=ps) >= ps  # page 0 unused
        # Every live window token maps to an SWA slot of a page its request owns.
        table, sws, ms = self.snap
        for s, L in self.model.items():
            assert table[s, :L].tolist() == self.tables[s] and (table[s, L:] == -1).all()
            m = ms[s]
            assert m[max(L - self.cfg.window, 0):L].all() and m.sum() == min(L, self.cfg.window)
            pages = sws[s][m] // self.cfg.swa_page
            own = np.asarray(self.state.owners[self.cfg.swa_space])[pages]
            assert (own == s).all()
        # No SWA location aliases another live token's.
        valid = sws[ms]
        assert len(set(valid.tolist())) == valid.size and (valid >= self.cfg.swa_page).all()


# 2 machines x 100 examples x up to 60 steps: ~11,000 steps (ALLOC_EXAMPLES overrides).
MACHINE_SETTINGS = settings(max_examples=int(os.environ.get("ALLOC_EXAMPLES", 100)),
                            stateful_step_count=60, deadline=None,
                            suppress_health_check=list(HealthCheck))


class LayerMajorMachine(AllocMachine):
    cfg = CFG_LM


class PackedMachine(AllocMachine):
    cfg = CFG_PK
    check = False


TestLayerMajorMachine = LayerMajorMachine.TestCase
TestLayerMajorMachine.settings = MACHINE_SETTINGS
TestPackedMachine = PackedMachine.TestCase
TestPackedMachine.settings = MACHINE_SETTINGS


# ---------------------------------------------------------------------------------------------


def fill(cfg, n):
    st_ = A.init_state(cfg)
    st_, slots, status = A.admit(st_, jnp.asarray([n] * 2, jnp.int32))
    assert status.tolist() == [A.OK, A.OK]
    return st_, slots


def test_exhaustion_byte_identical():
    cfg = dataclasses.replace(CFG_LM, max_requests=8)
    st0, _ = fill(cfg, 24)  # 3 + 3 full pages of 9
    before = leaves(st0)
    st1, slots, status = A.admit(st0, jnp.asarray([8, 24, 4], jnp.int32))  # needs 1 + 3 + 1 of 3
    assert status.tolist() == [A.SKIPPED, A.NO_SPACE, A.NO_SPACE]
    assert slots.tolist() == [-1, -1, -1]
    assert same(before, leaves(st1))
    # Non-atomic: the fitting prefix is applied, the rest untouched.
    st2, slots, status = A.admit(st0, jnp.asarray([8, 24, 4], jnp.int32), atomic=False)
    assert status.tolist() == [A.OK, A.NO_SPACE, A.NO_SPACE]
    A.check_invariants(st2)
    # Extend past the full pool: unchanged.
    st3, status = A.extend(st0, jnp.asarray([0, 1], jnp.int32), jnp.asarray([20, 20]),
                           max_new=20)
    assert status.tolist() == [A.SKIPPED, A.NO_SPACE]  # 3 pages free: 1st fits alone
    assert same(before, leaves(st3))


def test_swa_memory_bounded_by_window():
    """Decoding a long sequence holds at most `ring` SWA pages; the rest go back."""
    cfg = A.AllocConfig(page_size=16, num_pages=64, max_requests=2, max_len=900, window=20,
                        swa_page=16, num_swa_pages=5)
    s = A.init_state(cfg)
    s, slots, _ = A.admit(s, jnp.asarray([1], jnp.int32))
    step = jax.jit(lambda s: A.extend(s, slots, jnp.ones(1, jnp.int32)))
    for _ in range(899):
        s, status = step(s)
        assert int(status[0]) == A.OK
        assert int(s.nfree[1]) >= 4 - cfg.ring
    A.check_invariants(s)
    assert int(s.nfree[0]) == 63 - math.ceil(900 / 16)


def test_resume_tail_only():
    cfg = CFG_LM
    s = A.init_state(cfg)
    s, slots, _ = A.admit(s, jnp.asarray([45], jnp.int32))
    sw, m = A.request_swa_locs(s, slots, cfg.max_len)
    assert np.asarray(m[0]).nonzero()[0].tolist() == list(range(45 - cfg.window, 45))
    # Only the pages under the window were taken.
    assert int(s.nfree[1]) == cfg.num_swa_pages - 1 - held(cfg, 45)[1]


def test_checked_release_detects_foreign_page():
    s, slots = fill(CFG_LM, 20)
    a, b = slots.tolist()
    # Corrupt: slot a's table names one of slot b's pages.
    bad = dataclasses.replace(s, page_table=s.page_table.at[a, 0].set(s.page_table[b, 0]))
    before = leaves(bad)
    out, status = A.release(bad, jnp.asarray([a], jnp.int32), check=True)
    assert status.tolist() == [A.BAD] and same(before, leaves(out))
    # Double release is detected with or without the ownership check.
    s2, st1 = A.release(s, jnp.asarray([a], jnp.int32))
    assert st1.tolist() == [A.OK]
    for check in (True, False):
        s3, st2 = A.release(s2, jnp.asarray([a, -1], jnp.int32), check=check)
        assert st2.tolist() == [A.BAD, A.PAD] and same(leaves(s2), leaves(s3))


def test_translate_matches_python():
    cfg = CFG_LM
    s = A.init_state(cfg)
    s, slots, _ = A.admit(s, jnp.asarray([13, 30], jnp.int32))
    s, _ = A.extend(s, slots, jnp.asarray([3, 1], jnp.int32), max_new=4)
    lens = np.asarray(s.lengths)
    pt = np.asarray(s.page_table)
    table = np.asarray(s.full_to_swa)
    pos = jnp.arange(cfg.max_len)[None, :]
    loc = A.translate(s, slots[:, None], pos, csa_ratio=4, hca_ratio=16, c4_ring=8, c128_ring=16)
    for i, r in enumerate(slots.tolist()):
        for p in range(cfg.max_len):
            if p >= lens[r]:
                assert int(loc.full[i, p]) == -1 and int(loc.c128_state_req[i, p]) == -1
                continue
            f = pt[r, p // 8] * 8 + p % 8
            assert int(loc.full[i, p]) == f
            sw = table[f]
            assert int(loc.swa[i, p]) == (sw if sw > 0 else -1)
            assert bool(loc.swa_valid[i, p]) == (p >= lens[r] - cfg.window)
            assert int(loc.c4[i, p]) == (f // 4 if (f + 1) % 4 == 0 else -1)
            assert int(loc.c128[i, p]) == (f // 16 if (f + 1) % 16 == 0 else -1)
            exp = (sw // 8) * 8 + sw % 8 if sw > 0 else -1
            assert int(loc.c4_state[i, p]) == exp
            assert int(loc.c128_state_req[i, p]) == r * 16 + p % 16


def test_config_from_layouts():
    geo = jaxkv.tiny()
    lm = jaxkv.layer_major(geo, {"swa": 5, "c4": 9, "c128": 9, "c4_indexer": 9,
                                 "c4_state": 41, "c4_indexer_state": 41, "c128_state": 41})
    cfg = A.config_from_layout(lm, max_requests=4, max_len=200)
    assert (cfg.page_size, cfg.num_pages, cfg.num_swa_pages, cfg.swa_page, cfg.shared) == (
        32, 9, 5, 32, False)
    pk = jaxkv.packed(geo, 12)
    cfg = A.config_from_layout(pk, max_requests=4, max_len=200)
    assert (cfg.num_pages, cfg.swa_page, cfg.shared) == (12, 8, True)
    with pytest.raises(ValueError, match="equal page counts"):
        A.config_from_layout(jaxkv.layer_major(geo, {**{n: 5 for n in lm.pool_names},
                                                     "c128": 4}), 4, 200)
    v32 = A.config_from_layout(jaxkv.layer_major(jaxkv.tiny(v32=True), 6), 2, 100)
    s = A.init_state(v32)
    s, slots, status = A.admit(s, jnp.asarray([40, 70], jnp.int32))
    s, status = A.extend(s, slots, jnp.asarray([1, 1], jnp.int32))
    assert status.tolist() == [A.OK, A.OK]
    A.check_invariants(s)


def test_dcp_widened_allocation():
    """Widened allocation: (owner, physical) distinct, each rank's slot in the same page id."""
    n = 4
    cfg = A.dcp_widen(A.AllocConfig(page_size=8, num_pages=12, max_requests=3, max_len=100,
                                    window=None), n)
    s = A.init_state(cfg)
    s, slots, status = A.admit(s, jnp.asarray([37, 70, 5], jnp.int32))
    assert status.tolist() == [A.OK] * 3
    f = np.asarray(A.token_table(s, slots, 100))
    f = f[f >= 0]
    owner = np.asarray(jaxkv.locs.dcp_owner_widened(jnp.asarray(f), n))
    phys = np.asarray(jaxkv.locs.dcp_physical_widened(jnp.asarray(f), n))
    assert len(set(zip(owner.tolist(), phys.tolist()))) == f.size
    assert (phys // 8 == f // (8 * n)).all()  # same page id on every rank
    assert (phys < 12 * 8).all()


def test_bad_config():
    with pytest.raises(ValueError, match="num_pages"):
        A.AllocConfig(page_size=8, num_pages=1, max_requests=1, max_len=8, num_swa_pages=4)
    with pytest.raises(ValueError, match="num_swa_pages"):
        A.AllocConfig(page_size=8, num_pages=4, max_requests=1, max_len=8)
    s = A.init_state(CFG_LM)
    with pytest.raises(ValueError, match="slots"):
        A.extend(s, jnp.zeros((2,), jnp.float32), jnp.zeros((2,), jnp.int32))


def test_step_count_reported():
    """Runs last in this file: reports how many state-machine steps ran (>= 10,000 wanted)."""
    if STEPS["n"]:
        print(f"state machine steps: {STEPS['n']}")


# ---------------------------------------------------------------------------------------------
# Sizing


@pytest.mark.parametrize("name,r,m,scope", [("dsv4_flash", 0.1, 1024, "request"),
                                             ("dsv4_flash", 0.2, 256, "page"),
                                             ("dsv4_pro", 0.1, 256, "request")])
def test_capacity_fits_budget_exactly(name, r, m, scope):
    from jaxkv import sizing
    geo = jaxkv.geometry.PRESETS[name]()
    budget = 60 * 10**9
    c = sizing.capacity(geo, budget, r, m, scope)
    lay = jaxkv.layer_major(geo, c.pages)
    swa_pb = lay.pool("swa").page_bytes
    used = lay.nbytes + geo.mtp_layers * c.pages["swa"] * swa_pb
    assert used == c.ours_bytes <= budget
    more = sizing.pool_pages(geo, c.pages["c4"] + 1, r, m, scope)
    assert sizing.pool_bytes(geo, more) > budget  # the largest that fits
    assert c.sglang_tokens == int(budget // jaxkv.geometry.sglang_bytes_per_full_token(geo, r))
    assert c.ours_tokens == (c.pages["c4"] - 1) * geo.page_size
    # SWA tokens per full token is r (same model behaviour), up to one page of rounding.
    assert abs((c.pages["swa"] - 1) - r * (c.pages["c4"] - 1)) < 1
    # Every state row our addressing can produce lies below the sentinel row.
    cfg = A.config_from_layout(lay, max_requests=m, max_len=4096)
    top_swa = jnp.asarray([cfg.num_swa_pages * cfg.swa_page - 1], jnp.int32)
    assert int(jaxkv.locs.state_rows(top_swa, geo.c4_ring, cfg.swa_page)[0]) \
        < lay.pool("c4_state").sentinel
    if scope == "request":
        row = jaxkv.locs.request_state_rows(jnp.asarray([m - 1]), jnp.asarray([127]), 128)
        assert int(row[0]) < lay.pool("c128_state").sentinel


def test_flash_capacity_target():
    from jaxkv import sizing
    c = sizing.capacity(jaxkv.dsv4_flash(), 60 * 10**9, 0.1, 1024)
    assert c.ratio >= 1.5, c
    assert c.swa_requests >= 1024  # the SWA pool can run all the requests the state is sized for
    with pytest.raises(ValueError, match="budget"):
        sizing.capacity(jaxkv.dsv4_flash(), 10**6, 0.1, 4)
