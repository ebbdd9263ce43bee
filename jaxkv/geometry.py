"""Model geometry: which cache pools a model has, their formats, layers and page sizes.

Presets: ``dsv4_flash()``, ``dsv4_pro()``, ``dsv32()`` and ``tiny(...)`` (real token formats, small
page sizes and few layers, for tests).  SPEC §1 and §3 are the source of every number here.

Pools of a DSv4 cache (SGLang naming, SPEC §3):

=====================  =======  ==============================================================
pool                   kind     content
=====================  =======  ==============================================================
``swa``                token    MLA tokens of the sliding window, every layer
``c4``                 token    one compressed MLA token per ``csa_ratio`` positions, C4 layers
``c128``               token    one per ``hca_ratio`` positions, C128 layers
``c4_indexer``         token    indexer keys, C4 layers
``c4_state``           state    float32 compressor-state rows, C4 layers
``c4_indexer_state``   state    float32 indexer-compressor-state rows, C4 layers
``c128_state``         state    float32 compressor-state rows, C128 layers
=====================  =======  ==============================================================

A V3.2 cache has ``kv`` (656-B MLA tokens) and ``indexer`` pools, every layer.

Layers of a pool are addressed by their *pool-local* index ``0 .. num_layers-1``;
``PoolSpec.layers`` maps it to the model layer id.
"""
from __future__ import annotations

import dataclasses

from jaxkv import formats as F


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """One pool of a cache, independent of its memory layout.

    Attributes:
      name: pool name (see module docstring).
      kind: ``"token"`` (paged tokens, page 0 reserved) or ``"state"`` (float32 rows whose last row
        is the sentinel ``[kv = 0 | score = -inf]``).
      fmt: the token format.
      layers: model layer ids holding this pool, in pool-local order.
      ratio: full-token positions per pool token (1 for swa/kv; 4 / 128 for compressed pools;
        for state pools the compress ratio of their layers).
      ring: rows per ring of a state pool (8 for C4, 128 for C128); 0 for token pools.
      sliding: True for pools whose memory is bounded by a window (swa, every state pool).
    """

    name: str
    kind: str
    fmt: F.TokenFormat
    layers: tuple[int, ...]
    ratio: int = 1
    ring: int = 0
    sliding: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def local_layer(self, model_layer: int) -> int:
        """Pool-local index of ``model_layer`` (ValueError if the layer has no such pool)."""
        try:
            return self.layers.index(model_layer)
        except ValueError:
            raise ValueError(f"model layer {model_layer} has no {self.name!r} pool "
                             f"(its layers are {self.layers})") from None


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static facts of one model's KV cache.

    Attributes:
      name: preset name.
      compress_ratios: per model layer: 0 = SWA-only, ``csa_ratio`` = C4 (has an indexer),
        ``hca_ratio`` = C128.  Empty for V3.2 (MLA + indexer on every layer).
      num_layers: model layers (the MTP draft layer excluded).
      mtp_layers: SWA-only draft layers.  SGLang's pools hold them; vLLM keeps the draft model's
        cache apart.  Only ``sglang_bytes_per_full_token`` counts them.
      page_size: full tokens per model page (256 DSv4, 64 V3.2).
      swa_window: sliding-window tokens (128), None for V3.2.
      csa_ratio / hca_ratio: the two compress ratios (4 and 128 in the real models).
      mla: MLA token format.
      indexer: indexer key format.
      indexer_topk, indexer_heads, indexer_dim: DSA indexer facts.
      c4_ring / c128_ring: compress-state ring rows per SWA page (8 and 128).
      c4_state_width / c4_indexer_state_width / c128_state_width: float32 state row widths
        (``2*(1+overlap)*head_dim``: 2048, 512, 1024).
      vllm_block: vLLM block sizes in tokens per pool for the packed layout (SPEC §8).
    """

    name: str
    compress_ratios: tuple[int, ...]
    num_layers: int
    mtp_layers: int
    page_size: int
    swa_window: int | None
    csa_ratio: int
    hca_ratio: int
    mla: F.TokenFormat
    indexer: F.TokenFormat
    indexer_topk: int
    indexer_heads: int = 64
    indexer_dim: int = 128
    c4_ring: int = 8
    c128_ring: int = 128
    c4_state_width: int = 2048
    c4_indexer_state_width: int = 512
    c128_state_width: int = 1024
    vllm_block: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.compress_ratios and len(self.compress_ratios) != self.num_layers:
            raise ValueError("compress_ratios must have one entry per layer")
        for r in self.compress_ratios:
            if r not in (0, self.csa_ratio, self.hca_ratio):
                raise ValueError(f"compress ratio {r} is neither 0, {self.csa_ratio} nor "
                                 f"{self.hca_ratio}")
        for r in (self.csa_ratio, self.hca_ratio) if self.is_dsv4 else ():
            if self.page_size % r:
                raise ValueError(f"page_size {self.page_size} must be a multiple of ratio {r} "
                                 "(compressed pages line up 1:1 with full pages)")

    @property
    def is_dsv4(self) -> bool:
        return self.swa_window is not None

    def layers_with_ratio(self, r: int) -> tuple[int, ...]:
        return tuple(i for i, x in enumerate(self.compress_ratios) if x == r)

    @property
    def c4_layers(self) -> tuple[int, ...]:
        return self.layers_with_ratio(self.csa_ratio)

    @property
    def c128_layers(self) -> tuple[int, ...]:
        return self.layers_with_ratio(self.hca_ratio)

    def pools(self) -> tuple[PoolSpec, ...]:
        """The pools of this model's cache, in a fixed order."""
        all_layers = tuple(range(self.num_layers))
        if not self.is_dsv4:
            return (PoolSpec("kv", "token", self.mla, all_layers),
                    PoolSpec("indexer", "token", self.indexer, all_layers))
        c4, c128 = self.c4_layers, self.c128_layers
        return (
            PoolSpec("swa", "token", self.mla, all_layers, 1, sliding=True),
            PoolSpec("c4", "token", self.mla, c4, self.csa_ratio),
            PoolSpec("c128", "token", self.mla, c128, self.hca_ratio),
            PoolSpec("c4_indexer", "token", self.indexer, c4, self.csa_ratio),
            PoolSpec("c4_state", "state", F.state_format(self.c4_state_width), c4,
                     self.csa_ratio, self.c4_ring, sliding=True),
            PoolSpec("c4_indexer_state", "state", F.state_format(self.c4_indexer_state_width),
                     c4, self.csa_ratio, self.c4_ring, sliding=True),
            PoolSpec("c128_state", "state", F.state_format(self.c128_state_width), c128,
                     self.hca_ratio, self.c128_ring, sliding=True),
        )

    def pool(self, name: str) -> PoolSpec:
        for p in self.pools():
            if p.name == name:
                return p
        raise ValueError(f"pool must be one of {[p.name for p in self.pools()]}, got {name!r}")

    def pool_tokens_per_page(self, name: str) -> int:
        """Tokens per page of a token pool in SGLang's layout: ``page_size / ratio``."""
        p = self.pool(name)
        if p.kind != "token":
            raise ValueError(f"pool {name!r} is a state pool: it has rows, not pages of tokens")
        return self.page_size // p.ratio

    def vllm_block_tokens(self, name: str) -> int:
        """Tokens (or state rows) per block of pool ``name`` in vLLM's packed layout."""
        d = dict(self.vllm_block)
        if name not in d:
            raise ValueError(f"geometry {self.name} has no vLLM block size for pool {name!r}")
        return d[name]


def _dsv4(name: str, ratios: tuple[int, ...], topk: int) -> Geometry:
    return Geometry(
        name=name, compress_ratios=ratios, num_layers=len(ratios), mtp_layers=1, page_size=256,
        swa_window=128, csa_ratio=4, hca_ratio=128, mla=F.DSV4_MLA, indexer=F.DSV4_INDEXER,
        indexer_topk=topk,
        # vLLM: the full-attention group's block is 256 tokens (C4 page 64 entries, C128 2); SWA
        # blocks of 64 tokens; compressor states of 4 (C4) and 8 (C128) rows.
        vllm_block=(("swa", 64), ("c4", 64), ("c128", 2), ("c4_indexer", 64), ("c4_state", 4),
                    ("c4_indexer_state", 4), ("c128_state", 8)))


def dsv4_flash() -> Geometry:
    """DeepSeek-V4-Flash: 43 layers ``[0,0] + [4,128]*20 + [4]`` (2 SWA-only, 21 C4, 20 C128)."""
    return _dsv4("dsv4_flash", (0, 0) + (4, 128) * 20 + (4,), topk=512)


def dsv4_pro() -> Geometry:
    """DeepSeek-V4-Pro: 61 layers ``[128,128] + [4,128]*29 + [4]`` (30 C4, 31 C128)."""
    return _dsv4("dsv4_pro", (128, 128) + (4, 128) * 29 + (4,), topk=1024)


def dsv32() -> Geometry:
    """DeepSeek-V3.2: 61 MLA layers (656-B fp8 tokens), DSA indexer on every layer, page 64."""
    return Geometry(
        name="dsv32", compress_ratios=(), num_layers=61, mtp_layers=1, page_size=64,
        swa_window=None, csa_ratio=4, hca_ratio=64, mla=F.DSV32_MLA, indexer=F.DSV4_INDEXER,
        indexer_topk=2048, vllm_block=(("kv", 64), ("indexer", 64)))


def tiny(num_layers: int = 5, *, page_size: int = 32, csa_ratio: int = 4, hca_ratio: int = 16,
         swa_window: int = 16, v32: bool = False) -> Geometry:
    """A small geometry with the real token formats, for tests.

    Layers follow DSv4's pattern ``[0] + [4, 128]*k (+ [4])`` with ``hca_ratio`` standing in for 128;
    rings are ``2 * csa_ratio`` (C4) and ``hca_ratio`` (C128), as in the real model.
    """
    if v32:
        return dataclasses.replace(dsv32(), name="tiny_v32", num_layers=num_layers,
                                   page_size=page_size, indexer_topk=8,
                                   vllm_block=(("kv", page_size), ("indexer", page_size)))
    ratios = ((0,) + (csa_ratio, hca_ratio) * num_layers)[:num_layers]
    return Geometry(
        name="tiny", compress_ratios=ratios, num_layers=num_layers, mtp_layers=0,
        page_size=page_size, swa_window=swa_window, csa_ratio=csa_ratio, hca_ratio=hca_ratio,
        mla=F.DSV4_MLA, indexer=F.DSV4_INDEXER, indexer_topk=8, c4_ring=2 * csa_ratio,
        c128_ring=hca_ratio,
        vllm_block=(("swa", page_size // 4), ("c4", page_size // csa_ratio),
                    ("c128", page_size // hca_ratio), ("c4_indexer", page_size // csa_ratio),
                    ("c4_state", csa_ratio), ("c4_indexer_state", csa_ratio),
                    ("c128_state", 8)))


PRESETS = {"dsv4_flash": dsv4_flash, "dsv4_pro": dsv4_pro, "dsv32": dsv32}


# ---------------------------------------------------------------------------------------------
# Sizing


def sglang_bytes_per_full_token(geo: Geometry, swa_ratio: float) -> float:
    """SGLang's DSv4 memory formula: device bytes per *full* token slot.

    ``r * [(L + mtp) * 584 + L4 * (8*8192 + 8*2048)/128 + L128 * (128*4096)/128]
    + L4 * 584/4 + L128 * 584/128 + L4 * 132/4`` with ``r = swa_ratio`` — SWA tokens of every layer
    (the MTP layer included), compress states sized at ring rows per 128 (window) SWA tokens, and
    the compressed pools.  DSv4-Pro at ``r = 0.1`` gives 23,749.84 B, the figure SGLang logs.
    """
    if not geo.is_dsv4:
        raise ValueError("sglang_bytes_per_full_token is defined for DSv4 geometries")
    L4, L128 = len(geo.c4_layers), len(geo.c128_layers)
    tok, idx = geo.mla.token_bytes, geo.indexer.token_bytes
    w = geo.swa_window
    state_per_swa_token = (
        L4 * (geo.c4_ring * 4 * geo.c4_state_width + geo.c4_ring * 4 * geo.c4_indexer_state_width)
        + L128 * geo.c128_ring * 4 * geo.c128_state_width) / w
    swa = (geo.num_layers + geo.mtp_layers) * tok
    return (swa_ratio * (swa + state_per_swa_token)
            + L4 * tok / geo.csa_ratio + L128 * tok / geo.hca_ratio + L4 * idx / geo.csa_ratio)
