"""Layouts: the packed per-block numbers of SPEC §8 and the addressing invariants."""
import pytest

import jaxkv
from jaxkv import geometry as G


def test_packed_dsv4_pro_and_flash_match_vllm():
    pro = jaxkv.packed(G.dsv4_pro(), 8)
    assert len(pro.slots) == 92 and pro.block_stride == 1_473_408
    sizes = [s.page_bytes for s in pro.slots]
    assert (sizes.count(37_440), sizes.count(8_640), sizes.count(1_728)) == (31, 30, 31)
    flash = jaxkv.packed(G.dsv4_flash(), 8)
    assert len(flash.slots) == 63 and flash.block_stride == 1_039_680
    sizes = [s.page_bytes for s in flash.slots]
    assert (sizes.count(37_440), sizes.count(8_640), sizes.count(1_728)) == (22, 21, 20)


@pytest.mark.parametrize("geo", [G.dsv4_flash(), G.dsv4_pro(), G.dsv32(), G.tiny(),
                                 G.tiny(v32=True)], ids=lambda g: g.name)
def test_packed_invariants(geo):
    lay = jaxkv.packed(geo, 4)
    assert len(lay.regions()) == 1
    assert lay.regions()[0].nbytes == 4 * lay.block_stride
    # Offsets are cumulative and inside the block.
    off = 0
    for s in lay.slots:
        assert s.offset == off
        off += s.page_bytes
    assert off == lay.block_stride
    # Every (pool, layer) gets a slot that holds its payload; layers of one group never share.
    used = {}
    for p in lay.pools:
        assert p.payload_bytes <= p.page_bytes
        for i, pl in enumerate(p.placements):
            assert pl.col + p.page_bytes <= lay.block_stride
            assert pl.col % 4 == 0
            used.setdefault(pl.col, []).append((p.name, i))
    # Within the full-attention group (non-sliding pools) no two layers share a slot.
    full = [(p.name, i) for p in lay.pools if not p.spec.sliding for i in range(p.spec.num_layers)]
    cols = [lay.pool(n).placements[i].col for n, i in full]
    assert len(set(cols)) == len(cols)


def test_sliding_groups_split_round_robin_flash():
    lay = jaxkv.packed(G.dsv4_flash(), 4)
    swa_cols = [pl.col for pl in lay.pool("swa").placements]
    # 43 SWA layers split into groups of 22 + 21: layer j and j+1 are in different groups, so
    # exactly 22 distinct slots are used, each by at most two layers.
    assert len(set(swa_cols)) == 22
    assert max(swa_cols.count(c) for c in set(swa_cols)) == 2


def test_layer_major_regions_and_rows():
    geo = G.tiny()
    lay = jaxkv.layer_major(geo, {"swa": 5, "c4": 4, "c128": 4, "c4_indexer": 4, "c4_state": 9,
                                  "c4_indexer_state": 9, "c128_state": 17})
    assert len(lay.regions()) == len(geo.pools())
    swa = lay.pool("swa")
    assert swa.tokens_per_page == 32 and swa.page_bytes == jaxkv.DSV4_MLA.page_bytes(32)
    assert [pl.row_base for pl in swa.placements] == [0, 5, 10, 15, 20]
    assert lay.pool("c4_state").capacity == 9 and lay.pool("c4_state").sentinel == 8
    dsv4 = jaxkv.layer_major(G.dsv4_flash(), 3)
    assert dsv4.pool("swa").page_bytes == 149_760 and dsv4.pool("c4").page_bytes == 37_440
    assert dsv4.pool("c128").page_bytes == 1_728 and dsv4.pool("c4_indexer").page_bytes == 8_448


def test_layout_errors_name_argument():
    geo = G.tiny()
    with pytest.raises(ValueError, match="pages must give a page count"):
        jaxkv.layer_major(geo, {"swa": 4})
    with pytest.raises(ValueError, match=r"pages\['swa'\] must be >= 2"):
        jaxkv.layer_major(geo, {p.name: (1 if p.name == "swa" else 4) for p in geo.pools()})
    with pytest.raises(ValueError, match="num_blocks"):
        jaxkv.packed(geo, 1)
    with pytest.raises(ValueError, match="pool must be one of"):
        jaxkv.layer_major(geo, 4).pool("nope")


def test_geometry_presets():
    flash, pro = G.dsv4_flash(), G.dsv4_pro()
    assert (len(flash.c4_layers), len(flash.c128_layers)) == (21, 20)
    assert (len(pro.c4_layers), len(pro.c128_layers)) == (30, 31)
    assert G.sglang_bytes_per_full_token(pro, 0.1) == pytest.approx(23_749.84, abs=0.01)
    assert G.sglang_bytes_per_full_token(flash, 0.1) == pytest.approx(15_955.85, abs=0.01)
    assert flash.pool("c4").local_layer(2) == 0
    with pytest.raises(ValueError, match="has no 'c4' pool"):
        flash.pool("c4").local_layer(0)
