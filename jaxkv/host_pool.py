"""Paged host pool for HiSparse and prefill->decode direct-to-host transfer (SPEC §7).

A ``HostPool`` mirrors the pages of one device pool byte for byte: a host page has exactly the
device pool's page bytes (37,440 B for DSv4 C4 with 64 slots per page), value and scale split
inside the page as on the device, so a page copied either way is one contiguous range and a host
page can be RDMA-written by a remote prefill node straight from its device page.

Memory
  ``buffer`` is one ``uint8[num_layers * num_pages, page_bytes]`` array, layer-major
  (``row = layer * num_pages + page``), in JAX's ``pinned_host`` memory kind.  Where the backend
  has no ``pinned_host`` memory (some CPU builds), it falls back to ``unpinned_host`` and then to
  the device's default memory; ``HostPoolSpec.memory_kind`` says which one is in use.  On GPU the
  XLA pinned-host allocator is capped at 64 GB unless ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` is
  raised: size host pools with that in mind.

State
  ``HostPool`` is an immutable pytree (``buffer`` and the page-allocation mask are children, the
  ``HostPoolSpec`` is static).  Every operation returns a new state; the old state must not be used
  afterwards when the operation donates the buffer (``backup_from_device`` always donates the host
  buffer, ``load_to_device`` donates the device cache buffer by default), exactly like
  ``jax.jit(..., donate_argnames=...)`` at a call site.  Validation happens before anything is
  donated, so a failed call (``ValueError``) leaves both states intact and usable.  With
  ``method="triton"`` the host buffer is written in place through its address (not donated): the
  returned state shares it with the old one, which must not be used any more either.

Donation and external references
  ``init_host_pool`` returns a buffer that XLA owns (checked with a donating no-op write), so the
  ``"xla"`` method updates it in place and its address (``buffer_address``,
  ``contiguous_buf_infos``) stays the same.  Taking the address does not prevent that, nor does a
  ``"triton"`` call on the buffer.  What does: an *external reference* on the buffer -- a live
  zero-copy NumPy view (``v = np.asarray(host.buffer)`` kept alive), a buffer made by
  ``jax.device_put`` of a NumPy array that it aliases (zero-copy into host memory), a DLPack
  export.  The CPU runtime then silently copies; the GPU runtime refuses the donation
  (``INVALID_ARGUMENT: Donation requested for buffer with external reference``, before anything
  runs).  The ``"xla"`` method then retries without donation (copy-on-write, with a
  ``RuntimeWarning``): cost = one copy of the whole host buffer, and the new state's buffer has a
  new address (re-register it with a transfer engine).  The copy is XLA-owned, so the following
  calls donate again.  Same for the device cache buffer in ``load_to_device``.

Index spaces
  Host indices are host *slots*: ``page * tokens_per_page + t`` (for C4 a slot is a C4-token
  position, ``host_token_len(n) = n // 4``).  Device indices are locations of the device pool
  (``jaxkv.cache`` conventions).  SPEC §7 validation: either index array ``None`` -> nothing to do;
  different lengths -> ``ValueError``; then range checks (no -1 padding here), no duplicate
  destinations, and host pages must be allocated.

Two copy paths (``backup_from_device`` / ``load_to_device``)
  * page-aligned: both index arrays are sequences of whole pages (``len % tokens_per_page == 0``
    and every group of ``tokens_per_page`` indices is ``page * tpp + [0, 1, ..., tpp-1]``) ->
    whole-page copies: ``gather_pages`` on the device into one staging array, one transfer, and
    the host rows written (or the reverse).  SGLang only checks the counts; a count that is a
    multiple of the page size but is not made of whole pages takes the token path here instead of
    being copied to the wrong bytes.
  * token-granular otherwise: each token is its value (576 B for DSv4 MLA) and its whole scale slot
    (8 B, pad byte included), two ranges per token.  JAX cannot write part of a pinned-host page,
    so the ``"xla"`` method assembles whole pages on the device: host pages that the tokens cover
    only partly are read back (host->device), pages they cover completely are rebuilt from zeros
    plus their padding bytes read back (a host gather of just those windows: 64 B of 37,440 for
    C4); the tokens are merged in with ``scatter_tokens`` and the whole pages written
    (device->host).  Loads read the affected pages and gather the tokens on the device.  Cost of a
    backup of N tokens into freshly allocated contiguous slots: ``ceil(N / tpp)`` pages
    device->host (``page_bytes / (tpp x token_bytes)`` = 1.002x the payload for C4) plus at most
    two partly covered pages and the padding windows host->device.  Random host slots spread over
    many pages cost up to one page each way per token.  Bytes of the host pages that no token
    covers (page padding, other tokens of partly covered pages) are preserved.

Methods (how the host side is written)
  * ``"xla"``: one ``jax.jit`` per operation with the host buffer donated and ``out_shardings`` on
    the pinned-host sharding; the device->host transfer is ``jax.device_put`` inside the jit and
    the row update is an XLA scatter on the host-memory operand (``mode="drop"``).  CPU only (and
    pools in device memory): on GPU, XLA 0.11 fails to compile its host-memory gather
    (``INTERNAL: ... Bitcast cannot have different memory spaces of output (0) and operand (5)``),
    its token load gave wrong bytes and its row update runs as host compute (second H100 run), so
    ``method="xla"`` with a host-memory pool on GPU raises ``ValueError`` up front ("the xla method
    is not supported on GPU by XLA 0.11 ...: use method='triton'"), before anything is donated.
  * ``"triton"`` (GPU, needs jax-triton): a Triton kernel launched through jax-triton reads the
    device pool and writes the pinned host pages through their device-visible address (CUDA UVA:
    pinned host memory has the same address on the device), so a page is one pass over PCIe and a
    token is written without reading its page back; the reverse for loads.  XLA does not see these
    host accesses, so the call blocks until the kernels are done before returning the new state.
    One kernel launch per window kind (whole pages; or token values, then 8-B scale slots), each
    program copying a ``[ROWS, BLOCK]`` tile: 16 KB (``_TILE_WORDS``, 16 token values) or, for
    whole pages, 4 page chunks of 8 KB (``_WIDE_ROWS``), 16-B accesses where every window start is 16-B aligned (device side
    and, through an alignment hint on the pointer made from the host address, host side: the
    kernel of the first two H100 runs had no hint and stored 4 B per host access -- PTX
    ``st.global.b32``, checked by compiling for sm_90 in the tests).
  ``"triton"`` token paths (``token_path``, ``TOKEN_PATHS``): ``"direct"`` (above; what
  ``"auto"`` takes, ``_AUTO_TOKEN_PATH``) or ``"staged"``: tokens that fill whole host pages (all
  ``tpp`` slots of the page in the call: a backup into freshly allocated slots) are gathered on
  the device into page-shaped staging rows (``value x tpp | scale x tpp``, the host page minus its
  padding) and copied as one ``tpp * (V + S)``-byte window per page, the page kernel's access
  pattern; the remaining tokens go direct.  Costs a device gather/scatter pass and device memory
  of about the staged payload.  Which one is faster is measured by ``benchmarks/host_pool.py``.
  Planning of a ``"triton"`` call (``_fast_plan``; any failed check re-runs the numpy plan for
  its exact error): a page-aligned call is validated on the host at page granularity
  (``_host_page_plan``: one ``np.diff`` pass per index array for the page structure, then range,
  duplicates and allocation on the ``N / tpp`` pages; no device work or sync before the
  kernels); a token call of >= 32K indices (``_DEVICE_PLAN_MIN``) is range-checked on the host
  (min/max), its indices uploaded once, duplicates and allocation checked by one jitted device
  program (one read-back) and its window arrays derived on the device.  H100 run 4: numpy plan
  2.7 ms (page call) / 29 ms (256K tokens, window arrays included); device-checked plan 3.8 /
  2.1 ms -- the page call's read-back waited for its uploads, hence the host page checks since
  (~0.5 ms on the quiet CPU box).
  ``method="auto"`` (``_AUTO_METHOD``): ``"xla"`` on CPU; ``"triton"`` on GPU (it passed the GPU
  tests of every pool in both H100 runs and writes in place without donation, so registered
  addresses always stay valid).  On GPU, where ``"triton"`` cannot run (no jax-triton, sizes not
  multiples of 4 bytes) ``"auto"`` raises ``ValueError``; a pool placed in device memory uses
  ``"xla"`` (plain device ops).

Measured on the H100 (run 4, ceiling ``C`` = ``jax.device_put`` between memory kinds, 54.7 GB/s
both ways; ``benchmarks/results/host_pool-h100.md``; benchmarks/NOTES.md has the history):
page-aligned 4.32-GB calls 0.885 C backup / 0.873 C load end to end, the kernels alone 0.934 /
0.914 C (4.6 / 4.1 ms per call were host planning, removed since); 256K random tokens 0.870 /
0.855 C (kernels alone 0.917 / 0.901), ``"staged"`` tokens 0.80 / 0.73 C.  Since run 4 the
kernel aligns each warp's host access to 128-B lines (``_HOST_LINE_ALIGN``; unmeasured).

History of the options, against the pinned copy ceiling ``C`` (53.2 GB/s D2H, 52.5 GB/s H2D on
the H100 of the second run; rates are end to end, host-side planning included):
  * page path, ``"triton"``: second run 0.84 C backup, 0.82 C load (97 ms per 4.32-GB call), of
    which ~10 ms was host-side planning (the "host-side plan" row) plus per-layer index arrays:
    the kernel itself ran at ~0.93 C.  Now the window arrays are per page, shared by the 21
    layers (the kernel adds the layer offsets), and a program copies a 16-KB tile.  Prediction
    0.86-0.92 C both ways: the 0.90 target is borderline; what remains is the ~10-ms plan
    (validation of 352K slots; it could work on page numbers directly) and the SM-driven copy
    itself (posted 128-B PCIe writes; zero-copy 128-B reads for loads) versus the copy engine's
    large DMA bursts.  The sure way past 0.90: gather pages on the device into a staging buffer
    and ``cudaMemcpyAsync`` each run of consecutive host rows (copy engine); not possible
    through XLA (no in-place write into part of a host buffer), possible through the CUDA
    runtime on the buffer address; not implemented (no GPU in this session to check it).
  * token path, ``"triton"``: payload only (576-B values, 16-B aligned; 8-B scale slots, 1.4 %
    of the bytes).  Second run 0.17 C (8.8 GB/s, 365 ms per call) -- not the kernel: building
    the per-(layer, token) window arrays took ~0.4 s of host time (8 x 5.5M int32, measured on
    the CPU box), and the kernel ran one program per 576-B value and one per 8-B scale slot.
    Now: per-token arrays (~20 ms of planning for 256K tokens) and 16 values / 2,048 scale slots
    per program.  Prediction for the 256K random tokens: backup 0.55-0.75 C (~65 ms of
    transfer + ~20 ms of planning; contiguous host slots, so a tile's writes land in one host
    page), load 0.5-0.7 C (zero-copy reads).
  * ``"xla"`` (CPU; refused on GPU): its page load measured 0.27 C in the second run (row update
    as host compute); its backups did not compile there.

Indices must be concrete (numpy / Python / committed jax arrays): these functions plan transfers
on the host and are not meant to be traced.  Index arrays are padded to size buckets (at most
12.5 % padding) to bound recompilations; padding entries are -1 / out-of-range and are dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxkv.cache import Cache, page_addressing, token_addressing
from jaxkv.kernels import dispatch
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing
from jaxkv.layout import Layout

try:  # optional: only the "triton" host-write method needs it (annotations stay strings)
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional dependency
    tl = None

METHODS = ("auto", "xla", "triton")
# Host-write method that ``method="auto"`` takes per platform.  GPU: "triton" -- the first H100
# run of tests/test_host_pool.py passed it for every pool (page and token paths, both directions);
# it writes the pinned pages in place (no donation, so no copy-on-write, registered addresses
# always stay valid), and the "xla" method's host-side row update is compiled by XLA as host
# compute ("Converting into host compute. This is likely to have a very slow execution time" in
# that log).  "auto" falls back to "xla" where "triton" cannot run (no jax-triton, a pool not in
# pinned_host memory, byte sizes/offsets not multiples of 4).  To be revisited with the numbers of
# benchmarks/host_pool.py on the GPU.
_AUTO_METHOD = {"cpu": "xla", "gpu": "triton"}

HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


# ---------------------------------------------------------------------------------------------
# Spec and state


@dataclasses.dataclass(frozen=True)
class HostPoolSpec:
    """Static description of a host pool (hashable).

    Attributes:
      pool: the device pool it mirrors (``"c4"``, ``"swa"``, ``"kv"``, ...).
      num_layers: layers of that pool (all mirrored).
      num_pages: host pages per layer; host slots are ``0 .. num_pages * tokens_per_page - 1``.
      tokens_per_page: slots per page (= the device pool's; 64 for DSv4 C4).
      page_bytes: bytes per page (= the device pool's; 37,440 for DSv4 C4).
      value_bytes: V, value bytes per token (576 DSv4 MLA, 656 V3.2, 128 indexer).
      scale_stride: S, bytes of a token's scale slot (8 DSv4 MLA, 4 indexer, 0 unsplit).
      ratio: full-token positions per slot (4 for C4: ``host_token_len(n) = n // 4``).
      memory_kind: the JAX memory kind of ``buffer`` (``"pinned_host"`` normally).
      device: the device whose host memory holds the buffer.
    """

    pool: str
    num_layers: int
    num_pages: int
    tokens_per_page: int
    page_bytes: int
    value_bytes: int
    scale_stride: int
    ratio: int
    memory_kind: str
    device: jax.Device

    @property
    def capacity(self) -> int:
        """Host slots per layer."""
        return self.num_pages * self.tokens_per_page

    @property
    def layer_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers * self.num_pages, self.page_bytes)

    @property
    def sharding(self) -> SingleDeviceSharding:
        return SingleDeviceSharding(self.device, memory_kind=self.memory_kind)

    def token_addressing(self, rows_per_layer: int | None = None,
                         layers: Sequence[int] | None = None) -> TokenAddressing:
        """Addressing of whole token slots (value + full scale slot) in a ``[L*P, page_bytes]``
        buffer with ``rows_per_layer`` pages per layer (default: the host buffer itself)."""
        p = self.num_pages if rows_per_layer is None else rows_per_layer
        layers = range(self.num_layers) if layers is None else layers
        return TokenAddressing(row_base=tuple(i * p for i, _ in enumerate(layers)),
                               col_base=tuple(0 for _ in layers), row_step=1,
                               tpp=self.tokens_per_page, num_pages=p,
                               value_bytes=self.value_bytes, scale_stride=self.scale_stride,
                               scale_bytes=self.scale_stride)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["buffer", "allocated"],
                   meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class HostPool:
    """A paged host pool.

    Attributes:
      buffer: ``uint8[num_layers * num_pages, page_bytes]`` in ``spec.memory_kind``; page ``p`` of
        layer ``l`` is row ``l * num_pages + p``.
      allocated: ``bool[num_pages]`` (numpy, host metadata): pages handed out by ``alloc``.
      spec: the static ``HostPoolSpec``.
    """

    buffer: jax.Array
    allocated: np.ndarray
    spec: HostPoolSpec

    @property
    def num_free_pages(self) -> int:
        return int(self.spec.num_pages - np.count_nonzero(self.allocated))


def host_memory_kind(device: jax.Device | None = None) -> str:
    """``"pinned_host"`` when ``device`` can address it, else ``"unpinned_host"``, else the
    device's default memory kind (a documented fallback for CPU builds without host memories)."""
    device = device or jax.devices()[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # pragma: no cover - very old runtimes
        kinds = set()
    for k in HOST_MEMORY_KINDS:
        if k in kinds:
            return k
    return device.default_memory().kind


def init_host_pool(layout: Layout | Cache, pool: str, num_pages: int, *,
                   device: jax.Device | None = None, memory_kind: str | None = None) -> HostPool:
    """A zero-filled host pool mirroring ``pool`` of a device cache layout.

    Args:
      layout: the device cache's ``Layout`` (or the ``Cache``).
      pool: a pool name of that layout (``"swa"``, ``"c4"``, ``"c128"``, ``"c4_indexer"``; V3.2
        ``"kv"``, ``"indexer"``; state pools work too, one row per page).
      num_pages: host pages per layer (>= 1; no page is reserved on the host).
      device: the device whose host memory to use (default: the cache's / the first device).
      memory_kind: override the memory kind (default ``host_memory_kind(device)``).
    """
    cache = layout if isinstance(layout, Cache) else None
    if cache is not None:
        layout = cache.layout
        if device is None:
            device = _single_device(cache.buffers[0], "cache")
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a jaxkv Layout or Cache, got {type(layout).__name__}")
    p = layout.pool(pool)
    if isinstance(num_pages, bool) or not isinstance(num_pages, (int, np.integer)) \
            or num_pages < 1:
        raise ValueError(f"num_pages must be an int >= 1, got {num_pages!r}")
    device = device or jax.devices()[0]
    kind = memory_kind or host_memory_kind(device)
    spec = HostPoolSpec(pool=pool, num_layers=p.spec.num_layers, num_pages=int(num_pages),
                        tokens_per_page=p.tokens_per_page, page_bytes=p.page_bytes,
                        value_bytes=p.spec.fmt.value_bytes, scale_stride=p.spec.fmt.scale_stride,
                        ratio=max(int(p.spec.ratio), 1), memory_kind=kind, device=device)
    if spec.shape[0] >= 2**31:
        raise ValueError(f"host pool of {spec.shape[0]} rows needs indices beyond int32")
    buffer = _owned(jax.device_put(np.zeros(spec.shape, np.uint8), spec.sharding), spec)
    return HostPool(buffer, np.zeros(spec.num_pages, bool), spec)


@functools.lru_cache(maxsize=None)
def _noop_write_fn(shape: tuple, sharding, donate: bool):
    """A host-buffer write that changes nothing (one out-of-range row, dropped)."""
    def f(buf):  # the same host-row update as the "xla" backup, on one dropped row
        return _host_put(buf, jnp.full((1,), shape[0], jnp.int32),
                         jnp.zeros((1, shape[1]), buf.dtype), sharding)
    return jax.jit(f, donate_argnums=(0,) if donate else (), out_shardings=sharding)


def _owned(buffer: jax.Array, spec: HostPoolSpec) -> jax.Array:
    """``buffer`` as an allocation that XLA owns and can donate (see ``_call_donating``).

    ``jax.device_put`` of a NumPy array into host memory may alias the NumPy memory (zero-copy);
    PJRT then holds an external reference on the buffer for its whole life and refuses to donate
    it (on GPU: ``INVALID_ARGUMENT: Donation requested for buffer with external reference``).  A
    donating no-op write proves the buffer donatable (and keeps it in place); where the runtime
    refuses, the no-op runs without donation, which gives a fresh XLA-owned copy.  Done once, at
    creation, before anyone can have registered the buffer's address."""
    return _call_donating(lambda d: _noop_write_fn(spec.shape, spec.sharding, d), True,
                          (buffer,), "init_host_pool", warn=False)


_EXTERNAL_REF = "external reference"


def _call_donating(make, donate: bool, args: tuple, what: str, *, warn: bool = True):
    """``make(donate)(*args)``; if the runtime refuses to donate ``args[0]`` because something
    outside XLA references it, ``make(False)(*args)`` instead (copy-on-write).

    What holds such a reference: a NumPy array that the buffer aliases (``jax.device_put`` of
    NumPy into host memory can be zero-copy), a live zero-copy NumPy view of a host-memory array
    (``np.asarray(host.buffer)`` kept alive), a DLPack export.  ``buffer_address`` /
    ``unsafe_buffer_pointer``, ``contiguous_buf_infos`` and the ``"triton"`` method do not keep
    one (their hold ends when the call returns).  The refusal happens while XLA prepares the
    call, before anything runs or is donated (checked: ``args[0]`` must still be alive), so the
    retry sees the same input.  Cost of the fallback: XLA writes the result into a new buffer,
    i.e. the whole buffer is copied once (host memory: a host-side copy of the whole pool) and
    the returned buffer has a new address (re-register it with a transfer engine); the result
    is XLA-owned, so later calls donate again."""
    if donate:
        try:
            return make(True)(*args)
        except (jax.errors.JaxRuntimeError, ValueError) as e:
            # jax 0.10 raises JaxRuntimeError, jax 0.11 (GPU) a ValueError with the same text
            if _EXTERNAL_REF not in str(e) or args[0].is_deleted():
                raise
            if warn:
                warnings.warn(f"{what}: the buffer has an external reference (a NumPy view or a "
                              "NumPy array it aliases), so it cannot be donated; it is copied "
                              "instead (whole buffer, new address: re-register it with a "
                              "transfer engine)", RuntimeWarning, stacklevel=3)
    return make(False)(*args)


def host_token_len(host: HostPool | HostPoolSpec, n: int) -> int:
    """Host slots for ``n`` full-token positions: ``n // ratio`` (``n // 4`` for C4)."""
    spec = host.spec if isinstance(host, HostPool) else host
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(n) // spec.ratio


# ---------------------------------------------------------------------------------------------
# Allocation


def alloc(host: HostPool, n_tokens: int) -> tuple[HostPool, np.ndarray]:
    """Allocates ``ceil(n_tokens / tokens_per_page)`` whole host pages (lowest free first).

    Returns:
      ``(new_state, slots)``: ``slots`` is int32[pages * tokens_per_page], every slot of the new
      pages in order (the caller uses the first ``n_tokens``).  ``n_tokens == 0`` gives no pages.

    Raises:
      ValueError: ``n_tokens`` negative / not an int, or not enough free pages (state unchanged).
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    tpp = host.spec.tokens_per_page
    need = -(-int(n_tokens) // tpp)
    free = np.flatnonzero(~host.allocated)
    if need > free.size:
        raise ValueError(f"host pool {host.spec.pool!r} has {free.size} free pages, "
                         f"{need} needed for {n_tokens} tokens ({tpp} per page)")
    pages = free[:need]
    allocated = host.allocated.copy()
    allocated[pages] = True
    slots = (pages[:, None] * tpp + np.arange(tpp)).reshape(-1).astype(np.int32)
    return dataclasses.replace(host, allocated=allocated), slots


def free(host: HostPool, indices) -> HostPool:
    """Frees the host pages holding ``indices`` (host slots; ``None`` or empty: nothing to do).

    Raises:
      ValueError: an index out of range, or a page that is not allocated (double free).
    """
    if indices is None:
        return host
    idx = _as_index_array(indices, "indices")
    if idx.size == 0:
        return host
    _check_range(idx, host.spec.capacity, "indices", f"host pool {host.spec.pool!r}")
    pages = np.unique(idx // host.spec.tokens_per_page)
    bad = pages[~host.allocated[pages]]
    if bad.size:
        raise ValueError(f"indices free host page {int(bad[0])}, which is not allocated "
                         "(double free?)")
    allocated = host.allocated.copy()
    allocated[pages] = False
    return dataclasses.replace(host, allocated=allocated)


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _single_device(x: jax.Array, arg: str) -> jax.Device:
    devs = getattr(x, "devices", lambda: set())()
    if len(devs) != 1:
        raise ValueError(f"{arg} must live on exactly one device, got {len(devs)}")
    return next(iter(devs))


def _as_index_array(x, arg: str, *, as_int64: bool = True) -> np.ndarray:
    """``x`` as a 1-D integer numpy array (int64 unless ``as_int64=False``: then the caller's
    integer dtype, no copy -- the "triton" plan range-checks before narrowing to int32)."""
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{arg} must be concrete (numpy or a jax array outside jit): host-pool "
                         "transfers are planned on the host")
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{arg} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64) if as_int64 else a


def _check_range(idx: np.ndarray, cap: int, arg: str, what: str):
    bad = (idx < 0) | (idx >= cap)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{arg}[{i}] = {int(idx[i])} is outside [0, {cap}) for {what}")


def _check_unique(idx: np.ndarray, arg: str):
    s = np.sort(idx)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"{arg} has duplicate destination {int(dup[0])}: the result would depend "
                         "on the write order")


def _has_transfer_indices(host_indices, device_indices):
    """SPEC §7: either missing -> nothing to do (None); different lengths -> ValueError.

    Returns ``None`` when there is nothing to do, else ``(host int[N], device int[N])`` in the
    caller's integer dtype (``_Plan`` widens to int64, ``_fast_plan`` checks then narrows to
    int32).
    """
    if host_indices is None or device_indices is None:
        return None
    h = _as_index_array(host_indices, "host_indices", as_int64=False)
    d = _as_index_array(device_indices, "device_indices", as_int64=False)
    if h.size != d.size:
        raise ValueError(f"host_indices and device_indices must have the same length, got "
                         f"{h.size} and {d.size}")
    if h.size == 0:
        return None
    return h, d


def _whole_pages(idx: np.ndarray, tpp: int) -> np.ndarray | None:
    """Pages when ``idx`` is a sequence of whole pages (each ``p*tpp + arange(tpp)``), else None."""
    if idx.size % tpp:
        return None
    g = idx.reshape(-1, tpp)
    if np.any(g[:, 0] % tpp) or np.any(g != g[:, :1] + np.arange(tpp)):
        return None
    return g[:, 0] // tpp


def _bucket(n: int) -> int:
    """Size bucket >= n with at most 12.5 % padding (bounds recompiles)."""
    if n <= 16:
        return max(n, 1)
    step = 1 << max(int(math.log2(n)) - 3, 0)
    return -(-n // step) * step


def _pad(a: np.ndarray, n: int, fill: int) -> np.ndarray:
    out = np.full(n, fill, np.int32)
    out[:a.size] = a
    return out


def _triton_usable(host: HostPool, cache: Cache, pool: str) -> bool:
    """Whether the ``"triton"`` method can run this transfer (for ``method="auto"``)."""
    if tl is None or jax.default_backend() != "gpu" or host.spec.memory_kind != "pinned_host":
        return False
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    s = host.spec
    p = cache.layout.pool(pool)
    b = p.placements[0].buffer
    sizes = [s.page_bytes, s.value_bytes, s.scale_stride, s.tokens_per_page * s.value_bytes,
             cache.buffers[b].shape[1], *(pl.col for pl in p.placements)]
    return all(int(x) % 4 == 0 for x in sizes)


_XLA_ON_GPU = ("the xla method is not supported on GPU by XLA 0.11 for a host-memory pool "
               "(its host-memory gather/scatter fails to compile or gives wrong bytes): use "
               "method='triton' (the default, method='auto')")


def _xla_refused(host: HostPool | None) -> bool:
    """Whether the ``"xla"`` method is refused: GPU backend and a pool in host memory."""
    kind = host.spec.memory_kind if host is not None else "pinned_host"
    return jax.default_backend() == "gpu" and kind in HOST_MEMORY_KINDS


def _resolve_method(method: str, host: HostPool | None = None, cache: Cache | None = None,
                    pool: str | None = None) -> str:
    """The host-write method to use.  Raises ``ValueError`` for ``"xla"`` on GPU with a
    host-memory pool (``_XLA_ON_GPU``), and for ``"auto"`` there when ``"triton"`` cannot run."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = _AUTO_METHOD.get(jax.default_backend(), "xla")
        if method == "triton" and (host is None or not _triton_usable(host, cache, pool)):
            if host is not None and not _xla_refused(host):
                return "xla"      # e.g. a pool in device memory: plain device ops
            raise ValueError("method='auto' on GPU needs the 'triton' method (the xla method is "
                             "not supported on GPU by XLA 0.11 for a host-memory pool), which "
                             "cannot run here: it needs jax-triton, a pinned_host pool and byte "
                             "sizes/offsets that are multiples of 4")
    if method == "xla" and _xla_refused(host):
        raise ValueError(f"method='xla': {_XLA_ON_GPU}")
    return method


def _check_call(host: HostPool, cache: Cache, pool: str, layer, impl: str, method: str):
    if not isinstance(host, HostPool):
        raise ValueError(f"host must be a HostPool, got {type(host).__name__}")
    if not isinstance(cache, Cache):
        raise ValueError(f"cache must be a jaxkv Cache, got {type(cache).__name__}")
    if pool != host.spec.pool:
        raise ValueError(f"pool must be the host pool's device pool {host.spec.pool!r}, "
                         f"got {pool!r}")
    p = cache.layout.pool(pool)
    s = host.spec
    if (p.tokens_per_page, p.page_bytes, p.spec.num_layers) != (
            s.tokens_per_page, s.page_bytes, s.num_layers):
        raise ValueError(f"cache pool {pool!r} has pages of {p.tokens_per_page} tokens / "
                         f"{p.page_bytes} B and {p.spec.num_layers} layers; the host pool "
                         f"mirrors {s.tokens_per_page} / {s.page_bytes} B / {s.num_layers}")
    if layer is not None:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < s.num_layers:
            raise ValueError(f"layer must be None or an int in [0, {s.num_layers}) "
                             f"(pool-local), got {layer!r}")
    if impl not in dispatch.IMPLS:
        raise ValueError(f"impl must be one of {dispatch.IMPLS}, got {impl!r}")
    b, _ = page_addressing(cache.layout, pool)
    dev = _single_device(cache.buffers[b], "cache buffer")
    if dev != s.device:
        raise ValueError(f"the host pool belongs to device {s.device}, the cache to {dev}")
    if host.buffer.is_deleted():
        raise ValueError("host.buffer was donated to an earlier call: use the returned state")
    if cache.buffers[b].is_deleted():
        raise ValueError("the cache buffer was donated to an earlier call: use the returned "
                         "cache")
    method = _resolve_method(method, host, cache, pool)
    return p, b, method


class _Plan:
    """Host-side plan of one transfer: pages or tokens, host rows and padded index arrays."""

    def __init__(self, host: HostPool, p, h: np.ndarray, d: np.ndarray, layers: tuple[int, ...],
                 dest: str, staging: bool = True):
        """``staging=False``: only what the ``"triton"`` method needs (validation, padded
        ``dev_locs`` / ``host_slots`` or pages), not the ``"xla"`` method's staging-page arrays
        (a ``np.unique`` over the tokens and per-layer row arrays: ~20 ms for 256K tokens)."""
        s = host.spec
        tpp = s.tokens_per_page
        h, d = h.astype(np.int64, copy=False), d.astype(np.int64, copy=False)
        hpages, dpages = _whole_pages(h, tpp), _whole_pages(d, tpp)
        if hpages is not None and dpages is not None:
            # whole pages: every check on the (tpp times fewer) pages
            _check_range(hpages * tpp, s.capacity, "host_indices", f"host pool {s.pool!r}")
            _check_range(dpages * tpp, p.capacity, "device_indices", f"device pool {p.name!r}")
            _check_unique(hpages * tpp if dest == "host" else dpages * tpp,
                          "host_indices" if dest == "host" else "device_indices")
            hp_all = hpages
            hsl = hpages * tpp
        else:
            hpages = dpages = None
            _check_range(h, s.capacity, "host_indices", f"host pool {s.pool!r}")
            _check_range(d, p.capacity, "device_indices", f"device pool {p.name!r}")
            _check_unique(h if dest == "host" else d,
                          "host_indices" if dest == "host" else "device_indices")
            hp_all = h // tpp
            hsl = h
        unalloc = ~host.allocated[hp_all]
        if unalloc.any():
            i = int(np.argmax(unalloc))
            raise ValueError(f"host_indices[{i * (tpp if hpages is not None else 1)}] = "
                             f"{int(hsl[i])} is in host page {int(hp_all[i])}, which is not "
                             "allocated (alloc it first)")
        self.layers = layers
        self.page_aligned = hpages is not None and dpages is not None
        if self.page_aligned:
            n = _bucket(hpages.size)
            self.dev_pages = _pad(dpages, n, -1)
            host_pages = hpages
            ordered = np.full(n, -1, np.int64)
            ordered[:hpages.size] = hpages
            self.n_partial, self.n_full = n, 0
        elif not staging:
            nt = _bucket(h.size)
            self.dev_locs = _pad(d, nt, -1)
            self.host_slots = _pad(h, nt, -1)
            self.n_pages = self.n_host_pages = 0
            return
        else:
            host_pages, inv, counts = np.unique(hp_all, return_inverse=True, return_counts=True)
            inv = inv.reshape(-1)
            # Backup: a host page whose every slot is written needs no read-back but its padding
            # bytes (destinations are unique, so count == tpp means fully covered).
            full = (counts == tpp) if dest == "host" else np.zeros(host_pages.size, bool)
            part_idx, full_idx = np.flatnonzero(~full), np.flatnonzero(full)
            npart = _bucket(part_idx.size) if part_idx.size else 0
            nfull = _bucket(full_idx.size) if full_idx.size else 0
            pos = np.empty(host_pages.size, np.int64)
            pos[part_idx] = np.arange(part_idx.size)
            pos[full_idx] = npart + np.arange(full_idx.size)
            n = npart + nfull
            ordered = np.full(n, -1, np.int64)
            ordered[:part_idx.size] = host_pages[part_idx]
            ordered[npart:npart + full_idx.size] = host_pages[full_idx]
            self.n_partial, self.n_full = npart, nfull
            nt = _bucket(h.size)
            self.local_locs = _pad(pos[inv] * tpp + h % tpp, nt, -1)
            self.dev_locs = _pad(d, nt, -1)
            self.host_slots = _pad(h, nt, -1)
        self.n_pages = n
        oob = s.shape[0]  # an out-of-range row: dropped on write
        lay = np.asarray(layers, np.int64)[:, None]
        rows = np.where(ordered[None, :] >= 0, lay * s.num_pages + ordered[None, :], oob)
        read = np.where(rows == oob, 0, rows)  # padding reads row 0; never written anywhere
        self.host_rows = rows.reshape(-1).astype(np.int32)
        self.read_rows = read.reshape(-1).astype(np.int32)
        self.read_rows_partial = read[:, :self.n_partial].reshape(-1).astype(np.int32)
        self.read_rows_full = read[:, self.n_partial:].reshape(-1).astype(np.int32)
        self.n_host_pages = int(host_pages.size)
        self.host_pages = host_pages


class _FastPlan:
    """Plan of the ``"triton"`` method (``_fast_plan``), the same fields as a ``_Plan`` with
    ``staging=False`` for pages (``dev_pages``, ``host_pages``, ``n_pages``, ``n_host_pages``);
    for tokens the padded index arrays stay on the device (``h_dev``, ``d_dev``: int32[bucket],
    -1 padding) and the kernel's window arrays are derived there (``_token_windows_fn``)."""

    fast = True

    def __init__(self, layers, page_aligned, **kw):
        self.layers = layers
        self.page_aligned = page_aligned
        self.__dict__.update(kw)


@functools.lru_cache(maxsize=None)
def _validate_fn(tpp: int, dest_host: bool):
    """Jitted SPEC §7 checks of one transfer on the device, for index arrays already range-checked
    on the host (min/max) and padded with -1 to a size bucket.

    ``f(h int32[n], d int32[n], allocated bool[P], count int32) -> bool[2]``: ``[ok, aligned]``;
    ``ok``: the destinations (``h`` for a backup, ``d`` for a load) are unique and every host slot
    is in an allocated page; ``aligned``: ``count % tpp == 0`` and both arrays are sequences of
    whole pages (each group of ``tpp`` is ``page * tpp + [0 .. tpp-1]``).  ~0.3 ms on the device
    for 256K tokens instead of ~8-10 ms of numpy (sort for the duplicates, page test)."""
    def f(h, d, allocated, count):
        i = jnp.arange(h.shape[0], dtype=jnp.int32)
        valid = i < count
        r = i % tpp

        def whole_pages(x):
            start = x[i - r]
            return jnp.all(~valid | ((x == start + r) & (start % tpp == 0)))
        aligned = (count % tpp == 0) & whole_pages(h) & whole_pages(d)
        big = jnp.iinfo(jnp.int32).max
        srt = jnp.sort(jnp.where(valid, h if dest_host else d, big))
        unique = ~jnp.any((srt[1:] == srt[:-1]) & (srt[1:] != big))
        alloc_ok = jnp.all(~valid | allocated[jnp.where(valid, h // tpp, 0)])
        return jnp.stack([unique & alloc_ok, aligned])
    return jax.jit(f)


def _in_range(a: np.ndarray, cap: int) -> bool:
    """Every entry in ``[0, cap)``: two reductions, no temporaries."""
    return a.size == 0 or (int(a.min()) >= 0 and int(a.max()) < cap)


# Index count from which the "triton" plan checks on the device (below it the numpy ``_Plan`` is
# cheaper than a device dispatch + read-back: ~0.25 ms for 4K tokens on the CPU box, ~23 ns per
# index, against a fixed ~0.3-0.5 ms for upload + program + read-back).
_DEVICE_PLAN_MIN = 1 << 15


def _runs_of_pages(x: np.ndarray, tpp: int) -> bool:
    """Whether ``x`` is a sequence of whole pages, each ``page * tpp + [0 .. tpp-1]`` (the
    definition of ``_whole_pages``) -- up to integer wrap-around, which the caller's range
    check of the first entries excludes (a run starting in ``[0, cap - tpp]`` cannot wrap).
    The test on every ``tpp``-th entry first (rejects a token call at once), then one
    ``np.diff`` pass in the caller's dtype, no int64 copy (0.12 ms for 352K int32 on the CPU
    box, a third of the broadcast compare ``g == g[:, :1] + arange(tpp)``)."""
    if x.size % tpp or np.any(x[::tpp] % tpp):
        return False
    if tpp > 1:
        dd = np.diff(x)
        dd[tpp - 1::tpp] = 1             # page boundaries: any step
        return bool((dd == 1).all())
    return True


def _host_page_plan(host: HostPool, p, h: np.ndarray, d: np.ndarray, dest: str):
    """SPEC §7 checks of a page-aligned call on the host, at page granularity.

    ``None`` when the call is not made of whole pages on both sides (the token path; nothing
    checked yet); ``False`` when a check fails (the caller re-runs the numpy ``_Plan`` for its
    exact error); else ``(host_pages, device_pages)`` (int64, one entry per page).  Checks: the
    page structure (``_runs_of_pages``), the range of each run's first and last slot (hence of
    every slot), duplicate destination pages (a sort of ``N / tpp`` pages) and the host pages'
    allocation -- no device work, no sync (~0.5 ms for 352K slots on the 2-core CPU box; run 4
    on the H100: numpy ``_Plan`` 2.7 ms, its device-checked plan 3.8 ms)."""
    tpp = host.spec.tokens_per_page
    if not (_runs_of_pages(h, tpp) and _runs_of_pages(d, tpp)):
        return None
    hfirst, dfirst = h[::tpp], d[::tpp]
    if not (_in_range(hfirst, host.spec.capacity - tpp + 1)
            and _in_range(dfirst, p.capacity - tpp + 1)):
        return False
    hpages = hfirst.astype(np.int64) // tpp
    dpages = dfirst.astype(np.int64) // tpp
    srt = np.sort(hpages if dest == "host" else dpages)
    if np.any(srt[1:] == srt[:-1]) or not host.allocated[hpages].all():
        return False
    return hpages, dpages


def _fast_plan(host: HostPool, p, h: np.ndarray, d: np.ndarray, layers: tuple[int, ...],
               dest: str, min_device: int | None = None):
    """The ``"triton"`` method's plan, with the same validation and errors as ``_Plan``.

    Pools whose slots do not fit int32: the numpy ``_Plan``.  Page-aligned calls are validated
    on the host at page granularity (``_host_page_plan``: no device work, no sync; run 4's
    device-checked plan of a page call took 3.8 ms on the H100, mostly its sync and uploads).
    Token calls: range checks by min/max on the host (a range error: the numpy ``_Plan``), then
    from ``min_device`` (default ``_DEVICE_PLAN_MIN``) indices the two index arrays padded to a
    size bucket (int32, -1 padding) and uploaded in one ``device_put``, the duplicate /
    allocation checks run as one jitted device program (``_validate_fn``, one small read-back)
    and the indices stay on the device; smaller token calls use the numpy plan.  Any failed
    check re-runs the numpy ``_Plan``, which raises the exact error (so messages are unchanged).
    Measured on the 2-core CPU box (256K tokens / 352K page slots): ~25 ms (token plan + window
    arrays) / ~9 ms (page plan) of numpy before; see benchmarks/NOTES.md for after."""
    s = host.spec
    tpp = s.tokens_per_page
    lim = 2**31 - 2 * tpp
    if s.capacity >= lim or p.capacity >= lim:
        return _Plan(host, p, h, d, layers, dest, staging=False)
    pages = _host_page_plan(host, p, h, d, dest)
    if pages is False:
        _Plan(host, p, h, d, layers, dest, staging=False)   # raises the exact error
        raise ValueError("host_indices / device_indices failed validation (out-of-range or "
                         "duplicate destinations or unallocated host pages)")
    if pages is not None:
        hpages, dpages = pages
        n = _bucket(hpages.size)
        return _FastPlan(layers, True, dev_pages=_pad(dpages, n, -1), host_pages=hpages,
                         n_pages=n, n_host_pages=int(hpages.size))
    small = h.size < (_DEVICE_PLAN_MIN if min_device is None else min_device)
    if small or not (_in_range(h, s.capacity) and _in_range(d, p.capacity)):
        return _Plan(host, p, h, d, layers, dest, staging=False)  # raises on a range error
    count = h.size
    nb = _bucket(count)
    hd, dd, al = jax.device_put((_pad(h, nb, -1), _pad(d, nb, -1), host.allocated), s.device)
    # (the device's whole-page flag agrees with the host test above: not page-aligned here)
    ok, _ = np.asarray(_validate_fn(tpp, dest == "host")(hd, dd, al, np.int32(count)))
    if not ok:
        _Plan(host, p, h, d, layers, dest, staging=False)   # raises the exact error
        raise ValueError("host_indices / device_indices failed validation (duplicate "
                         "destinations or unallocated host pages)")
    return _FastPlan(layers, False, h_dev=hd, d_dev=dd, n_pages=0, n_host_pages=0)


@functools.lru_cache(maxsize=None)
def _token_windows_fn(tpp: int, V: int, S: int, step: int, rows: tuple[int, ...]):
    """Jitted derivation of the token window arrays on the device (what ``_windows`` does in
    numpy for a ``_Plan``): ``f(h int32[n], d int32[n])`` -> one ``(dev_row, dev_col, host_row,
    host_col)`` int32 tuple per window kind (value; scale slot when ``S``), each padded with -1 to
    a multiple of that kind's ``ROWS`` (``rows``)."""
    def f(h, d):
        ok = (h >= 0) & (d >= 0)
        dt, ht = jnp.where(ok, d % tpp, 0), jnp.where(ok, h % tpp, 0)
        dr = jnp.where(ok, (d // tpp) * step, -1)
        hr = jnp.where(ok, h // tpp, -1)
        kinds = [(dt * V, ht * V)]
        if S:
            kinds.append((tpp * V + dt * S, tpp * V + ht * S))
        out = []
        for (dc, hc), r in zip(kinds, rows):
            m = -(-max(h.shape[0], 1) // r) * r
            out.append(tuple(jnp.pad(x.astype(jnp.int32), (0, m - x.shape[0]),
                                     constant_values=-1) for x in (dr, dc, hr, hc)))
        return tuple(out)
    return jax.jit(f)


# ---------------------------------------------------------------------------------------------
# The "xla" method: jitted functions (cached per static configuration)


def _host_take(host_buf, rows, hs):
    """Rows of a host buffer (host-memory gather; ``rows`` are in range: the plan maps padding
    rows to row 0 for reads, and their data is never written anywhere)."""
    return host_buf.at[jax.device_put(rows, hs)].get(mode="promise_in_bounds")


def _host_put(host_buf, rows, data, hs):
    """Writes device ``data`` [R, page_bytes] into host rows (out-of-range rows dropped)."""
    return host_buf.at[jax.device_put(rows, hs)].set(jax.device_put(data, hs), mode="drop",
                                                     unique_indices=True)


@functools.lru_cache(maxsize=None)
def _xla_backup_pages(pa: PageAddressing, impl: str, hs, ds, donate: bool = True):
    def f(host_buf, dev_buf, dev_pages, host_rows):
        data = dispatch.gather_pages(dev_buf, dev_pages, pa, impl=impl)  # [L, P, PB] on device
        return _host_put(host_buf, host_rows, data.reshape(-1, pa.page_bytes), hs)
    return jax.jit(f, donate_argnums=(0,) if donate else (), out_shardings=hs)


def _host_windows(host_buf, rows, col: int, width: int, hs):
    """``host_buf[rows, col:col+width]`` gathered in host memory (only the windows move)."""
    idx = jnp.stack([rows, jnp.full_like(rows, col)], axis=-1)
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                        start_index_map=(0, 1))
    return jax.lax.gather(host_buf, jax.device_put(idx, hs), dn, slice_sizes=(1, width),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


@functools.lru_cache(maxsize=None)
def _xla_backup_tokens(ta_dev: TokenAddressing, ta_stage: TokenAddressing, impl: str, hs, ds,
                       n_partial: int, n_full: int, page_bytes: int, pad_col: int,
                       donate: bool = True):
    """Token backup: staging pages = [partly covered pages read back | fully covered pages
    rebuilt from zeros + their padding bytes read back], tokens merged in, whole pages written."""
    nl = ta_stage.num_layers

    def f(host_buf, dev_buf, dev_locs, read_partial, read_full, host_rows, local_locs):
        parts = []
        if n_partial:
            pages = jax.device_put(_host_take(host_buf, read_partial, hs), ds)
            parts.append(pages.reshape(nl, n_partial, page_bytes))
        if n_full:
            pages = jnp.zeros((nl, n_full, page_bytes), jnp.uint8)
            if pad_col < page_bytes:
                pad = jax.device_put(
                    _host_windows(host_buf, read_full, pad_col, page_bytes - pad_col, hs), ds)
                pages = pages.at[:, :, pad_col:].set(pad.reshape(nl, n_full, -1))
            parts.append(pages)
        stage = jnp.concatenate(parts, axis=1).reshape(-1, page_bytes)
        value, scale = dispatch.gather_tokens(dev_buf, dev_locs, ta_dev, impl=impl)
        stage = dispatch.scatter_tokens(stage, local_locs, value, scale, ta_stage, impl=impl)
        return _host_put(host_buf, host_rows, stage, hs)
    return jax.jit(f, donate_argnums=(0,) if donate else (), out_shardings=hs)


@functools.lru_cache(maxsize=None)
def _xla_load_pages(pa: PageAddressing, impl: str, hs, ds, donate: bool):
    def f(dev_buf, host_buf, host_rows, dev_pages):
        data = jax.device_put(_host_take(host_buf, host_rows, hs), ds)
        data = data.reshape(pa.num_layers, -1, pa.page_bytes)
        return dispatch.scatter_pages(dev_buf, dev_pages, data, pa, impl=impl)
    return jax.jit(f, donate_argnums=(0,) if donate else (), out_shardings=ds)


@functools.lru_cache(maxsize=None)
def _xla_load_tokens(ta_dev: TokenAddressing, ta_stage: TokenAddressing, impl: str, hs, ds,
                     donate: bool):
    def f(dev_buf, host_buf, host_rows, local_locs, dev_locs):
        stage = jax.device_put(_host_take(host_buf, host_rows, hs), ds)
        value, scale = dispatch.gather_tokens(stage, local_locs, ta_stage, impl=impl)
        return dispatch.scatter_tokens(dev_buf, dev_locs, value, scale, ta_dev, impl=impl)
    return jax.jit(f, donate_argnums=(0,) if donate else (), out_shardings=ds)


def _full_scale(ta: TokenAddressing) -> TokenAddressing:
    """Token addressing that moves the whole scale slot (pad byte included)."""
    return ta._replace(scale_bytes=ta.scale_stride)


def _dev_addressing(cache: Cache, pool: str, layers):
    b, pa = page_addressing(cache.layout, pool, layers)
    _, ta = token_addressing(cache.layout, pool, layers)
    return b, pa, _full_scale(ta)


# ---------------------------------------------------------------------------------------------
# The "triton" method: a kernel reads/writes pinned host memory through its device-visible address


def _copy_windows_src(dev_in, dev_row, dev_col, host_row, host_col, lay, host_addr, out,
                      DEV_ROW: tl.constexpr, HOST_ROW: tl.constexpr, W: tl.constexpr,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, ALIGN: tl.constexpr,
                      NL: tl.constexpr, TO_HOST: tl.constexpr, SHIFT: tl.constexpr = 0):
    """Copies windows of ``W`` 4-byte words between the device buffer and host memory at
    ``host_addr``, for each of ``NL`` layers: window ``i`` of layer ``l`` is at device byte offset
    ``(dev_row[i] + lay[3l]) * DEV_ROW + dev_col[i] + lay[3l+1]`` and host byte offset
    ``(host_row[i] + lay[3l+2]) * HOST_ROW + host_col[i]`` (int32 index arrays: per window, not per
    window and layer).  Rows < 0 mark padding windows (skipped).  ``TO_HOST``: device -> host
    (``out`` is a dummy), else host -> device (``out`` aliases ``dev_in``).  Grid:
    ``(num_windows / ROWS, cdiv(W + SHIFT, BLOCK), NL)`` (``_grid``): program ``(i, j, l)`` copies
    words ``[j * BLOCK, (j + 1) * BLOCK)`` of windows ``i * ROWS .. i * ROWS + ROWS - 1`` of layer
    ``l`` as one ``[ROWS, BLOCK]`` tile.  The window arrays are padded to a multiple of ``ROWS``.
    ``SHIFT`` (> 0: the largest shift, ``32 - ALIGN`` words): each window's words are counted from
    the 128-B host line that holds its first byte (word ``k`` of the tile row is window word
    ``k - hs``, ``hs = (host address of the window % 128) / 4``; words outside the window are
    masked), so every warp's 512-B host access covers whole 128-B lines instead of straddling
    5 lines when the window starts 64 B into a line (every other C4 page: 37,440 = 292.5 x 128).
    The device side takes the same shift (HBM tolerates it)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    l = tl.program_id(2)
    w = i * ROWS + tl.arange(0, ROWS)
    dr0 = tl.load(dev_row + w)
    hr0 = tl.load(host_row + w)
    ok = (dr0 >= 0) & (hr0 >= 0)
    dr = dr0.to(tl.int64) + tl.load(lay + 3 * l).to(tl.int64)
    dc = tl.load(dev_col + w).to(tl.int64) + tl.load(lay + 3 * l + 1).to(tl.int64)
    hr = hr0.to(tl.int64) + tl.load(lay + 3 * l + 2).to(tl.int64)
    hc = tl.load(host_col + w).to(tl.int64)
    hoff = hr * HOST_ROW + hc                       # host byte offset of the window
    doff = (dr * DEV_ROW + dc) // 4                 # device word offset of the window
    offs = j * BLOCK + tl.arange(0, BLOCK)
    if SHIFT:
        hs = tl.multiple_of(((host_addr + hoff) % 128) // 4, ALIGN)   # words into the line
        dbase = tl.multiple_of(tl.where(ok, doff - hs, 0), ALIGN)
        hbase = tl.multiple_of(tl.where(ok, hoff // 4 - hs, 0), ALIGN)
        widx = offs[None, :] - hs[:, None]          # word index inside the window
        m = ok[:, None] & (widx >= 0) & (widx < W)
    else:
        dbase = tl.multiple_of(tl.where(ok, doff, 0), ALIGN)
        hbase = tl.multiple_of(tl.where(ok, hoff // 4, 0), ALIGN)
        m = ok[:, None] & (offs < W)[None, :]
    host = host_addr.to(tl.pointer_type(tl.uint32))
    # The compiler cannot know the alignment of a pointer made from an integer: without this
    # hint every host access is a 4-B access (checked in the PTX); with it, 16-B (ALIGN = 4) ones.
    # (host_addr is 16-B aligned whenever ALIGN > 1: window_params.)
    hptr = tl.max_contiguous(tl.multiple_of(host + hbase[:, None] + offs[None, :],
                                            [1, 4 * ALIGN]), [1, ALIGN])
    if TO_HOST:
        src = dev_in.to(tl.pointer_type(tl.uint32))
        x = tl.load(src + dbase[:, None] + offs[None, :], mask=m)
        tl.store(hptr, x, mask=m)
    else:
        dst = out.to(tl.pointer_type(tl.uint32))
        x = tl.load(hptr, mask=m)
        tl.store(dst + dbase[:, None] + offs[None, :], x, mask=m)


def _grid(num_windows: int, meta: dict) -> tuple[int, int, int]:
    """Launch grid of the window-copy kernel (``num_windows`` already a multiple of ROWS)."""
    words = meta["W"] + meta.get("SHIFT", 0)
    return (-(-num_windows // meta["ROWS"]), -(-words // meta["BLOCK"]), meta["NL"])


def _pad_windows(arrays: tuple, rows: int) -> tuple:
    """The four int32 window arrays padded with -1 to a multiple of ``rows`` (the per-layer
    array, last, unchanged)."""
    n = arrays[0].size
    m = -(-max(n, 1) // rows) * rows
    if m == n:
        return arrays
    return tuple(np.concatenate([a, np.full(m - n, -1, np.int32)]) for a in arrays[:4]) + \
        tuple(arrays[4:])


@functools.lru_cache(maxsize=None)
def _copy_windows_kernel(interpret: bool = False):
    if tl is None:
        raise ValueError("method='triton' needs triton (pip install 'jaxkv[gpu]')")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_copy_windows_src)
    import triton
    return triton.jit(_copy_windows_src)


def _jax_triton():
    if jax.default_backend() != "gpu":
        raise ValueError("method='triton' writes pinned host memory from a CUDA kernel: it needs a "
                         "GPU backend (use method='xla' elsewhere)")
    try:
        import jax_triton
    except ImportError as e:  # pragma: no cover - depends on the GPU environment
        raise ValueError("method='triton' needs jax-triton (pip install 'jaxkv[gpu]')") from e
    return jax_triton


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Words (4 B) per program of the window-copy kernel: a [ROWS, BLOCK] tile of 16 KB, 8 warps.
# Whole C4 pages (37,440 B = 9,360 words): BLOCK 2,048, 2 pages x 5 chunks (91 % of the lanes
# busy); token values (576 B = 144 words): BLOCK 256, 16 tokens per program; 8-B scale slots:
# 2,048 per program.  (The first version ran one 4-KB program per window chunk: one program per
# token value and one per 8-B scale slot -- 11M tiny programs for 256K tokens x 21 layers.)
_TILE_WORDS = 4096
# Rows of the tile when windows are wider than one 8-KB chunk (whole pages): 4 x 2,048 words
# (32 KB per program).  H100 run 5, kernels only, C4 pages: load 0.938 vs 0.927 with 2 rows (the
# 16-KB default), backup 1.002 vs 1.006 (same within noise); run 7 (this default): 1, 2 and 4
# rows all equal (load 0.947, backup 0.974) -- no measurable effect either way.
_WIDE_ROWS = 4
# Whether wide windows are copied in host-line-aligned warp accesses (the kernel's ``SHIFT``).
# Unmeasured on the GPU when written (run 5 compares: benchmark rows "kernels only ... [host
# lines unaligned, before]"); False gives the kernel of runs 3-4.
_HOST_LINE_ALIGN = True


def window_params(width: int, dev_row_bytes: int, host_row_bytes: int, host_addr: int,
                  offsets: Sequence[int], num_layers: int = 1) -> dict:
    """constexpr parameters of the window-copy kernel (every byte size/offset must be a multiple
    of 4; ``ALIGN`` is the word alignment, up to 4 words = 16 B, that every window start has)."""
    sizes = [width, dev_row_bytes, host_row_bytes, *offsets]
    if any(int(x) % 4 for x in sizes):
        raise ValueError(f"method='triton' copies 4-byte words; sizes/offsets {sizes} are not all "
                         "multiples of 4 (use method='xla')")
    if int(host_addr) % 4:
        raise ValueError(f"method='triton' needs a 4-byte aligned host buffer, got address "
                         f"{host_addr:#x}")
    g = math.gcd(*[int(x) for x in sizes if x] or [16], 16)
    align = 4 if (g % 16 == 0 and host_addr % 16 == 0) else \
        (2 if (g % 8 == 0 and host_addr % 8 == 0) else 1)
    words = width // 4
    # Host-line alignment (the kernel's SHIFT) for windows of >= 512 B (a warp's access): pages
    # and token values; not 8-B scale slots (a shift would need 16x wider tiles there).
    shift = (32 - align) if (_HOST_LINE_ALIGN and words >= 128) else 0
    block = min(_TILE_WORDS // 2, _pow2(words + shift))
    rows = max(1, _TILE_WORDS // block)
    if block == _TILE_WORDS // 2:  # page-wide windows: 4 chunks of 8 KB (32 KB) per program
        rows = _WIDE_ROWS
    return dict(DEV_ROW=dev_row_bytes, HOST_ROW=host_row_bytes, W=words, BLOCK=block,
                ROWS=rows, ALIGN=align, NL=int(num_layers), SHIFT=shift)


@functools.lru_cache(maxsize=None)
def _triton_copy_fn(to_host: bool, host_addr: int, meta: tuple, donate: bool):
    jt = _jax_triton()
    kernel = _copy_windows_kernel()
    meta = dict(meta)
    tile = meta["ROWS"] * meta["BLOCK"]
    nw = max(1, min(8, tile // 512))

    def f(dev_buf, dev_row, dev_col, host_row, host_col, lay):
        out = (jax.ShapeDtypeStruct((1,), jnp.int32) if to_host
               else jax.ShapeDtypeStruct(dev_buf.shape, dev_buf.dtype))
        return jt.triton_call(dev_buf, dev_row, dev_col, host_row, host_col, lay, int(host_addr),
                              kernel=kernel, out_shape=out, grid=_grid(dev_row.shape[0], meta),
                              input_output_aliases={} if to_host else {0: 0}, num_warps=nw,
                              num_stages=1, TO_HOST=to_host, **meta)
    return jax.jit(f, donate_argnums=(0,) if (donate and not to_host) else ())


def _windows(host: HostPool, cache: Cache, pool: str, plan: _Plan):
    """Per-window int32 ``(dev_row, dev_col, host_row, host_col)`` arrays (one entry per page or
    token, shared by all layers) and the per-layer int32 ``lay`` = ``[row_base, col, host row
    offset]`` x layers, as the window-copy kernel takes them.

    Returns a list of ``(width_bytes, col_offsets, (dev_row, dev_col, host_row, host_col, lay))``:
    one entry for whole pages, or two (value, scale) for tokens.  Padding windows have row -1.
    (The first version built these arrays per window *and layer*: 8 x 5.5M int32 for 256K tokens
    x 21 layers, ~0.4 s of host time per call, which bounded the token path to 0.17 of the
    ceiling on the H100.)
    """
    s = host.spec
    tpp, V, S = s.tokens_per_page, s.value_bytes, s.scale_stride
    p = cache.layout.pool(pool)
    pl = [p.placements[l] for l in plan.layers]
    step = pl[0].row_step
    lay = np.array([(x.row_base, x.col, l * s.num_pages) for x, l in zip(pl, plan.layers)],
                   np.int64).reshape(-1)
    if lay.max(initial=0) >= 2**31:
        raise ValueError("method='triton': cache rows beyond int32")
    lay = lay.astype(np.int32)
    cols = tuple(int(x.col) for x in pl)

    def i32(a):
        return np.ascontiguousarray(a, dtype=np.int32)

    if plan.page_aligned:
        dp = plan.dev_pages.astype(np.int64)
        hpg = np.full(plan.n_pages, -1, np.int64)
        hpg[:plan.n_host_pages] = plan.host_pages
        ok = (dp >= 0) & (hpg >= 0)
        dr, hr = np.where(ok, dp * step, -1), np.where(ok, hpg, -1)
        zeros = np.zeros(dr.size, np.int32)
        return [(s.page_bytes, cols, (i32(dr), zeros, i32(hr), zeros, lay))]
    d = plan.dev_locs.astype(np.int64)
    hslot = plan.host_slots.astype(np.int64)
    ok = (d >= 0) & (hslot >= 0)
    dpage, dt = np.where(ok, d // tpp, 0), np.where(ok, d % tpp, 0)
    hpage, ht = np.where(ok, hslot // tpp, 0), np.where(ok, hslot % tpp, 0)
    dr, hr = i32(np.where(ok, dpage * step, -1)), i32(np.where(ok, hpage, -1))
    cols = cols + (tpp * V,)
    out = [(V, cols, (dr, i32(dt * V), hr, i32(ht * V), lay))]
    if S:
        out.append((S, cols, (dr, i32(tpp * V + dt * S), hr, i32(tpp * V + ht * S), lay)))
    return out


def _layer_offsets(host: HostPool, cache: Cache, pool: str, layers) -> tuple:
    """``(lay, cols, step)``: the kernel's per-layer int32 ``[row_base, col, host row offset]``
    array, the layers' column offsets and the device row step (static geometry only)."""
    s = host.spec
    pl = [cache.layout.pool(pool).placements[l] for l in layers]
    lay = np.array([(x.row_base, x.col, l * s.num_pages) for x, l in zip(pl, layers)],
                   np.int64).reshape(-1)
    if lay.max(initial=0) >= 2**31:
        raise ValueError("method='triton': cache rows beyond int32")
    return lay.astype(np.int32), tuple(int(x.col) for x in pl), int(pl[0].row_step)


def _launch_windows(host: HostPool, cache: Cache, pool: str, plan):
    """``(width, cols, arrays)`` per window kind, ready for the kernel: host-built numpy arrays
    (pages; tokens of a numpy ``_Plan``) or, for the tokens of a ``_FastPlan``, arrays derived on
    the device by ``_token_windows_fn`` (one dispatch, no host work)."""
    if plan.page_aligned or not getattr(plan, "fast", False):
        return _windows(host, cache, pool, plan), False
    s = host.spec
    tpp, V, S = s.tokens_per_page, s.value_bytes, s.scale_stride
    lay, cols, step = _layer_offsets(host, cache, pool, plan.layers)
    cols = cols + (tpp * V,)
    kinds = [V] + ([S] if S else [])
    b, _ = page_addressing(cache.layout, pool)
    row_bytes = cache.buffers[b].shape[1]
    addr = buffer_address(host)
    rows = tuple(window_params(w, row_bytes, s.page_bytes, addr, cols, len(plan.layers))["ROWS"]
                 for w in kinds)
    wins = _token_windows_fn(tpp, V, S, step, rows)(plan.h_dev, plan.d_dev)
    lay_dev = jnp.asarray(lay)
    return [(w, cols, (*a, lay_dev)) for w, a in zip(kinds, wins)], True


def _triton_plan(host: HostPool, cache: Cache, pool: str, plan):
    """Everything of a ``"triton"`` call before its kernels: ``(b, addr, [(meta, arrays)])``
    with the window arrays on the device (the benchmark times this and the kernels apart)."""
    if host.spec.memory_kind != "pinned_host":
        raise ValueError(f"method='triton' needs a pinned_host pool (device-visible address); this "
                         f"pool lives in {host.spec.memory_kind!r}: use method='xla'")
    _jax_triton()
    b, _ = page_addressing(cache.layout, pool)
    host.buffer.block_until_ready()        # earlier XLA writes of the host buffer are done
    addr = buffer_address(host)
    row_bytes = cache.buffers[b].shape[1]
    windows, padded = _launch_windows(host, cache, pool, plan)
    calls = []
    for width, cols, arrays in windows:
        meta = window_params(width, row_bytes, host.spec.page_bytes, addr, cols,
                             len(plan.layers))
        if not padded:
            arrays = _upload_windows(_pad_windows(arrays, meta["ROWS"]), host.spec.device)
        calls.append((meta, arrays))
    return b, addr, calls


_DEVICE_CONSTS: dict = {}


def _upload_windows(arrays: tuple, device: jax.Device) -> tuple:
    """The kernel's int32 window arrays on ``device``: all-zero arrays (the page path's columns)
    and the per-layer array (static geometry) from a small cache of device constants, the others
    in one ``device_put`` (the page call of run 4 uploaded 5 arrays one by one)."""
    out, todo = [None] * len(arrays), []
    for i, a in enumerate(arrays):
        key = (device, a.size, None) if i < 4 and not a.any() else \
            ((device, a.size, a.tobytes()) if i == 4 else None)
        if key is not None and key in _DEVICE_CONSTS:
            out[i] = _DEVICE_CONSTS[key]
        else:
            todo.append((i, a, key))
    if todo:
        got = jax.device_put(tuple(a for _, a, _ in todo), device)
        if len(_DEVICE_CONSTS) > 64:
            _DEVICE_CONSTS.clear()
        for (i, _, key), x in zip(todo, got):
            out[i] = x
            if key is not None:
                _DEVICE_CONSTS[key] = x
    return tuple(out)


def _triton_kernels(cache: Cache, b: int, addr: int, calls, to_host: bool, donate: bool):
    """Runs the window kernels of ``_triton_plan`` and waits for them; returns the device
    buffer (the new one for a load)."""
    dev = cache.buffers[b]
    outs = []
    for meta, arrays in calls:
        make = functools.partial(_triton_copy_fn, to_host, addr, tuple(sorted(meta.items())))
        res = _call_donating(make, donate and not to_host, (dev, *arrays), "load_to_device")
        if not to_host:
            dev = res          # the next window kernel updates (and may donate) this one
        else:
            outs.append(res)
    # XLA does not see the host accesses: finish them before returning.  Loads chain their
    # window kernels (value, then scale) through the device buffer, and the second one may have
    # donated the first one's result: wait on the last result only (waiting on a donated
    # buffer raises "BlockHostUntilReady() called on deleted or donated buffer").
    jax.block_until_ready(outs if to_host else dev)
    return dev


def _triton_run(host: HostPool, cache: Cache, pool: str, plan, to_host: bool,
                donate: bool):
    b, addr, calls = _triton_plan(host, cache, pool, plan)
    return b, _triton_kernels(cache, b, addr, calls, to_host, donate)


# ---------------------------------------------------------------------------------------------
# The "staged" token path of the "triton" method: tokens that fill whole host pages are gathered
# on the device into page-shaped staging rows, which go to / come from the host as one window of
# ``tpp * (V + S)`` bytes per page (the page kernel's access pattern: ~37 KB contiguous per page
# for C4, the page padding untouched); the other tokens take the direct per-token windows.

TOKEN_PATHS = ("auto", "direct", "staged")
# What token_path="auto" takes: "direct" -- H100 run 4, 256K random tokens end to end: direct
# 0.870 / 0.855 of the ceiling (backup / load), staged 0.798 / 0.734 (its device gather/scatter
# pass costs more than the page-shaped host writes save).
_AUTO_TOKEN_PATH = "direct"


@functools.lru_cache(maxsize=None)
def _staged_plan_fn(tpp: int, V: int, S: int, step: int, rows_page: int, rows_tok: tuple):
    """Jitted split of a token transfer (``h``, ``d``: int32[n], -1 padding) into full host pages
    and the rest, on the device.

    A host page is *full* when all its ``tpp`` slots appear (found on the indices sorted by host
    slot: distinct slots per run of one page, segmented by ``cummax`` / ``cummin``); the first
    copy of each slot is staged, further copies (a load may read a host slot twice) go direct.
    Returns ``(src, page_windows, token_windows)``:
    ``src`` int32[Pmax*tpp] (``Pmax = n // tpp``): the device location of each staging slot
    (staging page ``q`` slot ``t``), -1 where unused; ``page_windows``: ``(dev_row, dev_col,
    host_row, host_col)`` of the staging pages (dev_row = ``q``, host_row = the host page), padded
    with -1 to a multiple of ``rows_page``; ``token_windows``: the direct windows
    (``_token_windows_fn``) of the tokens not in a full page."""
    def f(h, d):
        n = h.shape[0]
        pmax = max(n // tpp, 1)
        big = jnp.iinfo(jnp.int32).max
        key = jnp.where((h >= 0) & (d >= 0), h, big)
        order = jnp.argsort(key)
        srt, ds = key[order], d[order]
        vs = srt != big
        k = jnp.arange(n, dtype=jnp.int32)
        r = jnp.where(vs, srt % tpp, 0)
        pg = jnp.where(vs, srt // tpp, -1)
        one = jnp.ones(1, bool)
        first = vs & jnp.concatenate([one, srt[1:] != srt[:-1]])   # first copy of a slot
        bnd = vs & jnp.concatenate([one, pg[1:] != pg[:-1]])        # first entry of a page
        bnd_end = vs & jnp.concatenate([pg[:-1] != pg[1:], one])    # last entry of a page
        p0 = jax.lax.cummax(jnp.where(bnd, k, 0))
        p1 = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(bnd_end, k, n - 1))))
        cf = jnp.cumsum(first.astype(jnp.int32))
        full = vs & (cf[p1] - cf[p0] + 1 == tpp)                   # distinct slots == tpp
        in_full = full & first
        q = jnp.cumsum((bnd & full).astype(jnp.int32)) - 1          # staging page of a page
        src = jnp.full(pmax * tpp, -1, jnp.int32).at[
            jnp.where(in_full, q * tpp + r, pmax * tpp)].set(ds, mode="drop")
        hpage = jnp.full(pmax, -1, jnp.int32).at[
            jnp.where(bnd & full, q, pmax)].set(pg, mode="drop")
        m = -(-pmax // rows_page) * rows_page

        def pad(x):
            return jnp.pad(x.astype(jnp.int32), (0, m - pmax), constant_values=-1)
        dr = jnp.where(hpage >= 0, jnp.arange(pmax, dtype=jnp.int32), -1)
        zeros = jnp.zeros(pmax, jnp.int32)
        pages = (pad(dr), pad(zeros), pad(hpage), pad(zeros))
        left = vs & ~in_full
        toks = _token_windows_fn(tpp, V, S, step, rows_tok)(jnp.where(left, srt, -1),
                                                            jnp.where(left, ds, -1))
        return src, pages, toks
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _stage_gather_fn(ta: TokenAddressing, impl: str, tpp: int):
    """``(cache_buf, src int32[P*tpp]) -> uint8[L*P, tpp*(V+S)]``: staging pages of tokens."""
    def f(buf, src):
        value, scale = dispatch.gather_tokens(buf, src, ta, impl=impl)
        nl = value.shape[0]
        parts = [value.reshape(nl, -1, tpp * ta.value_bytes)]
        if ta.scale_bytes:
            parts.append(scale.reshape(nl, -1, tpp * ta.scale_bytes))
        stage = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return stage.reshape(-1, stage.shape[-1])
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _stage_scatter_fn(ta: TokenAddressing, impl: str, tpp: int, donate: bool):
    """``(cache_buf, stage uint8[L*P, tpp*(V+S)], src) -> cache_buf`` with the staged tokens
    written to their device locations ``src`` (-1 skipped)."""
    def f(buf, stage, src):
        nl = ta.num_layers
        st = stage.reshape(nl, -1, stage.shape[-1])
        vb = tpp * ta.value_bytes
        value = st[..., :vb].reshape(nl, -1, ta.value_bytes)
        scale = (st[..., vb:].reshape(nl, -1, ta.scale_bytes) if ta.scale_bytes
                 else jnp.zeros((nl, value.shape[1], 0), jnp.uint8))
        return dispatch.scatter_tokens(buf, src, value, scale, ta, impl=impl)
    return jax.jit(f, donate_argnums=(0,) if donate else ())


def _resolve_token_path(token_path: str) -> str:
    if token_path not in TOKEN_PATHS:
        raise ValueError(f"token_path must be one of {TOKEN_PATHS}, got {token_path!r}")
    return _AUTO_TOKEN_PATH if token_path == "auto" else token_path


def _triton_staged(host: HostPool, cache: Cache, pool: str, plan, to_host: bool, donate: bool,
                   impl: str):
    """The token path through page-shaped staging (``TOKEN_PATHS``); returns ``(b, dev)``."""
    if host.spec.memory_kind != "pinned_host":
        raise ValueError(f"method='triton' needs a pinned_host pool (device-visible address); this "
                         f"pool lives in {host.spec.memory_kind!r}: use method='xla'")
    _jax_triton()
    s = host.spec
    tpp, V, S = s.tokens_per_page, s.value_bytes, s.scale_stride
    layers = plan.layers
    if getattr(plan, "fast", False):
        h_dev, d_dev = plan.h_dev, plan.d_dev
    else:
        h_dev, d_dev = jnp.asarray(plan.host_slots), jnp.asarray(plan.dev_locs)
    sel = None if len(layers) == s.num_layers else layers
    b, _, ta = _dev_addressing(cache, pool, sel)
    host.buffer.block_until_ready()
    addr = buffer_address(host)
    dev = cache.buffers[b]
    lay, cols, step = _layer_offsets(host, cache, pool, layers)
    tok_cols = cols + (tpp * V,)
    kinds = [V] + ([S] if S else [])
    tok_meta = [window_params(w, dev.shape[1], s.page_bytes, addr, tok_cols, len(layers))
                for w in kinds]
    width = tpp * (V + S)
    page_meta = window_params(width, width, s.page_bytes, addr, (0,), len(layers))
    src, pages, toks = _staged_plan_fn(tpp, V, S, step, page_meta["ROWS"],
                                       tuple(m["ROWS"] for m in tok_meta))(h_dev, d_dev)
    pmax = src.shape[0] // tpp
    lay_stage = jnp.asarray(np.array([(i * pmax, 0, l * s.num_pages)
                                      for i, l in enumerate(layers)], np.int32).reshape(-1))
    lay_dev = jnp.asarray(lay)

    def kernel(meta, buf, arrays, lay_arr, don):
        make = functools.partial(_triton_copy_fn, to_host, addr, tuple(sorted(meta.items())))
        return _call_donating(make, don and not to_host, (buf, *arrays, lay_arr),
                              "load_to_device")
    outs = []
    if to_host:
        stage = _stage_gather_fn(ta, impl, tpp)(dev, src)
        outs.append(kernel(page_meta, stage, pages, lay_stage, False))
        for meta, arrays in zip(tok_meta, toks):
            outs.append(kernel(meta, dev, arrays, lay_dev, False))
        jax.block_until_ready(outs)
        return b, dev
    stage = jnp.zeros((len(layers) * pmax, width), jnp.uint8)
    stage = kernel(page_meta, stage, pages, lay_stage, True)
    dev = _call_donating(lambda dn: _stage_scatter_fn(ta, impl, tpp, dn), donate,
                         (dev, stage, src), "load_to_device")
    for meta, arrays in zip(tok_meta, toks):
        dev = kernel(meta, dev, arrays, lay_dev, True)
    jax.block_until_ready(dev)
    return b, dev


def _triton_backup(host: HostPool, cache: Cache, pool: str, plan: _Plan,
                   token_path: str = "direct", impl: str = "auto") -> HostPool:
    if token_path == "staged" and not plan.page_aligned:
        _triton_staged(host, cache, pool, plan, True, False, impl)
    else:
        _triton_run(host, cache, pool, plan, to_host=True, donate=False)
    # The host buffer was written in place: the returned state shares it (the old one must not
    # be used any more, as after a donation).
    return dataclasses.replace(host)


def _triton_load(host: HostPool, cache: Cache, pool: str, plan: _Plan, donate: bool,
                 token_path: str = "direct", impl: str = "auto") -> Cache:
    if token_path == "staged" and not plan.page_aligned:
        b, dev = _triton_staged(host, cache, pool, plan, False, donate, impl)
    else:
        b, dev = _triton_run(host, cache, pool, plan, to_host=False, donate=donate)
    bufs = list(cache.buffers)
    bufs[b] = dev
    return Cache(tuple(bufs), cache.layout)


# ---------------------------------------------------------------------------------------------
# Public transfers


def backup_from_device(host: HostPool, cache: Cache, pool: str, host_indices, device_indices, *,
                       layer: int | None = None, impl: str = "auto",
                       method: str = "auto", token_path: str = "auto") -> HostPool:
    """Copies tokens of a device pool into the host pool (SGLang ``backup_from_device_all_layer``).

    Args:
      host: the host pool (its buffer is donated: use the returned state).  With the ``"xla"``
        method, a buffer that has an external reference (a live NumPy view, a NumPy array it
        aliases) cannot be donated on GPU: it is then copied once (copy-on-write, a
        ``RuntimeWarning``; the returned buffer has a new address) -- see the module docstring.
      cache: the device cache (read only).
      pool: the device pool name; must be the one ``host`` mirrors.
      host_indices: int[N] host slots (allocated pages), or None.
      device_indices: int[N] device pool locations, or None.
      layer: pool-local layer, or None for all layers (SGLang's "all_layer").
      impl: kernel implementation for the device gathers/scatters (``jaxkv.kernels.dispatch``).
      method: ``"auto" | "xla" | "triton"`` (see the module docstring).
      token_path: ``"auto" | "direct" | "staged"``, the ``"triton"`` method's token-granular path
        (``TOKEN_PATHS``): ``"direct"`` = each token's value and scale slot copied by the kernel
        straight between the cache and the host pages; ``"staged"`` = tokens that fill whole host
        pages are gathered on the device into page-shaped staging rows and copied as one
        ``tpp * (V + S)``-byte window per page (extra device memory: the staging, ~the payload),
        the others direct.  ``"auto"``: ``_AUTO_TOKEN_PATH``.  Same bytes either way.

    Returns:
      The new host pool.  Page-aligned indices copy whole pages (host page bytes == device page
      bytes); otherwise each token's value and whole scale slot are copied and every other host
      byte is preserved.

    Raises:
      ValueError: different index lengths, out-of-range or duplicate host indices, unallocated host
        pages, a pool/geometry/device mismatch.  Nothing is changed then.
    """
    p, b, method = _check_call(host, cache, pool, layer, impl, method)
    tpath = _resolve_token_path(token_path)
    idx = _has_transfer_indices(host_indices, device_indices)
    if idx is None:
        return host
    layers = tuple(range(host.spec.num_layers)) if layer is None else (int(layer),)
    if method == "triton":
        return _triton_backup(host, cache, pool,
                              _fast_plan(host, p, idx[0], idx[1], layers, "host"), tpath, impl)
    plan = _Plan(host, p, idx[0], idx[1], layers, dest="host")
    s = host.spec
    hs, ds = s.sharding, cache.buffers[b].sharding
    sel = None if layer is None else layers
    b, pa, ta_dev = _dev_addressing(cache, pool, sel)
    rows = jnp.asarray(plan.host_rows)
    if plan.page_aligned:
        make = functools.partial(_xla_backup_pages, pa, impl, hs, ds)
        args = (host.buffer, cache.buffers[b], jnp.asarray(plan.dev_pages), rows)
    else:
        ta_stage = s.token_addressing(plan.n_pages, layers)
        make = functools.partial(_xla_backup_tokens, ta_dev, ta_stage, impl, hs, ds,
                                 plan.n_partial, plan.n_full, s.page_bytes,
                                 s.tokens_per_page * (s.value_bytes + s.scale_stride))
        args = (host.buffer, cache.buffers[b], jnp.asarray(plan.dev_locs),
                jnp.asarray(plan.read_rows_partial), jnp.asarray(plan.read_rows_full), rows,
                jnp.asarray(plan.local_locs))
    buf = _call_donating(make, True, args, "backup_from_device")
    return dataclasses.replace(host, buffer=buf)


def load_to_device(host: HostPool, cache: Cache, pool: str, host_indices, device_indices, *,
                   layer: int | None = None, impl: str = "auto", method: str = "auto",
                   donate: bool = True, token_path: str = "auto") -> Cache:
    """Copies tokens from the host pool into a device pool (SGLang ``load_to_device_*``).

    Args:
      host: the host pool (read only).
      cache: the device cache; its pool buffer is donated unless ``donate=False``.
      pool, host_indices, device_indices, layer, impl, method, token_path: as
        ``backup_from_device``;
        ``device_indices`` must not repeat (they are the destinations).

    Returns:
      The new cache.  Page-aligned: whole device pages are overwritten with the host pages.
      Otherwise each token's value and whole scale slot are written; other device bytes unchanged.
    """
    p, b, method = _check_call(host, cache, pool, layer, impl, method)
    tpath = _resolve_token_path(token_path)
    idx = _has_transfer_indices(host_indices, device_indices)
    if idx is None:
        return cache
    layers = tuple(range(host.spec.num_layers)) if layer is None else (int(layer),)
    if method == "triton":
        return _triton_load(host, cache, pool,
                            _fast_plan(host, p, idx[0], idx[1], layers, "device"), donate,
                            tpath, impl)
    plan = _Plan(host, p, idx[0], idx[1], layers, dest="device")
    s = host.spec
    hs, ds = s.sharding, cache.buffers[b].sharding
    sel = None if layer is None else layers
    b, pa, ta_dev = _dev_addressing(cache, pool, sel)
    rows = jnp.asarray(plan.read_rows)
    if plan.page_aligned:
        make = functools.partial(_xla_load_pages, pa, impl, hs, ds)
        args = (cache.buffers[b], host.buffer, rows, jnp.asarray(plan.dev_pages))
    else:
        ta_stage = s.token_addressing(plan.n_pages, layers)
        make = functools.partial(_xla_load_tokens, ta_dev, ta_stage, impl, hs, ds)
        args = (cache.buffers[b], host.buffer, rows, jnp.asarray(plan.local_locs),
                jnp.asarray(plan.dev_locs))
    new = _call_donating(make, donate, args, "load_to_device")
    bufs = list(cache.buffers)
    bufs[b] = new
    return Cache(tuple(bufs), cache.layout)


def backup_from_device_all_layer(host, cache, pool, host_indices, device_indices, **kw):
    """SGLang's name: ``backup_from_device(..., layer=None)``."""
    return backup_from_device(host, cache, pool, host_indices, device_indices, layer=None, **kw)


def load_to_device_per_layer(host, cache, pool, layer, host_indices, device_indices, **kw):
    """SGLang's name: ``load_to_device(..., layer=layer)``."""
    return load_to_device(host, cache, pool, host_indices, device_indices, layer=layer, **kw)


def load_to_device_all_layer(host, cache, pool, host_indices, device_indices, **kw):
    """``load_to_device(..., layer=None)``."""
    return load_to_device(host, cache, pool, host_indices, device_indices, layer=None, **kw)


# ---------------------------------------------------------------------------------------------
# Transfer-engine registration and inspection


def buffer_address(host: HostPool) -> int:
    """The host buffer's address (``unsafe_buffer_pointer``; valid until the buffer is donated).

    Blocks until pending writes of the buffer are done, so that raw writes through the address
    (a transfer engine, the ``"triton"`` method) cannot be overtaken by them."""
    if host.buffer.is_deleted():
        raise ValueError("host.buffer was donated to an earlier call: use the returned state")
    # Pending XLA writes of the buffer must land before anyone writes it through the address.
    host.buffer.block_until_ready()
    return int(host.buffer.unsafe_buffer_pointer())


def contiguous_buf_infos(host: HostPool, per: str = "layer") -> tuple[list[int], list[int],
                                                                      list[int]]:
    """Memory regions for a transfer engine to register (SGLang ``get_contiguous_buf_infos``).

    Args:
      host: the host pool.
      per: ``"layer"`` (SGLang: one region per layer) or ``"region"`` (the whole buffer, one
        region; same addresses, fewer registrations).

    Returns:
      ``(data_ptrs, data_lens, item_lens)``: real addresses inside ``host.buffer`` (layer ``l``
      starts at ``buffer_address + l * num_pages * page_bytes``), byte lengths, and the bytes of
      one item (a page).  Addresses stay valid while this state's buffer is alive; the in-place
      ``"xla"`` and ``"triton"`` updates keep the same allocation (check with ``buffer_address``).
      Taking the address leaves no external reference behind.  Exception: an ``"xla"`` call on
      a buffer that has an external reference (a live NumPy view of it, a NumPy array it
      aliases) copies it (copy-on-write, ``RuntimeWarning``): re-register the new address then.
    """
    s = host.spec
    base = buffer_address(host)
    if per == "layer":
        return ([base + l * s.layer_bytes for l in range(s.num_layers)],
                [s.layer_bytes] * s.num_layers, [s.page_bytes] * s.num_layers)
    if per == "region":
        return [base], [s.nbytes], [s.page_bytes]
    raise ValueError(f"per must be 'layer' or 'region', got {per!r}")


def read_host_pages(host: HostPool, layer: int, pages=None) -> np.ndarray:
    """Host pages of one layer as numpy ``uint8[P, page_bytes]`` (inspection and tests)."""
    s = host.spec
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
            or not 0 <= layer < s.num_layers:
        raise ValueError(f"layer must be an int in [0, {s.num_layers}), got {layer!r}")
    arr = np.asarray(jax.device_get(host.buffer)).reshape(s.num_layers, s.num_pages,
                                                          s.page_bytes)[layer]
    return arr if pages is None else arr[np.asarray(pages)]


__all__ = [
    "HostPool", "HostPoolSpec", "METHODS", "TOKEN_PATHS", "alloc", "backup_from_device",
    "backup_from_device_all_layer", "buffer_address", "contiguous_buf_infos", "free",
    "host_memory_kind", "host_token_len", "init_host_pool", "load_to_device",
    "load_to_device_all_layer", "load_to_device_per_layer", "read_host_pages",
]
