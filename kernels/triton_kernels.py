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
offset and width of the op (``_as_words``: the one pointer cast, a ``@triton.jit`` device
function), so an 8-B word load replaces eight byte loads; the host also passes the alignment of
the page-side offsets it knows (``AV``/``AS``/``AL`` words, ``tl.multiple_of``), which lets the
compiler use 16-B vector accesses.  Everything static is a constexpr (row widths, capacities, page
counts, strides): the torch and jax-triton launches compile the same kernel.  Page copies move G
whole pages per program when pages are small (``page_geometry``).

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
import types

import triton
import triton.language as tl

from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

# ---------------------------------------------------------------------------------------------
# Kernel sources (plain Python functions; compiled with triton.jit or run by the interpreter)


def _as_words_src(ptr, W: tl.constexpr):
    """``ptr`` (a uint8 pointer) as a pointer to ``W``-byte words (W = 8, 4, 2 or 1)."""
    if W == 8:
        p = ptr.to(tl.pointer_type(tl.uint64))
    elif W == 4:
        p = ptr.to(tl.pointer_type(tl.uint32))
    elif W == 2:
        p = ptr.to(tl.pointer_type(tl.uint16))
    else:
        p = ptr
    return p


# The helper the kernel sources call.  Compiled kernels need a JITFunction here (under
# TRITON_INTERPRET=1, triton.jit gives an InterpretedFunction, which the interpreter calls);
# ``interpreted_kernel`` runs the sources with an interpreted copy of it (see there).
_as_words = triton.jit(_as_words_src)


def _gather_tokens_src(buf, locs, lrow, lcol, N, val, scl,
                       C: tl.constexpr, CAP: tl.constexpr, TPP: tl.constexpr, RS: tl.constexpr,
                       V: tl.constexpr, S: tl.constexpr, SB: tl.constexpr, WV: tl.constexpr,
                       WS: tl.constexpr, BT: tl.constexpr, VWP: tl.constexpr, SWP: tl.constexpr,
                       AV: tl.constexpr, AS: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    loc = tl.load(locs + i, mask=inb, other=-1)
    ok = inb & (loc >= 0) & (loc < CAP)
    loc = tl.where(ok, loc, 0)
    page = (loc // TPP).to(tl.int64)
    t = (loc % TPP).to(tl.int64)
    rb = tl.load(lrow + l).to(tl.int64)
    cb = tl.load(lcol + l).to(tl.int64)
    base = (rb + page * RS) * C + cb  # [BT] byte offset of the page
    out_tok = l.to(tl.int64) * N + i.to(tl.int64)  # [BT] token index in [L, N]
    # value: V bytes as V // WV words; AV: every page-side value offset is a multiple of AV words
    j = tl.arange(0, VWP)
    mj = j < (V // WV)
    src = tl.multiple_of((base + t * V) // WV, AV)
    x = tl.load(_as_words(buf, WV) + src[:, None] + j[None, :], mask=ok[:, None] & mj[None, :],
                other=0)
    tl.store(_as_words(val, WV) + (out_tok * (V // WV))[:, None] + j[None, :], x,
             mask=inb[:, None] & mj[None, :])
    if SB > 0:
        k = tl.arange(0, SWP)
        mk = k < (SB // WS)
        ssrc = tl.multiple_of((base + TPP * V + t * S) // WS, AS)
        y = tl.load(_as_words(buf, WS) + ssrc[:, None] + k[None, :],
                    mask=ok[:, None] & mk[None, :], other=0)
        tl.store(_as_words(scl, WS) + (out_tok * (SB // WS))[:, None] + k[None, :], y,
                 mask=inb[:, None] & mk[None, :])


def _scatter_tokens_src(buf_in, locs, lrow, lcol, val, scl, N, buf,
                        C: tl.constexpr, CAP: tl.constexpr, TPP: tl.constexpr, RS: tl.constexpr,
                        V: tl.constexpr, S: tl.constexpr, SB: tl.constexpr, WV: tl.constexpr,
                        WS: tl.constexpr, BT: tl.constexpr, VWP: tl.constexpr,
                        SWP: tl.constexpr, AV: tl.constexpr, AS: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    loc = tl.load(locs + i, mask=inb, other=-1)
    ok = inb & (loc >= 0) & (loc < CAP)
    loc = tl.where(ok, loc, 0)
    page = (loc // TPP).to(tl.int64)
    t = (loc % TPP).to(tl.int64)
    rb = tl.load(lrow + l).to(tl.int64)
    cb = tl.load(lcol + l).to(tl.int64)
    base = (rb + page * RS) * C + cb
    in_tok = l.to(tl.int64) * N + i.to(tl.int64)
    j = tl.arange(0, VWP)
    m = ok[:, None] & (j < (V // WV))[None, :]
    x = tl.load(_as_words(val, WV) + (in_tok * (V // WV))[:, None] + j[None, :], mask=m, other=0)
    dst = tl.multiple_of((base + t * V) // WV, AV)
    tl.store(_as_words(buf, WV) + dst[:, None] + j[None, :], x, mask=m)
    if SB > 0:
        k = tl.arange(0, SWP)
        ms = ok[:, None] & (k < (SB // WS))[None, :]
        y = tl.load(_as_words(scl, WS) + (in_tok * (SB // WS))[:, None] + k[None, :], mask=ms,
                    other=0)
        sdst = tl.multiple_of((base + TPP * V + t * S) // WS, AS)
        tl.store(_as_words(buf, WS) + sdst[:, None] + k[None, :], y, mask=ms)


def _copy_tokens_src(src, slocs, slrow, slcol, dlocs, dlrow, dlcol, N, dst_in, dst,
                     CS: tl.constexpr, SCAP: tl.constexpr, CD: tl.constexpr, DCAP: tl.constexpr,
                     STPP: tl.constexpr, SRS: tl.constexpr, DTPP: tl.constexpr,
                     DRS: tl.constexpr, V: tl.constexpr, S: tl.constexpr, WV: tl.constexpr,
                     WS: tl.constexpr, BT: tl.constexpr, VWP: tl.constexpr, SWP: tl.constexpr,
                     AV: tl.constexpr, AS: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.program_id(1)
    i = pid * BT + tl.arange(0, BT)
    inb = i < N
    sl = tl.load(slocs + i, mask=inb, other=-1)
    dl = tl.load(dlocs + i, mask=inb, other=-1)
    ok = inb & (sl >= 0) & (sl < SCAP) & (dl >= 0) & (dl < DCAP)
    sl = tl.where(ok, sl, 0)
    dl = tl.where(ok, dl, 0)
    spage = (sl // STPP).to(tl.int64)
    st = (sl % STPP).to(tl.int64)
    dpage = (dl // DTPP).to(tl.int64)
    dt = (dl % DTPP).to(tl.int64)
    sbase = (tl.load(slrow + l).to(tl.int64) + spage * SRS) * CS + tl.load(slcol + l).to(tl.int64)
    dbase = (tl.load(dlrow + l).to(tl.int64) + dpage * DRS) * CD + tl.load(dlcol + l).to(tl.int64)
    j = tl.arange(0, VWP)
    m = ok[:, None] & (j < (V // WV))[None, :]
    so = tl.multiple_of((sbase + st * V) // WV, AV)
    do = tl.multiple_of((dbase + dt * V) // WV, AV)
    x = tl.load(_as_words(src, WV) + so[:, None] + j[None, :], mask=m, other=0)
    tl.store(_as_words(dst, WV) + do[:, None] + j[None, :], x, mask=m)
    if S > 0:
        k = tl.arange(0, SWP)
        ms = ok[:, None] & (k < (S // WS))[None, :]
        sso = tl.multiple_of((sbase + STPP * V + st * S) // WS, AS)
        sdo = tl.multiple_of((dbase + DTPP * V + dt * S) // WS, AS)
        y = tl.load(_as_words(src, WS) + sso[:, None] + k[None, :], mask=ms, other=0)
        tl.store(_as_words(dst, WS) + sdo[:, None] + k[None, :], y, mask=ms)


def _copy_pages_src(src, spages, slrow, slcol, dpages, dlrow, dlcol, P, dst_in, dst,
                    CS: tl.constexpr, SNP: tl.constexpr, CD: tl.constexpr, DNP: tl.constexpr,
                    SRS: tl.constexpr, DRS: tl.constexpr, PB: tl.constexpr, W: tl.constexpr,
                    G: tl.constexpr, BLOCK: tl.constexpr, NCH: tl.constexpr, AL: tl.constexpr,
                    ZERO: tl.constexpr):
    # program (pid, l): chunk pid % NCH (BLOCK words) of G consecutive entries of the page lists,
    # layer l.  Small pages: NCH = 1 and G pages per program; large pages: G = 1.
    pid = tl.program_id(0)
    l = tl.program_id(1)
    c = pid % NCH
    i = (pid // NCH) * G + tl.arange(0, G)
    inb = i < P
    sp = tl.load(spages + i, mask=inb, other=-1)
    dp = tl.load(dpages + i, mask=inb, other=-1)
    dok = (dp >= 0) & (dp < DNP)
    sok = (sp >= 0) & (sp < SNP)
    if ZERO:  # gather semantics: a valid destination of an invalid source gets zeros
        ok = dok
    else:
        ok = dok & sok
    sp = tl.where(sok, sp, 0).to(tl.int64)
    dp = tl.where(dok, dp, 0).to(tl.int64)
    sbase = (tl.load(slrow + l).to(tl.int64) + sp * SRS) * CS + tl.load(slcol + l).to(tl.int64)
    dbase = (tl.load(dlrow + l).to(tl.int64) + dp * DRS) * CD + tl.load(dlcol + l).to(tl.int64)
    so = tl.multiple_of(sbase // W, AL)  # [G] word offsets of the pages, multiples of AL words
    do = tl.multiple_of(dbase // W, AL)
    j = c * BLOCK + tl.arange(0, BLOCK)
    mj = (j < (PB // W))[None, :]
    x = tl.load(_as_words(src, W) + so[:, None] + j[None, :], mask=(ok & sok)[:, None] & mj,
                other=0)
    tl.store(_as_words(dst, W) + do[:, None] + j[None, :], x, mask=ok[:, None] & mj)


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
    """The kernel ``name`` run by Triton's interpreter (for torch CPU tensors).

    Works whatever ``TRITON_INTERPRET`` says: the source runs with its own globals in which the
    device-function helper is an interpreted one (the module's ``_as_words`` is a JITFunction
    when compiling, and the interpreter cannot call a JITFunction).
    """
    from triton.runtime.interpreter import InterpretedFunction
    fn = _SOURCES[name]
    scope = dict(fn.__globals__, _as_words=InterpretedFunction(_as_words_src))
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = dict(fn.__annotations__)
    return InterpretedFunction(copy)


# ---------------------------------------------------------------------------------------------
# Launch parameters (shared with triton_jax)


# Overrides of the launch parameters for tuning sweeps (benchmarks/kernels.py): "BT", "num_warps"
# (token kernels), "page_words", "page_warps" (page copies), "align" (False: no alignment hints).
TUNE: dict = {}


def align_bytes(*sizes: int, cap: int = 256) -> int:
    """The largest power of two (<= ``cap``) dividing every size/offset in ``sizes`` (0 counts
    as divisible by anything)."""
    a = cap
    for s in sizes:
        s = abs(int(s))
        if s:
            a = min(a, s & -s)
    return a


def word_bytes(*sizes: int) -> int:
    """The widest word (8, 4, 2 or 1 bytes) dividing every size/offset in ``sizes``."""
    return min(8, align_bytes(*sizes))


def _hint(align: int, word: int) -> int:
    """Alignment hint in words (``tl.multiple_of``) for offsets that are multiples of ``align``
    bytes, moved in ``word``-byte words; 1 when hints are switched off (``TUNE["align"]``)."""
    if TUNE.get("align", True) is False:
        return 1
    return max(1, align // word)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def token_params(a: TokenAddressing, row_bytes: int, *, scale_width: int | None = None,
                 dense_cols: tuple[int, ...] = ()) -> dict:
    """constexpr parameters of the token kernels for addressing ``a`` in rows of ``row_bytes``.

    ``scale_width``: bytes of the scale window moved (``a.scale_bytes`` for get/set,
    ``a.scale_stride`` for raw token copies).  Everything static about the buffer is a
    constexpr (row width ``C``, capacity ``CAP``, alignment hints ``AV``/``AS``: the page-side
    value / scale offsets are multiples of that many words), so the torch and the jax-triton
    launches compile the same specialised kernel; only the token count ``N`` is a runtime int.
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
    av = _hint(align_bytes(row_bytes, a.value_bytes, *cols), wv)
    as_ = _hint(align_bytes(row_bytes, a.tpp * a.value_bytes, a.scale_stride, *cols), ws) \
        if sb else 1
    return dict(C=int(row_bytes), CAP=int(a.capacity), TPP=a.tpp, RS=a.row_step,
                V=a.value_bytes, S=a.scale_stride, SB=sb, WV=wv, WS=ws, BT=_pow2(bt), VWP=vwp,
                SWP=swp, AV=av, AS=as_)


# Page copies: a program moves ~PAGE_WORDS words (8 KB of 8-B words).  Large pages are cut into
# chunks of that size, one page per program (SWA 146 KB pages: 0.93 of the copy ceiling on the
# H100); small pages are moved G whole pages per program (C128's 1,728-B pages at one page per
# program: 0.77 — 1.7 KB per program is too few bytes in flight for the dependent index loads).
PAGE_WORDS = 1024
# 4 warps per program measured 0.87-0.91 of the copy ceiling on the H100 (first run), 2 warps
# 0.83-0.92 (second run): 4 it is.
PAGE_WARPS = 4


def page_geometry(words: int, budget: int) -> tuple[int, int, int]:
    """``(BLOCK, NCH, G)`` for pages of ``words`` words and ``budget`` words per program.

    BLOCK (a power of two <= budget) is the largest whose chunks waste <= 20 % lanes
    (``words <= 0.8 * NCH * BLOCK`` fails), NCH = chunks per page, G = pages per program =
    budget // BLOCK.  SWA (18,720 words): 1024 x 19, G 1; C4 (4,680): 1024 x 5, G 1; C128 (216):
    256 x 1, G 4; indexer pages (1,056): 256 x 5, G 4.
    """
    budget = _pow2(max(1, budget))
    block = min(budget, _pow2(words))
    while block > 32:
        nch = -(-words // block)
        if words >= 0.8 * nch * block:
            break
        block //= 2
    nch = -(-words // block)
    return block, nch, max(1, budget // block)


def page_params(src_a: PageAddressing, dst_a: PageAddressing, src_row_bytes: int,
                dst_row_bytes: int, block_words: int | None = None) -> dict:
    """constexpr parameters of the page-copy kernel (and its grid: ``NCH * ceil(P / G)`` x L)."""
    pb = src_a.page_bytes
    w = word_bytes(pb, src_row_bytes, dst_row_bytes, *src_a.col_base, *dst_a.col_base)
    block, nch, g = page_geometry(pb // w, block_words or TUNE.get("page_words") or PAGE_WORDS)
    al = _hint(align_bytes(src_row_bytes, dst_row_bytes, *src_a.col_base, *dst_a.col_base), w)
    return dict(CS=int(src_row_bytes), SNP=int(src_a.num_pages), CD=int(dst_row_bytes),
                DNP=int(dst_a.num_pages), SRS=src_a.row_step, DRS=dst_a.row_step, PB=pb, W=w,
                G=g, BLOCK=block, NCH=nch, AL=al)


def page_grid(meta: dict, P: int, L: int) -> tuple[int, int]:
    return (meta["NCH"] * (-(-P // meta["G"])), L)


def page_warps() -> int:
    return TUNE.get("page_warps") or PAGE_WARPS


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


def _check_copy(src, dst, src_idx, dst_idx, src_a, dst_a, what: str):
    """Argument checks of a buffer-to-buffer copy: both buffers, both index vectors (same length,
    ``src_<what>`` / ``dst_<what>``) and both addressings' fit; returns the checked indices."""
    _check_buf(src, "src")
    _check_buf(dst, "dst")
    src_idx = _check_idx(src_idx, src.device, f"src_{what}")
    dst_idx = _check_idx(dst_idx, dst.device, f"dst_{what}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"src_{what} and dst_{what} must have the same length, got "
                         f"{src_idx.shape[0]} and {dst_idx.shape[0]}")
    _check_fits(src, src_a, "src")
    _check_fits(dst, dst_a, "dst")
    return src_idx, dst_idx


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
            _table(a.col_base, buf.device), N, value, scale if a.scale_bytes else value,
            num_warps=num_warps_for(meta["BT"] * meta["VWP"]), **meta)
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
            _table(a.col_base, buf.device), value, scale, N, buf,
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
    av = _hint(align_bytes(src_cols, dst_cols, V, *cols), wv)
    as_ = _hint(align_bytes(src_cols, dst_cols, src_a.tpp * V, dst_a.tpp * V, S, *cols), ws) \
        if S else 1
    return dict(CS=int(src_cols), SCAP=int(src_a.capacity), CD=int(dst_cols),
                DCAP=int(dst_a.capacity), STPP=src_a.tpp, SRS=src_a.row_step, DTPP=dst_a.tpp,
                DRS=dst_a.row_step, V=V, S=S, WV=wv, WS=ws, BT=bt, VWP=vwp, SWP=swp, AV=av,
                AS=as_)


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
    check_same_token_format(src_a, dst_a)
    src_locs, dst_locs = _check_copy(src, dst, src_locs, dst_locs, src_a, dst_a, "locs")
    L, N = src_a.num_layers, src_locs.shape[0]
    if L == 0 or N == 0:
        return
    meta = copy_tokens_meta(src_a, dst_a, src.shape[1], dst.shape[1])
    grid = (triton.cdiv(N, meta["BT"]), L)
    d = src.device
    _launch("copy_tokens", grid, d, src, src_locs, _table(src_a.row_base, d),
            _table(src_a.col_base, d), dst_locs, _table(dst_a.row_base, d),
            _table(dst_a.col_base, d), N, dst, dst,
            num_warps=num_warps_for(meta["BT"] * meta["VWP"]), **meta)


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
    check_same_page(src_a, dst_a)
    src_pages, dst_pages = _check_copy(src, dst, src_pages, dst_pages, src_a, dst_a, "pages")
    L, P = src_a.num_layers, src_pages.shape[0]
    if L == 0 or P == 0:
        return
    meta = page_params(src_a, dst_a, src.shape[1], dst.shape[1])
    d = src.device
    _launch("copy_pages", page_grid(meta, P, L), d, src, src_pages, _table(src_a.row_base, d),
            _table(src_a.col_base, d), dst_pages, _table(dst_a.row_base, d),
            _table(dst_a.col_base, d), P, dst, dst, num_warps=page_warps(), ZERO=0, **meta)
