"""Plain ``@triton.jit`` kernels for token / page moves, and their torch-facing wrappers.

The same kernels serve two callers:

* torch engines call ``gather_tokens_torch`` / ``scatter_tokens_torch`` / ``copy_pages_torch`` /
  ``copy_tokens_torch`` on ``torch.uint8[R, C]`` buffers (CUDA tensors: compiled Triton; CPU
  tensors: the Triton interpreter, picked per call — no ``TRITON_INTERPRET`` needed);
* ``triton_jax`` launches them on JAX arrays through jax-triton (GPU only).

Addressing is ``kernels.addressing``: for layer ``l`` and location ``loc`` (``page, t = divmod(loc,
tpp)``), the value is at byte ``(row_base[l] + page*row_step) * C + col_base[l] + t*V`` of the
row-major buffer and the scale at ``... + tpp*V + t*S``.  All byte offsets are 64-bit inside the
kernels (pools are many GB).  Bytes are moved in the widest word (8/4/2/1 B) that divides every
offset and width of the op, so an 8-B word load replaces eight byte loads.

Kernel signatures put every input (arrays and scalars) first and outputs last, the order jax-triton
uses; in-place kernels take the destination twice (``dst_in``, ``dst_out``: aliased).

Invalid locations / pages (< 0 or >= capacity) are masked: never read, never written; gathers
write zeros for them.  With duplicate destinations the GPU may interleave words of different
writers (the interpreter is sequential); callers pass identical data for duplicates (state rows).
"""
from __future__ import annotations

import functools
import math
import os

import triton
import triton.language as tl

from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

# ---------------------------------------------------------------------------------------------
# Kernel sources (plain Python functions; compiled with triton.jit or run by the interpreter)


def _gather_tokens_src(buf, locs, lrow, lcol, C, N, cap, val, scl,
                       TPP: tl.constexpr, RS: tl.constexpr, V: tl.constexpr, S: tl.constexpr,
                       SB: tl.constexpr, WV: tl.constexpr, WS: tl.constexpr, BT: tl.constexpr,
                       VWP: tl.constexpr, SWP: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    loc = tl.load(locs + i, mask=inb, other=-1)
    ok = inb & (loc >= 0) & (loc < cap)
    loc = tl.where(ok, loc, 0)
    page = (loc // TPP).to(tl.int64)
    t = (loc % TPP).to(tl.int64)
    rb = tl.load(lrow + l).to(tl.int64)
    cb = tl.load(lcol + l).to(tl.int64)
    base = (rb + page * RS) * C + cb  # [BT] byte offset of the page
    out_tok = l.to(tl.int64) * N + i.to(tl.int64)  # [BT] token index in [L, N]
    # value: V bytes as V // WV words
    if WV == 8:
        pin = buf.to(tl.pointer_type(tl.uint64))
        pout = val.to(tl.pointer_type(tl.uint64))
    elif WV == 4:
        pin = buf.to(tl.pointer_type(tl.uint32))
        pout = val.to(tl.pointer_type(tl.uint32))
    elif WV == 2:
        pin = buf.to(tl.pointer_type(tl.uint16))
        pout = val.to(tl.pointer_type(tl.uint16))
    else:
        pin = buf
        pout = val
    j = tl.arange(0, VWP)
    mj = j < (V // WV)
    src = ((base + t * V) // WV)[:, None] + j[None, :]
    x = tl.load(pin + src, mask=ok[:, None] & mj[None, :], other=0)
    tl.store(pout + (out_tok * (V // WV))[:, None] + j[None, :], x, mask=inb[:, None] & mj[None, :])
    if SB > 0:
        if WS == 8:
            sin = buf.to(tl.pointer_type(tl.uint64))
            sout = scl.to(tl.pointer_type(tl.uint64))
        elif WS == 4:
            sin = buf.to(tl.pointer_type(tl.uint32))
            sout = scl.to(tl.pointer_type(tl.uint32))
        elif WS == 2:
            sin = buf.to(tl.pointer_type(tl.uint16))
            sout = scl.to(tl.pointer_type(tl.uint16))
        else:
            sin = buf
            sout = scl
        k = tl.arange(0, SWP)
        mk = k < (SB // WS)
        ssrc = ((base + TPP * V + t * S) // WS)[:, None] + k[None, :]
        y = tl.load(sin + ssrc, mask=ok[:, None] & mk[None, :], other=0)
        tl.store(sout + (out_tok * (SB // WS))[:, None] + k[None, :], y,
                 mask=inb[:, None] & mk[None, :])


def _scatter_tokens_src(buf_in, locs, lrow, lcol, val, scl, C, N, cap, buf,
                        TPP: tl.constexpr, RS: tl.constexpr, V: tl.constexpr, S: tl.constexpr,
                        SB: tl.constexpr, WV: tl.constexpr, WS: tl.constexpr, BT: tl.constexpr,
                        VWP: tl.constexpr, SWP: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    loc = tl.load(locs + i, mask=inb, other=-1)
    ok = inb & (loc >= 0) & (loc < cap)
    loc = tl.where(ok, loc, 0)
    page = (loc // TPP).to(tl.int64)
    t = (loc % TPP).to(tl.int64)
    rb = tl.load(lrow + l).to(tl.int64)
    cb = tl.load(lcol + l).to(tl.int64)
    base = (rb + page * RS) * C + cb
    in_tok = l.to(tl.int64) * N + i.to(tl.int64)
    if WV == 8:
        pout = buf.to(tl.pointer_type(tl.uint64))
        pin = val.to(tl.pointer_type(tl.uint64))
    elif WV == 4:
        pout = buf.to(tl.pointer_type(tl.uint32))
        pin = val.to(tl.pointer_type(tl.uint32))
    elif WV == 2:
        pout = buf.to(tl.pointer_type(tl.uint16))
        pin = val.to(tl.pointer_type(tl.uint16))
    else:
        pout = buf
        pin = val
    j = tl.arange(0, VWP)
    m = ok[:, None] & (j < (V // WV))[None, :]
    x = tl.load(pin + (in_tok * (V // WV))[:, None] + j[None, :], mask=m, other=0)
    tl.store(pout + ((base + t * V) // WV)[:, None] + j[None, :], x, mask=m)
    if SB > 0:
        if WS == 8:
            sout = buf.to(tl.pointer_type(tl.uint64))
            sin = scl.to(tl.pointer_type(tl.uint64))
        elif WS == 4:
            sout = buf.to(tl.pointer_type(tl.uint32))
            sin = scl.to(tl.pointer_type(tl.uint32))
        elif WS == 2:
            sout = buf.to(tl.pointer_type(tl.uint16))
            sin = scl.to(tl.pointer_type(tl.uint16))
        else:
            sout = buf
            sin = scl
        k = tl.arange(0, SWP)
        ms = ok[:, None] & (k < (SB // WS))[None, :]
        y = tl.load(sin + (in_tok * (SB // WS))[:, None] + k[None, :], mask=ms, other=0)
        tl.store(sout + ((base + TPP * V + t * S) // WS)[:, None] + k[None, :], y, mask=ms)


def _copy_tokens_src(src, slocs, slrow, slcol, Cs, scap, dlocs, dlrow, dlcol, Cd, dcap, N,
                     dst_in, dst,
                     STPP: tl.constexpr, SRS: tl.constexpr, DTPP: tl.constexpr,
                     DRS: tl.constexpr, V: tl.constexpr, S: tl.constexpr, WV: tl.constexpr,
                     WS: tl.constexpr, BT: tl.constexpr, VWP: tl.constexpr, SWP: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    sl = tl.load(slocs + i, mask=inb, other=-1)
    dl = tl.load(dlocs + i, mask=inb, other=-1)
    ok = inb & (sl >= 0) & (sl < scap) & (dl >= 0) & (dl < dcap)
    sl = tl.where(ok, sl, 0)
    dl = tl.where(ok, dl, 0)
    spage = (sl // STPP).to(tl.int64)
    st = (sl % STPP).to(tl.int64)
    dpage = (dl // DTPP).to(tl.int64)
    dt = (dl % DTPP).to(tl.int64)
    sbase = (tl.load(slrow + l).to(tl.int64) + spage * SRS) * Cs + tl.load(slcol + l).to(tl.int64)
    dbase = (tl.load(dlrow + l).to(tl.int64) + dpage * DRS) * Cd + tl.load(dlcol + l).to(tl.int64)
    if WV == 8:
        pin = src.to(tl.pointer_type(tl.uint64))
        pout = dst.to(tl.pointer_type(tl.uint64))
    elif WV == 4:
        pin = src.to(tl.pointer_type(tl.uint32))
        pout = dst.to(tl.pointer_type(tl.uint32))
    elif WV == 2:
        pin = src.to(tl.pointer_type(tl.uint16))
        pout = dst.to(tl.pointer_type(tl.uint16))
    else:
        pin = src
        pout = dst
    j = tl.arange(0, VWP)
    m = ok[:, None] & (j < (V // WV))[None, :]
    x = tl.load(pin + ((sbase + st * V) // WV)[:, None] + j[None, :], mask=m, other=0)
    tl.store(pout + ((dbase + dt * V) // WV)[:, None] + j[None, :], x, mask=m)
    if S > 0:
        if WS == 8:
            sin = src.to(tl.pointer_type(tl.uint64))
            sout = dst.to(tl.pointer_type(tl.uint64))
        elif WS == 4:
            sin = src.to(tl.pointer_type(tl.uint32))
            sout = dst.to(tl.pointer_type(tl.uint32))
        elif WS == 2:
            sin = src.to(tl.pointer_type(tl.uint16))
            sout = dst.to(tl.pointer_type(tl.uint16))
        else:
            sin = src
            sout = dst
        k = tl.arange(0, SWP)
        ms = ok[:, None] & (k < (S // WS))[None, :]
        y = tl.load(sin + ((sbase + STPP * V + st * S) // WS)[:, None] + k[None, :], mask=ms,
                    other=0)
        tl.store(sout + ((dbase + DTPP * V + dt * S) // WS)[:, None] + k[None, :], y, mask=ms)


def _copy_pages_src(src, spages, slrow, slcol, Cs, snp, dpages, dlrow, dlcol, Cd, dnp, P,
                    dst_in, dst,
                    SRS: tl.constexpr, DRS: tl.constexpr, PB: tl.constexpr, W: tl.constexpr,
                    BLOCK: tl.constexpr, NCH: tl.constexpr, ZERO: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    p = pid // NCH
    c = pid % NCH
    sp = tl.load(spages + p)
    dp = tl.load(dpages + p)
    dok = (dp >= 0) & (dp < dnp)
    sok = (sp >= 0) & (sp < snp)
    if ZERO:  # gather semantics: a valid destination of an invalid source gets zeros
        ok = dok
    else:
        ok = dok & sok
    sp = tl.where(sok, sp, 0).to(tl.int64)
    dp = tl.where(dok, dp, 0).to(tl.int64)
    sbase = (tl.load(slrow + l).to(tl.int64) + sp * SRS) * Cs + tl.load(slcol + l).to(tl.int64)
    dbase = (tl.load(dlrow + l).to(tl.int64) + dp * DRS) * Cd + tl.load(dlcol + l).to(tl.int64)
    if W == 8:
        pin = src.to(tl.pointer_type(tl.uint64))
        pout = dst.to(tl.pointer_type(tl.uint64))
    elif W == 4:
        pin = src.to(tl.pointer_type(tl.uint32))
        pout = dst.to(tl.pointer_type(tl.uint32))
    elif W == 2:
        pin = src.to(tl.pointer_type(tl.uint16))
        pout = dst.to(tl.pointer_type(tl.uint16))
    else:
        pin = src
        pout = dst
    j = c * BLOCK + tl.arange(0, BLOCK)
    mj = j < (PB // W)
    x = tl.load(pin + sbase // W + j, mask=mj & ok & sok, other=0)
    tl.store(pout + dbase // W + j, x, mask=mj & ok)


# ---------------------------------------------------------------------------------------------
# Compiled / interpreted kernel objects

_SOURCES = {"gather_tokens": _gather_tokens_src, "scatter_tokens": _scatter_tokens_src,
            "copy_tokens": _copy_tokens_src, "copy_pages": _copy_pages_src}


@functools.lru_cache(maxsize=None)
def jit_kernel(name: str):
    """The ``triton.jit`` kernel ``name`` (an interpreted one when ``TRITON_INTERPRET=1``)."""
    return triton.jit(_SOURCES[name])


@functools.lru_cache(maxsize=None)
def interpreted_kernel(name: str):
    """The kernel ``name`` run by Triton's interpreter (for torch CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(_SOURCES[name])


# ---------------------------------------------------------------------------------------------
# Launch parameters (shared with triton_jax)


# Overrides of the launch parameters for tuning sweeps (benchmarks/kernels.py): "BT", "num_warps".
TUNE: dict = {}


def word_bytes(*sizes: int) -> int:
    """The widest word (8, 4, 2 or 1 bytes) dividing every size/offset in ``sizes``."""
    for w in (8, 4, 2):
        if all(int(s) % w == 0 for s in sizes):
            return w
    return 1


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def token_params(a: TokenAddressing, row_bytes: int, *, scale_width: int | None = None,
                 dense_cols: tuple[int, ...] = ()) -> dict:
    """constexpr parameters of the token kernels for addressing ``a`` in rows of ``row_bytes``.

    ``scale_width``: bytes of the scale window moved (``a.scale_bytes`` for get/set,
    ``a.scale_stride`` for raw token copies).
    """
    sb = a.scale_bytes if scale_width is None else scale_width
    cols = tuple(a.col_base)
    wv = word_bytes(row_bytes, a.value_bytes, *cols, *dense_cols)
    ws = word_bytes(row_bytes, a.tpp * a.value_bytes, a.scale_stride, sb, *cols) if sb else 1
    vw, sw = a.value_bytes // wv, (sb // ws if sb else 1)
    vwp, swp = _pow2(vw), _pow2(max(sw, 1))
    # ~1K words (8 KB) per program, 2 warps: the best of an H100 sweep (BT 4-32 x 2/4/8 warps,
    # benchmarks/NOTES.md); all configurations were within 10 % of each other.
    bt = TUNE.get("BT") or max(1, min(128, 1024 // vwp))
    return dict(TPP=a.tpp, RS=a.row_step, V=a.value_bytes, S=a.scale_stride, SB=sb, WV=wv,
                WS=ws, BT=_pow2(bt), VWP=vwp, SWP=swp)


def page_params(src_a: PageAddressing, dst_a: PageAddressing, src_row_bytes: int,
                dst_row_bytes: int, block_words: int = 1024) -> dict:
    """constexpr parameters of the page-copy kernel."""
    pb = src_a.page_bytes
    w = word_bytes(pb, src_row_bytes, dst_row_bytes, *src_a.col_base, *dst_a.col_base)
    words = pb // w
    block = min(_pow2(words), block_words)
    return dict(SRS=src_a.row_step, DRS=dst_a.row_step, PB=pb, W=w, BLOCK=block,
                NCH=math.ceil(words / block))


# Page copies: 4 warps per 8-KB chunk measured 0.87-0.91 of the copy ceiling on the H100 (first
# run), 2 warps 0.83-0.92 (second run): 4 it is.
PAGE_WARPS = 4


def num_warps_for(words_per_program: int) -> int:
    if TUNE.get("num_warps"):
        return TUNE["num_warps"]
    return 4 if words_per_program >= 2048 else (2 if words_per_program >= 256 else 1)


# ---------------------------------------------------------------------------------------------
# torch wrappers


def _torch():
    import torch
    return torch


_TABLES: dict = {}


def _table(vals: tuple[int, ...], device):
    """A cached int32 device tensor holding ``vals``."""
    torch = _torch()
    key = (vals, str(device))
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(vals if vals else (0,), dtype=torch.int32, device=device)
        _TABLES[key] = t
    return t


def _launch(name, grid, device, *args, num_warps=4, **meta):
    if device.type == "cpu":
        k = interpreted_kernel(name)
        k[grid](*args, **meta)
    else:
        if os.environ.get("TRITON_CACHE_DIR") == "":
            # jax-triton sets TRITON_CACHE_DIR="" when imported; Triton's own launcher then fails
            # with "Could not create or locate cache dir" (seen on the H100 run): use the default.
            os.environ["TRITON_CACHE_DIR"] = os.path.join(
                os.environ.get("TRITON_HOME", os.path.expanduser("~")), ".triton", "cache")
        k = jit_kernel(name)
        k[grid](*args, num_warps=num_warps, **meta)


def _check_buf(buf, arg="buf"):
    torch = _torch()
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 2:
        raise ValueError(f"{arg} must be a 2-D torch.uint8 tensor [rows, row_bytes], got "
                         f"{getattr(buf, 'dtype', type(buf))} {tuple(getattr(buf, 'shape', ()))}")
    if not buf.is_contiguous():
        raise ValueError(f"{arg} must be contiguous (row-major)")


def _check_idx(x, device, arg):
    torch = _torch()
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.dim() != 1:
        raise ValueError(f"{arg} must be a 1-D torch.int32 tensor, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.device != device:
        raise ValueError(f"{arg} is on {x.device}, the buffer on {device}")
    return x.contiguous()


def _check_fits(buf, a, arg):
    rows, cols = buf.shape
    if isinstance(a, TokenAddressing):
        width = a.tpp * (a.value_bytes + a.scale_stride)
    else:
        width = a.page_bytes
    if a.num_layers == 0:
        return
    last_row = max(a.row_base) + (a.num_pages - 1) * a.row_step
    if last_row >= rows or max(a.col_base) + width > cols or min(a.col_base) < 0:
        raise ValueError(f"{arg} of shape {tuple(buf.shape)} is too small for its addressing "
                         f"(needs row {last_row} and {max(a.col_base) + width} bytes per row)")


def gather_tokens_torch(buf, locs, a: TokenAddressing):
    """Reads tokens of every layer of ``a`` (torch twin of ``reference.gather_tokens``).

    Args:
      buf: torch.uint8[R, C] (CUDA: compiled Triton; CPU: the Triton interpreter).
      locs: torch.int32[N]; invalid locations (< 0 or >= capacity) read as zeros.
      a: the addressing.

    Returns:
      ``(value torch.uint8[L, N, V], scale torch.uint8[L, N, scale_bytes])``.
    """
    torch = _torch()
    _check_buf(buf)
    locs = _check_idx(locs, buf.device, "locs")
    _check_fits(buf, a, "buf")
    L, N = a.num_layers, locs.shape[0]
    value = torch.empty((L, N, a.value_bytes), dtype=torch.uint8, device=buf.device)
    scale = torch.empty((L, N, a.scale_bytes), dtype=torch.uint8, device=buf.device)
    if L == 0 or N == 0:
        return value, scale
    meta = token_params(a, buf.shape[1])
    grid = (triton.cdiv(N, meta["BT"]), L)
    _launch("gather_tokens", grid, buf.device, buf, locs, _table(a.row_base, buf.device),
            _table(a.col_base, buf.device), buf.shape[1], N, a.capacity, value,
            scale if a.scale_bytes else value, num_warps=num_warps_for(meta["BT"] * meta["VWP"]),
            **meta)
    return value, scale


def scatter_tokens_torch(buf, locs, value, scale, a: TokenAddressing) -> None:
    """Writes tokens of every layer of ``a`` into ``buf`` in place (twin of ``scatter_tokens``).

    Args:
      buf: torch.uint8[R, C], modified in place.
      locs: torch.int32[N]; invalid locations are skipped.
      value: torch.uint8[L, N, V].
      scale: torch.uint8[L, N, scale_bytes] (ignored when ``scale_bytes == 0``).
      a: the addressing.
    """
    torch = _torch()
    _check_buf(buf)
    locs = _check_idx(locs, buf.device, "locs")
    _check_fits(buf, a, "buf")
    L, N = a.num_layers, locs.shape[0]
    if tuple(value.shape) != (L, N, a.value_bytes) or value.dtype != torch.uint8:
        raise ValueError(f"value must be torch.uint8[{L}, {N}, {a.value_bytes}], got "
                         f"{value.dtype} {tuple(value.shape)}")
    if a.scale_bytes and (tuple(scale.shape) != (L, N, a.scale_bytes)
                          or scale.dtype != torch.uint8):
        raise ValueError(f"scale must be torch.uint8[{L}, {N}, {a.scale_bytes}], got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if L == 0 or N == 0:
        return
    value = value.contiguous()
    scale = scale.contiguous() if a.scale_bytes else value
    meta = token_params(a, buf.shape[1])
    grid = (triton.cdiv(N, meta["BT"]), L)
    _launch("scatter_tokens", grid, buf.device, buf, locs, _table(a.row_base, buf.device),
            _table(a.col_base, buf.device), value, scale, buf.shape[1], N, a.capacity, buf,
            num_warps=num_warps_for(meta["BT"] * meta["VWP"]), **meta)


def check_same_token_format(src_a: TokenAddressing, dst_a: TokenAddressing):
    if (src_a.value_bytes, src_a.scale_stride) != (dst_a.value_bytes, dst_a.scale_stride):
        raise ValueError("src_a and dst_a must describe the same token format (value_bytes "
                         f"{src_a.value_bytes} vs {dst_a.value_bytes}, scale_stride "
                         f"{src_a.scale_stride} vs {dst_a.scale_stride})")
    if src_a.num_layers != dst_a.num_layers:
        raise ValueError(f"src_a has {src_a.num_layers} layers, dst_a {dst_a.num_layers}")


def check_same_page(src_a: PageAddressing, dst_a: PageAddressing):
    if src_a.page_bytes != dst_a.page_bytes:
        raise ValueError(f"page sizes differ: src {src_a.page_bytes} B, dst {dst_a.page_bytes} B")
    if src_a.num_layers != dst_a.num_layers:
        raise ValueError(f"src_a has {src_a.num_layers} layers, dst_a {dst_a.num_layers}")


def copy_tokens_meta(src_a: TokenAddressing, dst_a: TokenAddressing, src_cols: int,
                     dst_cols: int) -> dict:
    """constexpr parameters of the token copy (value + the whole scale slot)."""
    V, S = src_a.value_bytes, src_a.scale_stride
    cols = (*src_a.col_base, *dst_a.col_base)
    wv = word_bytes(src_cols, dst_cols, V, *cols)
    ws = word_bytes(src_cols, dst_cols, src_a.tpp * V, dst_a.tpp * V, S, *cols) if S else 1
    vwp, swp = _pow2(V // wv), _pow2(max(S // ws, 1))
    bt = TUNE.get("BT") or _pow2(max(1, min(128, 1024 // vwp)))
    return dict(STPP=src_a.tpp, SRS=src_a.row_step, DTPP=dst_a.tpp, DRS=dst_a.row_step, V=V, S=S,
                WV=wv, WS=ws, BT=bt, VWP=vwp, SWP=swp)


def copy_tokens_torch(src, dst, src_locs, dst_locs, src_a: TokenAddressing,
                      dst_a: TokenAddressing) -> None:
    """Token-granular copy between paged buffers (SGLang's ``transfer_cache_dsv4_mla``).

    Token ``src_locs[i]`` of every layer of ``src_a`` is copied to ``dst_locs[i]`` of the same
    layer of ``dst_a``: its V-byte value and its whole S-byte scale slot (two byte ranges).
    Pairs where either location is invalid are skipped.

    Args:
      src, dst: torch.uint8[R, C] buffers (``dst`` modified in place; may be the same tensor only
        when the source and destination tokens do not overlap).
      src_locs, dst_locs: torch.int32[N].
      src_a, dst_a: addressing of the same token format and layer count (page sizes may differ).
    """
    _check_buf(src, "src")
    _check_buf(dst, "dst")
    check_same_token_format(src_a, dst_a)
    src_locs = _check_idx(src_locs, src.device, "src_locs")
    dst_locs = _check_idx(dst_locs, dst.device, "dst_locs")
    if src_locs.shape != dst_locs.shape:
        raise ValueError(f"src_locs and dst_locs must have the same length, got "
                         f"{src_locs.shape[0]} and {dst_locs.shape[0]}")
    _check_fits(src, src_a, "src")
    _check_fits(dst, dst_a, "dst")
    L, N = src_a.num_layers, src_locs.shape[0]
    if L == 0 or N == 0:
        return
    meta = copy_tokens_meta(src_a, dst_a, src.shape[1], dst.shape[1])
    grid = (triton.cdiv(N, meta["BT"]), L)
    d = src.device
    _launch("copy_tokens", grid, d, src, src_locs, _table(src_a.row_base, d),
            _table(src_a.col_base, d), src.shape[1], src_a.capacity, dst_locs,
            _table(dst_a.row_base, d), _table(dst_a.col_base, d), dst.shape[1], dst_a.capacity,
            N, dst, dst, num_warps=num_warps_for(meta["BT"] * meta["VWP"]), **meta)


def copy_pages_torch(src, dst, src_pages, dst_pages, src_a: PageAddressing,
                     dst_a: PageAddressing) -> None:
    """Whole-page copy between two buffers with different page numbering, all layers at once.

    Page ``src_pages[i]`` of every layer of ``src_a`` is copied to page ``dst_pages[i]`` of the same
    layer of ``dst_a``; pairs with an invalid page on either side are skipped.

    Args:
      src, dst: torch.uint8[R, C] (``dst`` modified in place).
      src_pages, dst_pages: torch.int32[P].
      src_a, dst_a: page addressing with equal ``page_bytes`` and layer counts.
    """
    _check_buf(src, "src")
    _check_buf(dst, "dst")
    check_same_page(src_a, dst_a)
    src_pages = _check_idx(src_pages, src.device, "src_pages")
    dst_pages = _check_idx(dst_pages, dst.device, "dst_pages")
    if src_pages.shape != dst_pages.shape:
        raise ValueError(f"src_pages and dst_pages must have the same length, got "
                         f"{src_pages.shape[0]} and {dst_pages.shape[0]}")
    _check_fits(src, src_a, "src")
    _check_fits(dst, dst_a, "dst")
    L, P = src_a.num_layers, src_pages.shape[0]
    if L == 0 or P == 0:
        return
    meta = page_params(src_a, dst_a, src.shape[1], dst.shape[1])
    grid = (meta["NCH"] * P, L)
    d = src.device
    _launch("copy_pages", grid, d, src, src_pages, _table(src_a.row_base, d),
            _table(src_a.col_base, d), src.shape[1], src_a.num_pages, dst_pages,
            _table(dst_a.row_base, d), _table(dst_a.col_base, d), dst.shape[1], dst_a.num_pages,
            P, dst, dst, num_warps=PAGE_WARPS, ZERO=0, **meta)
