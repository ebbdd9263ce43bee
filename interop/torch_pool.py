"""Torch-facing DeepSeek-V4 cache pool (SGLang's layout and method names), and vLLM-style views.

``DSV4TorchPool`` is a *torch-owned* cache: one ``torch.uint8[num_layers * pages, page_bytes]``
tensor per pool, laid out exactly like ``jaxkv.layer_major(geo, pages)`` (SGLang's layer-major
layout), so a page written here is byte-identical to one written by ``jaxkv.set_tokens`` into a JAX
cache of that layout.  A torch engine can drop it in:

=====================================  =========================================================
method                                 SGLang equivalent
=====================================  =========================================================
``set_key_buffer(pool, layer_id, ...)`` ``SetKAndS`` for the MLA pools (swa / c4 / c128)
``get_k_and_s(pool, layer_id, loc)``    ``GetKAndS``: the exact inverse gather
``set_index_k_scale_buffer(...)``       indexer ``SetKAndS`` (c4_indexer)
``get_index_k_scale_buffer(...)``       indexer ``GetKAndS``
``set_state(pool, layer_id, loc, r)``   compress-state row writes (sentinel row never written)
``get_state(pool, layer_id, loc)``      compress-state row reads (-1 reads the sentinel)
``get_key_buffer(pool, layer_id)``      the layer's raw pages ``uint8[pages, page_bytes]``
``get_cpu_copy(indices)``               retract: every pool of a request to (pinned) host memory
``load_cpu_copy(copy, indices)``        resume into new locations, bit-exact
``get_contiguous_buf_infos()``          ``(data_ptrs, data_lens, item_lens)`` per buffer
=====================================  =========================================================

``layer_id`` is the *model* layer id, as in SGLang (a layer without that pool is a ValueError).

Kernels: the Triton kernels of ``jaxkv.kernels.triton_kernels`` called directly on the torch
tensors (``impl="triton"``; on CPU tensors they run in Triton's interpreter).  ``impl="torch"`` is
a plain-torch reference (index arithmetic + advanced indexing) used by default on CPU, where the
interpreter is slow.  ``impl="auto"``: Triton on CUDA, torch on CPU.

Index translations (full -> SWA / compressed / state locations) are ``jaxkv.locs`` functions run in
JAX on zero-copy DLPack views of the torch index tensors (``jaxkv.interop.from_torch``), and their
results come back zero-copy (``to_torch``).

Ownership: the pool owns its tensors; ``as_jax_cache()`` gives a read-only ``jaxkv.Cache`` view
(never donate it: ``jaxkv.interop.donate_safe`` refuses).  The other direction — a JAX-owned packed
cache with torch per-layer views — is ``vllm_layer_views(cache)``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import numpy as np
import torch

import jaxkv
from jaxkv import formats as F
from jaxkv import locs as L
from jaxkv.cache import Cache, token_addressing
from jaxkv.geometry import Geometry
from jaxkv.kernels.addressing import TokenAddressing
from jaxkv.interop.dlpack import from_torch, to_torch

__all__ = ["DSV4TorchPool", "DSV4CpuCopy", "vllm_layer_views", "IMPLS"]

IMPLS = ("auto", "triton", "torch")

_TORCH_DTYPE = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32,
                F._fp8: torch.float8_e4m3fn, F._bf16: torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# vLLM-style views of a JAX-owned packed cache


def vllm_layer_views(cache: Cache) -> dict[str, list[torch.Tensor]]:
    """Per-layer torch views of a JAX-owned cache, exactly as vLLM slices its raw KV tensor.

    For the packed layout (one ``uint8[num_blocks, block_stride]`` buffer)::

        raw  = to_torch(cache.buffers[0]).view(-1)                      # zero-copy
        view = raw.view(-1, block_stride)[:, off : off + page_bytes]     # per (pool, layer)

    For the layer-major layout each layer's view is its row range of its pool's buffer.

    Returns:
      ``{pool: [uint8[num_pages, page_bytes] per pool-local layer]}`` — strided views into the JAX
      buffer (no copy).  ``view[p]`` equals ``jaxkv.read_pages(cache, pool, layer)[p]``.  While
      the views live the cache cannot be donated (``donate_safe``).
    """
    if not isinstance(cache, Cache):
        raise ValueError(f"cache must be a jaxkv Cache, got {type(cache).__name__}")
    layout = cache.layout
    raws = [to_torch(b).view(-1) for b in cache.buffers]
    out = {}
    for p in layout.pools:
        views = []
        for pl in p.placements:
            stride = layout.buffer_shapes[pl.buffer][1]
            rows = raws[pl.buffer].view(-1, stride)
            if layout.kind == "packed":
                views.append(rows[:, pl.col:pl.col + p.page_bytes])
            else:
                stop = pl.row_base + p.num_pages * pl.row_step
                views.append(rows[pl.row_base:stop:pl.row_step, pl.col:pl.col + p.page_bytes])
        out[p.name] = views
    return out


# ---------------------------------------------------------------------------------------------
# Kernels: Triton (direct on torch tensors) or a plain-torch reference


def _token_view(buf: torch.Tensor, a: TokenAddressing, col: int, part: str) -> torch.Tensor:
    """``buf`` seen as ``[rows, tpp, width]`` token windows of one part, for layers at ``col``."""
    C = buf.shape[1]
    if part == "value":
        return torch.as_strided(buf, (buf.shape[0], a.tpp, a.value_bytes), (C, a.value_bytes, 1),
                                buf.storage_offset() + col)
    return torch.as_strided(buf, (buf.shape[0], a.tpp, a.scale_bytes), (C, a.scale_stride, 1),
                            buf.storage_offset() + col + a.tpp * a.value_bytes)


def _rows_tokens(locs: torch.Tensor, a: TokenAddressing):
    """int64 rows[L, N], token-in-page t[N] and the validity mask [N]."""
    valid = (locs >= 0) & (locs < a.capacity)
    safe = torch.where(valid, locs, torch.zeros_like(locs)).to(torch.int64)
    page, t = safe // a.tpp, safe % a.tpp
    rb = torch.tensor(a.row_base, dtype=torch.int64, device=locs.device)[:, None]
    return rb + page[None] * a.row_step, t, valid


def _torch_gather(buf, locs, a: TokenAddressing):
    """Plain-torch twin of ``reference.gather_tokens`` (advanced indexing on strided views)."""
    rows, t, valid = _rows_tokens(locs, a)
    out = []
    for part, width in (("value", a.value_bytes), ("scale", a.scale_bytes)):
        x = torch.zeros((a.num_layers, locs.shape[0], width), dtype=torch.uint8,
                        device=buf.device)
        if width:
            for col in sorted(set(a.col_base)):
                ls = [i for i, c in enumerate(a.col_base) if c == col]
                view = _token_view(buf, a, col, part)
                x[ls] = view[rows[ls], t[None].expand(len(ls), -1)]
            x[:, ~valid] = 0
        out.append(x)
    return out[0], out[1]


def _torch_scatter(buf, locs, value, scale, a: TokenAddressing) -> None:
    """Plain-torch twin of ``reference.scatter_tokens`` (in place; invalid locations skipped)."""
    rows, t, valid = _rows_tokens(locs, a)
    rows, t = rows[:, valid], t[valid]
    for part, data, width in (("value", value, a.value_bytes), ("scale", scale, a.scale_bytes)):
        if not width:
            continue
        data = data[:, valid]
        for col in sorted(set(a.col_base)):
            ls = [i for i, c in enumerate(a.col_base) if c == col]
            view = _token_view(buf, a, col, part)
            view[rows[ls], t[None].expand(len(ls), -1)] = data[ls]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when JAX can alias it (64-B aligned, contiguous), else a contiguous copy.

    Index tensors handed to a pool are often slices of bigger tables (``req_to_token[i, :n]``);
    they are small, so copying them is cheap and keeps the DLPack exchange zero-copy.
    """
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _triton():
    from jaxkv.kernels import triton_kernels
    return triton_kernels


# ---------------------------------------------------------------------------------------------
# Fields <-> bytes (torch)


def _field_bytes(x: torch.Tensor, dtype: np.dtype, count: int, n: int, arg: str) -> torch.Tensor:
    want = _TORCH_DTYPE[np.dtype(dtype)]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor of {want}, got {type(x).__name__}")
    if x.dtype != want:
        raise ValueError(f"{arg} must have dtype {want}, got {x.dtype}")
    if tuple(x.shape) != (n, count):
        raise ValueError(f"{arg} must have shape [N={n}, {count}], got {tuple(x.shape)}")
    return x.contiguous().view(torch.uint8).reshape(n, count * np.dtype(dtype).itemsize)


def _to_parts(fmt: F.TokenFormat, fields: Mapping[str, torch.Tensor], n: int):
    """Typed fields -> (value uint8[N, V], scale uint8[N, scale_bytes])."""
    parts = {"value": [], "scale": []}
    for f in fmt.fields:
        parts[f.part].append((f.offset, _field_bytes(fields[f.name], f.dtype, f.count, n, f.name)))
    out = []
    for part in ("value", "scale"):
        chunks = [b for _, b in sorted(parts[part], key=lambda p: p[0])]
        out.append(torch.cat(chunks, dim=-1) if chunks else None)
    return out[0], out[1]


def _from_parts(fmt: F.TokenFormat, value: torch.Tensor, scale: torch.Tensor):
    """(value uint8[N, V], scale uint8[N, sb]) -> the format's tokens NamedTuple of torch tensors."""
    parts = {"value": value, "scale": scale}
    vals = {}
    for f in fmt.fields:
        raw = parts[f.part][..., f.offset:f.offset + f.nbytes].contiguous()
        vals[f.name] = raw.view(_TORCH_DTYPE[np.dtype(f.dtype)])
    return fmt.tokens_type(**vals)


# ---------------------------------------------------------------------------------------------
# Retract copies


@dataclasses.dataclass
class DSV4CpuCopy:
    """A request's cache in host memory (from ``DSV4TorchPool.get_cpu_copy``).

    Attributes:
      geometry: the pool's geometry (a copy loads only into a pool of the same geometry).
      num_tokens: N, the number of full indices saved.
      host: one ``uint8[L * M * (V + sb)]`` host buffer per pool, in layout order (pinned when
        the pool is on CUDA; allocated pool by pool as the plan of each becomes known).
      parts: ``{pool: (value uint8[L, M, V], scale uint8[L, M, sb])}``, views into that pool's
        ``host`` buffer: the pool's M distinct valid locations, all layers.
      slots: ``{pool: int32[N]}`` (CPU; rows of one pinned ``int32[pools, N]`` tensor when the
        pool is on CUDA): which saved row holds position i (rows are the distinct valid
        locations in ascending order), -1 where the position was invalid when saved (SWA:
        slot).  ``nbytes`` counts ``host`` only.
    """

    geometry: Geometry
    num_tokens: int
    host: tuple
    parts: dict
    slots: dict

    @property
    def valid(self) -> dict:
        """``{pool: bool[N]}``: positions valid when saved."""
        return {k: v >= 0 for k, v in self.slots.items()}

    @property
    def nbytes(self) -> int:
        return int(sum(h.numel() for h in self.host))


@functools.partial(jax.jit, static_argnames=("ratios", "rings", "swa_page"))
def _translate(table, full, ratios, rings, swa_page):
    """Every pool's locations from full locations (one compiled call)."""
    swa, swa_valid = L.swa_locs(table, full)
    comp = tuple(L.compressed_locs(full, r) for r in ratios)
    states = tuple(L.state_rows(swa, ring, swa_page) for ring in rings)
    return swa, swa_valid, comp, states


# ---------------------------------------------------------------------------------------------
# The pool


class DSV4TorchPool:
    """A torch-owned DeepSeek-V4 KV cache in SGLang's layer-major layout.

    Args:
      geo: a DSv4 geometry (``jaxkv.dsv4_flash()``, ``dsv4_pro()``, ``tiny()``).
      pages: per pool, pages per layer (token pools) or rows per layer including the sentinel
        (state pools); or one int for every pool — as ``jaxkv.layer_major``.
      device: torch device of the buffers.
      impl: ``"auto" | "triton" | "torch"`` (see module docstring).
      indexer_align: page alignment of the indexer pool (None: SGLang's, unaligned).
      full_size: when given, allocate ``full_to_swa_index_mapping`` (int32[full_size + page + 1],
        zeros, last entry -1) for the engine's allocator to fill; else assign your own table.

    Attributes:
      layout: the ``jaxkv.Layout`` (``layer_major``) the bytes follow.
      buffers: ``tuple[torch.uint8[rows, page_bytes]]``, one per pool, in ``layout.pools`` order.
      full_to_swa_index_mapping: int32 table used by ``get_cpu_copy`` / ``load_cpu_copy``.
    """

    def __init__(self, geo: Geometry, pages: Mapping[str, int] | int, *,
                 device: str | torch.device = "cpu", impl: str = "auto",
                 indexer_align: int | None = None, full_size: int | None = None):
        if not isinstance(geo, Geometry) or not geo.is_dsv4:
            raise ValueError("geo must be a DSv4 jaxkv Geometry (dsv4_flash, dsv4_pro, tiny)")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.geometry = geo
        self.layout = jaxkv.layer_major(geo, pages, indexer_align)
        self.device = torch.device(device)
        self.impl = impl
        self.buffers = tuple(torch.zeros(s, dtype=torch.uint8, device=self.device)
                             for s in self.layout.buffer_shapes)
        self._addr = {p.name: token_addressing(self.layout, p.name) for p in self.layout.pools}
        for p in self.layout.pools:  # stored sentinel rows [kv 0 | score -inf] (SGLang)
            if p.spec.kind == "state" and p.sentinel is not None:
                b, a = self._addr[p.name]
                val = self._sentinel_bytes(p).expand(a.num_layers, 1, 4 * p.spec.fmt.width)
                loc = torch.tensor([p.sentinel], dtype=torch.int32, device=self.device)
                self._scatter(b, loc, val.contiguous(), None, a)
        self.full_to_swa_index_mapping = None
        if full_size is not None:
            t = torch.zeros(int(full_size) + geo.page_size + 1, dtype=torch.int32,
                            device=self.device)
            t[-1] = -1
            self.full_to_swa_index_mapping = t

    # -- kernels ---------------------------------------------------------------------------

    def _use_triton(self) -> bool:
        return self.impl == "triton" or (self.impl == "auto" and self.device.type == "cuda")

    def _gather(self, b: int, locs: torch.Tensor, a: TokenAddressing):
        if self._use_triton():
            return _triton().gather_tokens_torch(self.buffers[b], locs, a)
        return _torch_gather(self.buffers[b], locs, a)

    def _scatter(self, b: int, locs, value, scale, a: TokenAddressing) -> None:
        if scale is None:
            scale = torch.zeros((a.num_layers, locs.shape[0], a.scale_bytes), dtype=torch.uint8,
                                device=self.device)
        if self._use_triton():
            _triton().scatter_tokens_torch(self.buffers[b], locs, value, scale, a)
        else:
            _torch_scatter(self.buffers[b], locs, value, scale, a)

    # -- validation ------------------------------------------------------------------------

    def _pool_layer(self, pool: str, layer_id: int, kind: str | None = None,
                    fmt: F.TokenFormat | None = None):
        p = self.layout.pool(pool)
        if kind is not None and p.spec.kind != kind:
            raise ValueError(f"pool {pool!r} is a {p.spec.kind} pool; use "
                             f"{'set_state/get_state' if p.spec.kind == 'state' else 'the token accessors'}")
        if fmt is not None and p.spec.fmt is not fmt:
            raise ValueError(f"pool {pool!r} holds {p.spec.fmt.name} tokens, not {fmt.name}")
        if isinstance(layer_id, bool) or not isinstance(layer_id, (int, np.integer)):
            raise ValueError(f"layer_id must be an int model layer id, got {layer_id!r}")
        local = p.spec.local_layer(int(layer_id))
        return p, local

    def _locs(self, loc, cap: int, arg: str = "loc", check: bool = True) -> torch.Tensor:
        """int32[N] on the pool's device; -1 allowed; other out-of-range values are an error."""
        if not isinstance(loc, torch.Tensor):
            raise ValueError(f"{arg} must be a 1-D integer torch.Tensor, got {type(loc).__name__}")
        if loc.dim() != 1 or loc.dtype.is_floating_point or loc.dtype == torch.bool \
                or loc.is_complex():
            raise ValueError(f"{arg} must be a 1-D integer tensor, got {loc.dtype} "
                             f"{tuple(loc.shape)}")
        if check and loc.numel():
            bad = (loc < -1) | (loc >= cap)
            if bool(bad.any()):
                i = int(torch.argmax(bad.to(torch.int32)))
                raise ValueError(f"{arg}[{i}] = {int(loc[i])} is outside [0, {cap}) "
                                 "(-1 is the only allowed padding value)")
        return loc.to(device=self.device, dtype=torch.int32).contiguous()

    # -- token writes / reads (SetKAndS / GetKAndS) ----------------------------------------

    def _set(self, pool, layer_id, loc, fields, fmt, kind, check):
        p, local = self._pool_layer(pool, layer_id, kind, fmt)
        loc = self._locs(loc, p.capacity, check=check)
        value, scale = _to_parts(p.spec.fmt, fields, loc.shape[0])
        value, scale = value.to(self.device), (None if scale is None else scale.to(self.device))
        if p.sentinel is not None:  # the stored sentinel row is never overwritten
            loc = torch.where(loc == p.sentinel, torch.full_like(loc, -1), loc)
        b, a = self._addr[pool]
        a1 = a.select((local,))
        self._scatter(b, loc, value[None], None if scale is None else scale[None], a1)

    def _get(self, pool, layer_id, loc, fmt, kind, check):
        p, local = self._pool_layer(pool, layer_id, kind, fmt)
        loc = self._locs(loc, p.capacity, check=check)
        b, a = self._addr[pool]
        value, scale = self._gather(b, loc, a.select((local,)))
        value, scale = value[0], scale[0]
        if p.spec.kind == "state":  # invalid locations read the sentinel value [0 | -inf]
            value = torch.where((loc < 0)[:, None], self._sentinel_bytes(p), value)
        return _from_parts(p.spec.fmt, value, scale)

    def _sentinel_bytes(self, p) -> torch.Tensor:
        w = p.spec.fmt.width
        row = torch.zeros(w, dtype=torch.float32)
        row[w // 2:] = -float("inf")
        return row.view(torch.uint8).to(self.device)

    def set_key_buffer(self, pool: str, layer_id: int, loc: torch.Tensor, nope: torch.Tensor,
                       rope: torch.Tensor, scale: torch.Tensor, *, check: bool = True) -> None:
        """``SetKAndS``: writes MLA tokens into ``pool`` (``swa``, ``c4`` or ``c128``).

        Args:
          pool: an MLA token pool.
          layer_id: model layer id.
          loc: int[N] pool locations; -1 is skipped.
          nope: float8_e4m3fn[N, 448]; rope: bfloat16[N, 64]; scale: uint8[N, 7] (UE8M0).
          check: validate ``loc`` (a device sync on CUDA); invalid ones are masked regardless.
        """
        self._set(pool, layer_id, loc, {"nope": nope, "rope": rope, "scale": scale},
                  self.geometry.mla, "token", check)

    def get_k_and_s(self, pool: str, layer_id: int, loc: torch.Tensor, *,
                    check: bool = True) -> F.MLATokens:
        """``GetKAndS``: reads MLA tokens, the exact inverse of ``set_key_buffer``.

        Returns:
          ``MLATokens(nope fp8[N, 448], rope bf16[N, 64], scale uint8[N, 7])`` (torch); -1 reads
          zeros.
        """
        return self._get(pool, layer_id, loc, self.geometry.mla, "token", check)

    def set_index_k_scale_buffer(self, layer_id: int, loc: torch.Tensor, index_k: torch.Tensor,
                                 index_k_scale: torch.Tensor, *, check: bool = True) -> None:
        """Indexer ``SetKAndS``: ``index_k`` fp8[N, 128], ``index_k_scale`` float32[N, 1]."""
        self._set("c4_indexer", layer_id, loc, {"key": index_k, "scale": index_k_scale},
                  self.geometry.indexer, "token", check)

    def get_index_k_scale_buffer(self, layer_id: int, loc: torch.Tensor, *,
                                 check: bool = True) -> F.IndexerTokens:
        """Indexer ``GetKAndS``: ``IndexerTokens(key fp8[N, 128], scale float32[N, 1])``."""
        return self._get("c4_indexer", layer_id, loc, self.geometry.indexer, "token", check)

    def set_state(self, pool: str, layer_id: int, loc: torch.Tensor, rows: torch.Tensor, *,
                  check: bool = True) -> None:
        """Writes float32[N, W] compress-state rows; writes aimed at the sentinel row are dropped;
        duplicate locations must carry identical rows."""
        p = self.layout.pool(pool)
        self._set(pool, layer_id, loc, {"row": rows}, p.spec.fmt, "state", check)

    def get_state(self, pool: str, layer_id: int, loc: torch.Tensor, *,
                  check: bool = True) -> torch.Tensor:
        """Reads float32[N, W] compress-state rows; -1 reads the sentinel ``[0 | -inf]``."""
        p = self.layout.pool(pool)
        return self._get(pool, layer_id, loc, p.spec.fmt, "state", check).row

    def get_key_buffer(self, pool: str, layer_id: int) -> torch.Tensor:
        """The raw pages of one layer: a view ``uint8[num_pages, page_bytes]`` of the pool buffer."""
        p, local = self._pool_layer(pool, layer_id)
        pl = p.placements[local]
        return self.buffers[pl.buffer][pl.row_base:pl.row_base + p.num_pages * pl.row_step]

    # -- memory registration / views -------------------------------------------------------

    def get_contiguous_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """Per buffer (one per pool, ``layout.pools`` order): ``(data_ptrs, data_lens, item_lens)``
        — device address, total bytes, and bytes of one page (the unit a transfer moves)."""
        ptrs = [int(b.data_ptr()) for b in self.buffers]
        lens = [int(b.numel()) for b in self.buffers]
        items = [int(p.page_bytes) for p in self.layout.pools]
        return ptrs, lens, items

    def as_jax_cache(self) -> Cache:
        """A read-only ``jaxkv.Cache`` aliasing this pool's tensors (zero-copy, DLPack).

        Use it with jaxkv's read functions (``get_tokens``, ``read_pages``, ...).  Never donate
        it (``donate_safe`` refuses: the memory is torch's).  Re-create it after torch writes so
        that the DLPack stream handshake orders JAX after them.
        """
        return Cache(tuple(from_torch(b) for b in self.buffers), self.layout)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    # -- retract / resume ------------------------------------------------------------------

    def _full(self, indices, arg: str = "indices") -> torch.Tensor:
        table = self.full_to_swa_index_mapping
        if table is None:
            raise ValueError("full_to_swa_index_mapping is not set: pass full_size= to the "
                             "constructor or assign the allocator's int32 table")
        if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype != torch.int32:
            raise ValueError("full_to_swa_index_mapping must be a 1-D torch.int32 tensor")
        return self._locs(indices, table.shape[0] - 1, arg)

    def _all_locs(self, full: torch.Tensor, check: bool = True):
        """{pool: (int32[N] locs on device, bool[N] valid)} from full locations, via jaxkv.locs.

        ``check``: one host sync that every location fits its pool (``_check_cap``); with False
        the caller checks each pool itself (``_plan_save_iter``: one sync per pool)."""
        geo = self.geometry
        table = self.full_to_swa_index_mapping.to(self.device)
        token = [p for p in self.layout.pools if p.spec.kind == "token" and p.name != "swa"]
        state = [p for p in self.layout.pools if p.spec.kind == "state"]
        ratios = tuple(p.spec.ratio for p in token)
        rings = tuple(p.spec.ring for p in state)
        swa, swa_valid, comp, states = _translate(from_torch(_aligned(table)),
                                                  from_torch(_aligned(full)),
                                                  ratios=ratios, rings=rings,
                                                  swa_page=geo.page_size)
        out = {"swa": (to_torch(swa), to_torch(swa_valid))}
        for p, (loc, valid) in zip(token, comp):
            out[p.name] = (to_torch(loc), to_torch(valid))
        for p, rows in zip(state, states):
            out[p.name] = (torch.where(out["swa"][1], to_torch(rows), -1), out["swa"][1])
        # locations must exist in the pools (a sizing error): one host sync for every pool
        pools = [p for p in self.layout.pools if out[p.name][0].numel()]
        if check and pools:
            top = torch.stack([out[p.name][0].max().to(torch.int64) for p in pools]).tolist()
            for p, hi in zip(pools, top):
                self._check_cap(p, hi)
        return out

    @staticmethod
    def _check_cap(p, hi: int) -> None:
        cap = p.capacity if p.sentinel is None else p.sentinel
        if hi >= cap:
            raise ValueError(f"pool {p.name!r} is too small for these indices: location "
                             f"{hi} >= {cap}"
                             f"{'' if p.sentinel is None else ' (the sentinel row)'}")

    def _side_stream(self):
        """A CUDA stream for host copies, so they overlap the kernels of the next chunk."""
        s = getattr(self, "_copy_stream", None)
        if s is None:
            s = self._copy_stream = torch.cuda.Stream(self.device)
        return s

    def _chunks(self, a: TokenAddressing, m: int):
        """Layer ranges ``[(l0, l1)]`` of ~``COPY_CHUNK_BYTES`` each (the pipelining unit)."""
        per_layer = max(1, m * (a.value_bytes + a.scale_bytes))
        step = max(1, self.COPY_CHUNK_BYTES // per_layer)
        return [(l0, min(l0 + step, a.num_layers)) for l0 in range(0, a.num_layers, step)]

    #: bytes per pipelined chunk of ``get_cpu_copy`` / ``load_cpu_copy`` (whole layers, >= 1)
    COPY_CHUNK_BYTES = 256 << 20

    def _plan_save_iter(self, full: torch.Tensor):
        """Yields ``(pool, buffer, addressing, uniq int32[m], slot int32[N], m)`` pool by pool.

        Per pool, the distinct valid locations (ascending) and, per position, which of them it
        reads (-1: invalid), computed on the device with sorts (no ``torch.unique`` /
        ``nonzero``, which synchronise once each).  One host sync per pool (its count and its
        largest location, checked against the pool's capacity), made just before that pool is
        yielded: a consumer that enqueues the pool's gathers and copies before asking for the
        next one overlaps every later pool's plan with the copies already running.
        """
        n = int(full.shape[0])
        empty = torch.zeros(0, dtype=torch.int32, device=self.device)
        if not n:
            for p in self.layout.pools:
                yield (p, *self._addr[p.name], empty, empty, 0)
            return
        locs = self._all_locs(full, check=False)
        big = torch.iinfo(torch.int32).max  # sorts after every real location (< capacity)
        for p in self.layout.pools:
            loc, valid = locs[p.name]
            key, perm = torch.sort(torch.where(valid, loc, torch.full_like(loc, big)))
            new = torch.ones(n, dtype=torch.bool, device=self.device)
            new[1:] = key[1:] != key[:-1]
            gid = torch.cumsum(new, 0) - 1  # group id of each sorted entry (int64)
            real = key != big
            uniq = torch.zeros(n, dtype=torch.int32, device=self.device)
            uniq.scatter_(0, gid, torch.where(real, key, torch.zeros_like(key)))
            slot = torch.empty(n, dtype=torch.int32, device=self.device)
            slot.scatter_(0, perm, torch.where(real, gid, torch.full_like(gid, -1)).to(torch.int32))
            m, hi = torch.stack([(new & real).sum(), loc.max().to(torch.int64)]).tolist()
            self._check_cap(p, hi)  # before any gather of this pool
            yield (p, *self._addr[p.name], uniq[:m], slot, m)

    def _plan_save(self, full: torch.Tensor):
        """The whole plan as a list (``_plan_save_iter``; used by the benchmark's step rows)."""
        return list(self._plan_save_iter(full))

    def get_cpu_copy(self, indices: torch.Tensor) -> DSV4CpuCopy:
        """Retract: copies every pool's data of a request to host memory.

        From the request's full locations ``indices`` (int[N]), derives (with ``jaxkv.locs``) the
        SWA locations (valid where ``full_to_swa[f] > 0``), the C4 / C128 / C4-indexer locations
        (``(f + 1) % r == 0``) and the page-scoped compress-state and indexer-state rows of every
        compressed layer.  Per pool, only the *distinct valid* locations are saved (many
        positions share one state row; invalid positions hold nothing).

        Pipeline (CUDA): the translation runs once for every pool (no host sync); then pool by
        pool: its distinct locations (sorts on the device, one host sync for its count and
        capacity check), a pinned buffer of its size, its gathers in chunks of whole layers
        (~``COPY_CHUNK_BYTES``) on the current stream, and each chunk's device-to-host copy on
        a side stream as soon as that chunk is gathered.  Only the first pool's plan is on the
        critical path: every later pool is planned while the earlier pools' copies run.  The
        per-position slots go to pinned memory on the side stream.  One synchronisation at the
        end.

        Returns:
          A ``DSV4CpuCopy`` (complete when this returns).  Bit-exact with the device bytes.
        """
        full = self._full(indices)
        n = int(full.shape[0])
        return self._run_save(self._plan_save_iter(full), n)

    def _run_save(self, plans, n: int) -> DSV4CpuCopy:
        """Gathers + copies pool by pool as ``plans`` (an iterable, e.g. ``_plan_save_iter``)
        yields them: each pool's copies are enqueued before the next pool's plan is awaited."""
        cuda = self.device.type == "cuda"
        slots_host = torch.empty((len(self.layout.pools), n), dtype=torch.int32, pin_memory=cuda)
        if cuda:
            main, side = torch.cuda.current_stream(self.device), self._side_stream()
        parts, hosts, names = {}, [], []
        for k, (p, b, a, uniq, slot, m) in enumerate(plans):  # gather (current) -> host (side)
            L, V, S = a.num_layers, a.value_bytes, a.scale_bytes
            host = torch.empty(L * m * (V + S), dtype=torch.uint8, pin_memory=cuda)
            hv = host[:L * m * V].view(L, m, V)
            hs = host[L * m * V:].view(L, m, S)
            hosts.append(host)
            names.append(p.name)
            parts[p.name] = (hv, hs)
            if cuda:
                side.wait_stream(main)  # this pool's plan (slot) is done on the current stream
                with torch.cuda.stream(side):
                    slots_host[k].copy_(slot, non_blocking=True)
                    slot.record_stream(side)
            else:
                slots_host[k].copy_(slot)
            if not m:
                continue
            for l0, l1 in self._chunks(a, m):
                v, s = self._gather(b, uniq, a.select(tuple(range(l0, l1))))
                pairs = [(hv[l0:l1], v)] + ([(hs[l0:l1], s)] if S else [])
                if cuda:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        for h, x in pairs:
                            h.copy_(x, non_blocking=True)
                            x.record_stream(side)
                else:
                    for h, x in pairs:
                        h.copy_(x)
        if cuda:
            side.synchronize()
        slots = {name: slots_host[k] for k, name in enumerate(names)}
        return DSV4CpuCopy(self.geometry, n, tuple(hosts), parts, slots)

    def load_cpu_copy(self, copy: DSV4CpuCopy, indices: torch.Tensor) -> None:
        """Resume: writes a ``get_cpu_copy`` result back at new full locations ``indices``.

        Translates ``indices`` like ``get_cpu_copy`` and restores only positions valid both when
        saved and now (``new_mask & old_mask``): a tail-only SWA allocation restores the rows it
        has and writes nothing into SWA page 0 or another request's rows.  Each saved row is
        written to every new location of the positions that shared it (such positions must map
        to one new row, as they do when SWA pages keep ``s % page == f % page``).

        Pipeline (CUDA): every host-to-device copy (slots first, then each pool in chunks of
        whole layers) is enqueued on a side stream *before* the plan is computed, so the plan's
        host syncs hide under the copies; each chunk's scatter on the current stream waits for
        that chunk's copy only.  The call returns without a host synchronisation (work is
        ordered on the current stream).

        Raises:
          ValueError: ``copy`` is not a ``DSV4CpuCopy`` of this geometry, or ``len(indices)``
            differs from the saved count (nothing is written).
        """
        if not isinstance(copy, DSV4CpuCopy):
            raise ValueError(f"copy must be a DSV4CpuCopy, got {type(copy).__name__}")
        if copy.geometry != self.geometry:
            raise ValueError(f"copy was made from a {copy.geometry.name} pool, this pool is "
                             f"{self.geometry.name}")
        full = self._full(indices)
        if full.shape[0] != copy.num_tokens:
            raise ValueError(f"indices has {full.shape[0]} entries but the copy holds "
                             f"{copy.num_tokens} tokens")
        if copy.num_tokens == 0:
            return
        staged = self._stage_load(copy)
        plans = self._plan_load(copy, full, staged)
        self._run_load(plans, staged)

    def _stage_load(self, copy: DSV4CpuCopy) -> dict:
        """Enqueues every host-to-device copy of ``copy`` (CUDA: on the side stream).

        Returns ``{"slots": {pool: int32[N] device}, "slots_ready": event | None,
        pool: [(l0, l1, value uint8[l1-l0, m, V], scale uint8[l1-l0, m, sb], event | None)]}``.
        """
        out, cuda = {}, self.device.type == "cuda"
        if not cuda:
            out["slots"] = {k: v.to(self.device) for k, v in copy.slots.items()}
            out["slots_ready"] = None
            for p in self.layout.pools:  # the same chunks as on CUDA (views, no copies)
                v, s = copy.parts[p.name]
                _, a = self._addr[p.name]
                out[p.name] = [(l0, l1, v[l0:l1], s[l0:l1], None)
                               for l0, l1 in self._chunks(a, v.shape[1])] if v.shape[1] else []
            return out
        main, side = torch.cuda.current_stream(self.device), self._side_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out["slots"] = {k: v.to(self.device, non_blocking=True)
                            for k, v in copy.slots.items()}
            ev = torch.cuda.Event()
            ev.record(side)
            out["slots_ready"] = ev
            for p in self.layout.pools:
                v, s = copy.parts[p.name]
                chunks = []
                if v.shape[1]:
                    _, a = self._addr[p.name]
                    for l0, l1 in self._chunks(a, v.shape[1]):
                        vd = v[l0:l1].to(self.device, non_blocking=True)
                        sd = s[l0:l1].to(self.device, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(side)
                        chunks.append((l0, l1, vd, sd, ev))
                out[p.name] = chunks
        return out

    def _plan_load(self, copy: DSV4CpuCopy, full: torch.Tensor, staged: dict):
        """``[(pool, rows int64[K], new int32[K], identity)]``: saved row -> new location pairs.

        Runs on the current stream; on CUDA it waits for the slots' upload only (the first copy
        on the side stream), not for the parts."""
        slots = staged["slots"]
        if self.device.type == "cuda":
            main = torch.cuda.current_stream(self.device)
            main.wait_event(staged["slots_ready"])
            for x in slots.values():
                x.record_stream(main)
        locs = self._all_locs(full)
        plans = []
        for p in self.layout.pools:  # where each saved row goes (host syncs here)
            m = copy.parts[p.name][0].shape[1]
            if m == 0:
                continue
            loc, new_valid = locs[p.name]
            slot = slots[p.name].to(torch.int64)
            idx = torch.nonzero(new_valid & (slot >= 0)).squeeze(1)
            if p.sentinel is not None:  # never write the stored sentinel row
                idx = idx[loc[idx] != p.sentinel]
            # distinct (saved row, new location) pairs: duplicates carry the same bytes
            cap = p.capacity
            pair = torch.unique(slot[idx] * cap + loc[idx].to(torch.int64))
            rows, new = pair // cap, (pair % cap).to(torch.int32)
            identity = rows.numel() == m and torch.equal(
                rows, torch.arange(m, device=self.device))
            plans.append((p, rows, new, identity))
        return plans

    def _run_load(self, plans, staged: dict) -> None:
        cuda = self.device.type == "cuda"
        main = torch.cuda.current_stream(self.device) if cuda else None
        for p, rows, new, identity in plans:  # scatter chunk k while chunk k+1 still copies
            b, a = self._addr[p.name]
            for l0, l1, vd, sd, ev in staged[p.name]:
                if cuda:
                    main.wait_event(ev)
                    vd.record_stream(main)
                    sd.record_stream(main)
                if not identity:
                    vd, sd = vd.index_select(1, rows), sd.index_select(1, rows)
                self._scatter(b, new, vd, sd, a.select(tuple(range(l0, l1))))
