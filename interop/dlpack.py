"""Zero-copy exchange of arrays between JAX and PyTorch (DLPack), and who owns what.

Exchange
--------
``to_torch(array)`` and ``from_torch(tensor)`` either alias the same memory (proved by pointer
equality: ``tensor.data_ptr() == array.unsafe_buffer_pointer()``) or raise.  They never copy
silently.  Supported dtypes: ``bfloat16``, ``float8_e4m3fn``, ``uint8``, ``int32`` (and the other
dtypes both libraries share, e.g. ``float32``, ``int8``, ``bool``).

* **int64** — with ``jax_enable_x64`` off, JAX silently copies an int64 tensor down to int32.
  ``from_torch`` therefore rejects int64 (and every other 64-bit dtype) by default;
  ``int64="convert"`` converts explicitly (a copy, values checked to fit in int32, a warning is
  issued); with x64 on, int64 is exchanged zero-copy.
* **strides** — only row-major contiguous tensors are exchanged (``tensor.is_contiguous()``); any
  other stride pattern is a ``ValueError`` telling you to call ``.contiguous()`` (which copies).
* **alignment** — JAX wants CPU buffers 64-byte aligned; an unaligned tensor (e.g. ``t[3:]``)
  cannot be aliased and is a ``ValueError``.
* **fp8** — exchanged natively.  ``from_torch(..., fp8="auto")`` falls back to a zero-copy
  ``uint8`` view (with a warning) where a JAX/torch pair lacks fp8 DLPack; ``fp8="uint8"`` always
  returns the ``uint8`` view (bitcast it inside your ``jit``, where that is free).  The other
  direction has no zero-copy fallback (JAX cannot alias an fp8 buffer as uint8): keep fp8 data in
  the cache's uint8 buffers, or bitcast inside ``jit``.
* **sharded arrays** — DLPack describes one buffer on one device.  ``to_torch`` raises for an
  array over several devices; ``to_torch_shards(array)`` returns one tensor per addressable shard
  (in ``array.addressable_shards`` order; ``shard.index`` says which slice each one is).

Streams (CUDA)
--------------
Both directions use the DLPack stream handshake, so no host synchronisation is needed:

* ``to_torch``: ``torch.from_dlpack`` passes torch's *current* stream; JAX makes that stream wait
  until the array's producing computation is done.  torch work enqueued afterwards on the current
  stream sees the final values.  (Work on other torch streams must wait on the current one.)
* ``from_torch``: JAX passes its stream for external ready events; torch makes it wait for torch's
  current stream.  JAX computations using the returned array see every torch write enqueued on the
  current stream *before* the call.  When torch's current stream has no pending work at the call
  (``cudaStreamQuery``), those writes are complete and the fast path skips the handshake (jaxlib
  gets ``stream=None``: no definition event, as on CPU); ``JAXKV_DLPACK_IDLE=0`` turns that off.
* Both directions take a fast path (jaxlib's and torch's C++ DLPack entry points with cached
  devices, streams and one reusable event) that performs exactly this handshake and passes
  jaxlib exactly the arguments the public API passes; it checks itself on first use and falls
  back to ``torch.from_dlpack`` / ``jax.dlpack.from_dlpack``.  If jaxlib's or torch's entry
  point raises after receiving the capsule, the capsule is neutralised (renamed
  "used_dltensor" and kept: never freed twice, at worst one tensor leaks; jaxlib 0.11.2 frees
  the tensor on some failures without marking the capsule, so dropping it would be a double
  free) and the call raises ``ValueError`` (no retry through the public API, which would make
  the same call and drop its capsule).  ``JAXKV_DLPACK_FAST=0`` in the environment switches both
  fast paths off from the start.
* Writes made by torch into shared memory *after* the exchange are not ordered with JAX work.
  Re-export after each torch step (an exchange costs a few microseconds), or synchronise.  Before
  torch overwrites memory that running JAX computations still read, ``jax.block_until_ready``
  them.

Ownership
---------
A buffer has exactly one owner, the library that allocated it; the other side holds views.

* **JAX-owned cache + torch views** (``to_torch`` / ``torch_views``): XLA refuses to donate a
  buffer that torch still references ("Donation requested for buffer with external reference") —
  on GPU deep inside a ``jit`` call, on CPU donation is silently skipped.  Every buffer exported by
  ``to_torch`` is recorded (with a weak reference to the tensor; views of it keep it alive), and
  ``donate_safe(tree)`` / ``jit_donating(...)`` turn the misuse into an ``OwnershipError`` that
  says what to do: drop the torch tensors, or donate nothing.
* **torch-owned cache + JAX read-only views** (``from_torch``): the JAX array aliases torch's
  allocation; donating it would hand torch's memory to XLA.  Such arrays are recorded too, and
  ``donate_safe`` / ``jit_donating`` refuse them.  Use them as read-only inputs; write through the
  torch owner (``jaxkv.interop.DSV4TorchPool``).
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

__all__ = [
    "OwnershipError", "to_torch", "to_torch_shards", "from_torch", "donate_safe",
    "jit_donating", "torch_views", "is_viewed_by_torch", "is_torch_owned", "buffer_pointer",
]


_TRACER = getattr(jax.core, "Tracer", ())  # abstract values inside jit


class OwnershipError(ValueError):
    """A buffer is used against its ownership rule (e.g. donating a buffer torch still views)."""


# ---------------------------------------------------------------------------------------------
# Registries: JAX buffers viewed by torch, and JAX arrays that alias torch memory.

_lock = threading.RLock()  # re-entrant: weakref callbacks may fire during GC under the lock
# pointer -> weak references to the objects on the other side.  No callback per reference (a
# callback per exchange cost ~2-3 us): dead references are pruned lazily -- an entry's list when
# its length reaches a power of two >= 8, and every table every ``_SWEEP_EVERY`` records -- so the
# tables stay bounded, and every query ignores dead references.
_exported: dict[int, list] = {}  # JAX buffer pointer -> the torch tensors viewing it
_imported: dict[int, list] = {}  # torch pointer -> the JAX arrays aliasing it
_SWEEP_EVERY = 1024
_since_sweep = [0]


def _live(refs) -> list:
    return [o for o in (r() for r in list(refs)) if o is not None]


def _sweep() -> None:
    """Drops dead references and empty entries from both tables."""
    with _lock:
        for table in (_exported, _imported):
            for ptr, refs in list(table.items()):
                refs[:] = [r for r in refs if r() is not None]
                if not refs:
                    del table[ptr]
        _since_sweep[0] = 0


def _record(table: dict, ptr: int, obj) -> None:
    """Records a weak reference to ``obj`` under ``ptr`` (pruned lazily once ``obj`` dies)."""
    ref = weakref.ref(obj)
    with _lock:
        refs = table.get(ptr)
        if refs is None:
            table[ptr] = [ref]
        else:
            k = len(refs)
            if k >= 8 and not k & (k - 1):  # amortised O(1): prune at 8, 16, 32, ...
                refs[:] = [r for r in refs if r() is not None]
            refs.append(ref)
        _since_sweep[0] += 1
        if _since_sweep[0] >= _SWEEP_EVERY:
            _sweep()


# Capsules whose consumer raised (see ``_quarantine``).
_QUARANTINE: list = []
# The name a consumed capsule carries.  PyCapsule_SetName keeps only the pointer, so the bytes
# object gets one reference that is never released: the name outlives every capsule, even at
# interpreter shutdown.
_USED_NAME = b"used_dltensor"


def _set_capsule_name(cap, name: bytes) -> bool:
    """``PyCapsule_SetName(cap, name)`` through ctypes (own function objects: no argtypes shared
    with other ctypes users); ``name`` is pinned (one reference never released) first."""
    try:
        api = _QUARANTINE_STATE.get("api")
        if api is None:
            import ctypes
            lib = ctypes.PyDLL(None)
            lib.Py_IncRef.argtypes = [ctypes.py_object]
            lib.Py_IncRef.restype = None
            lib.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
            lib.PyCapsule_SetName.restype = ctypes.c_int
            lib.Py_IncRef(_USED_NAME)  # the name must outlive every capsule carrying it
            api = _QUARANTINE_STATE["api"] = lib
        return api.PyCapsule_SetName(cap, name) == 0
    except Exception:  # noqa: BLE001 - no ctypes: the capsule is still kept alive (below)
        return False


_QUARANTINE_STATE: dict = {}


class FastPathError(RuntimeError):
    """jaxlib's / torch's DLPack entry point raised inside a fast path (capsule quarantined)."""


def _quarantine(cap, where: str, err: Exception, warn: bool = True) -> None:
    """Makes sure a capsule whose consumer raised never runs its deleter again.

    jaxlib 0.11.2's ``dlpack_managed_tensor_to_buffer`` can fail *after* taking the tensor: it
    has already called the DLPack deleter, yet the capsule keeps its "dltensor" name and its
    destructor, so dropping the capsule calls the deleter a second time -- a double free
    (measured on CPU with a rejected ``stream``: the producer's reference is released at the
    error, and the process segfaults once the capsule is dropped; jaxlib 0.10.2 fails before
    taking it).  The capsule is renamed "used_dltensor" (every producer's destructor then does
    nothing: the DLPack rule for a consumed capsule) and kept referenced for the life of the
    process.  Where the consumer had *not* taken the tensor, that tensor leaks: one tensor per
    failure, never a double free.
    """
    _set_capsule_name(cap, _USED_NAME)
    _QUARANTINE.append(cap)
    if warn:
        warnings.warn(f"jaxkv.interop.{where}: DLPack entry point failed ({type(err).__name__}: "
                      f"{err}); its capsule was neutralised (never freed twice; at most this "
                      "one tensor leaks)", RuntimeWarning, stacklevel=4)


def buffer_pointer(array: jax.Array) -> int:
    """Device address of a single-device JAX array's buffer (``unsafe_buffer_pointer``)."""
    return int(array.unsafe_buffer_pointer())


def _array_pointers(array: jax.Array) -> list[int]:
    if array.is_deleted():
        return []
    return [int(s.data.unsafe_buffer_pointer()) for s in array.addressable_shards]


def is_viewed_by_torch(array: jax.Array) -> bool:
    """True while a torch tensor made by ``to_torch`` from this array's buffer is alive."""
    with _lock:
        return any(_live(_exported.get(p, ())) for p in _array_pointers(array))


def is_torch_owned(array: jax.Array) -> bool:
    """True when ``array`` aliases torch memory (made by ``from_torch``) and that array is alive."""
    with _lock:
        return any(_live(_imported.get(p, ())) for p in _array_pointers(array))


# ---------------------------------------------------------------------------------------------
# JAX -> torch


def _check_jax_array(array, arg: str = "array") -> None:
    if not isinstance(array, jax.Array):
        raise ValueError(f"{arg} must be a jax.Array, got {type(array).__name__}")
    if isinstance(array, _TRACER):
        raise ValueError(f"{arg} is a tracer: DLPack exchange works on concrete arrays, "
                         "outside jax.jit")
    if array.is_deleted():
        raise ValueError(f"{arg} has been deleted (donated to a jit call?): its buffer is gone; "
                         "use the array the call returned")


# Fast export path.  ``torch.from_dlpack(array)`` spends most of its time in Python: JAX's
# ``__dlpack_device__`` / ``__dlpack__`` (platform strings, ``addressable_data(0)``, version
# dispatch) and torch's stream lookup (a ``torch.cuda.Stream`` object per call).  The fast path
# makes the same two C++ calls those layers end in -- jaxlib's ``buffer_to_dlpack_managed_tensor``
# with torch's current stream (so JAX makes that stream wait for the array's producer: the DLPack
# handshake is unchanged) and ``torch._C._from_dlpack`` -- with the torch device index cached per
# JAX device.  Internal API: used only when it imports, and checked on first use against the
# array (pointer, shape, element size); any failure falls back to ``torch.from_dlpack``, which
# then reports the error.
_ENV_FAST = os.environ.get("JAXKV_DLPACK_FAST", "1").strip().lower() not in ("0", "false", "off",
                                                                              "no")
_EXPORT = {"enabled": _ENV_FAST, "checked": False}
_EXPORT_DEV: dict = {}  # jax device -> torch CUDA index, -1 for CPU, None where unsupported


def _export_api():
    api = _EXPORT.get("api")
    if api is None:
        try:
            from jax._src.lib import _jax
            api = (_jax.buffer_to_dlpack_managed_tensor, torch._C._from_dlpack,
                   getattr(torch._C, "_cuda_getCurrentRawStream", None))
        except (ImportError, AttributeError):
            _EXPORT["enabled"] = False
            return None
        _EXPORT["api"] = api
    return api


def _export_index(device) -> int | None:
    try:
        return _EXPORT_DEV[device]
    except KeyError:
        pass
    idx = None
    try:
        if device.platform == "cpu":
            idx = -1
        elif device.platform == "gpu" and "cuda" in device.client.platform_version:
            idx = int(device.local_hardware_id)
            torch.cuda.init()  # torch's lazy CUDA init, once (the fast path skips torch.cuda)
    except Exception:  # noqa: BLE001 - unknown device kinds take the public path
        idx = None
    _EXPORT_DEV[device] = idx
    return idx


def _torch_stream(idx: int) -> int:
    """torch's current stream on ``cuda:idx`` in DLPack's convention (1 = the legacy default)."""
    raw = _EXPORT["api"][2]
    s = raw(idx) if raw is not None else torch.cuda.current_stream(idx).cuda_stream
    return 1 if s == 0 else s


def _fast_export(array: jax.Array, device):
    """``torch.from_dlpack(array)`` without the Python layers, or None (use the public path)."""
    if not _EXPORT["enabled"]:
        return None
    api = _export_api()
    if api is None:
        return None
    idx = _export_index(device)
    if idx is None:
        return None
    if idx >= 0 and array.sharding.memory_kind not in (None, "device"):
        return None  # pinned-host arrays: the public path knows their DLPack device type
    try:
        cap = api[0](array, stream=_torch_stream(idx) if idx >= 0 else None)
    except Exception:  # noqa: BLE001 - no capsule made: the public path reports the error
        return None
    try:
        t = api[1](cap)
    except Exception as e:  # noqa: BLE001 - torch may or may not have taken the tensor
        _quarantine(cap, "to_torch", e)
        raise FastPathError(f"torch._C._from_dlpack failed: {e}") from e  # no public retry:
        # the same call through torch.from_dlpack could take and free the tensor again
    if not _EXPORT["checked"]:  # first use: must look exactly like the public path's result
        if (tuple(t.shape) != tuple(array.shape) or t.element_size() != array.dtype.itemsize
                or (array.size and t.data_ptr() != int(array.unsafe_buffer_pointer()))):
            _EXPORT["enabled"] = False
            return None
        _EXPORT["checked"] = True
    return t


def _export_one(array: jax.Array, device=None) -> torch.Tensor:
    try:
        t = _fast_export(array, device) if device is not None else None
        if t is None:
            t = torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError) as e:
        if array.dtype == jnp.float8_e4m3fn:
            raise ValueError(
                "this JAX/torch pair cannot exchange float8_e4m3fn through DLPack, and JAX "
                "cannot alias an fp8 buffer as uint8 without a copy: exchange the cache's "
                "uint8 buffers instead, or bitcast inside jit "
                "(jax.lax.bitcast_convert_type)") from e
        raise ValueError(f"DLPack export of a {array.dtype} array failed: {e}") from e
    ptr = int(array.unsafe_buffer_pointer())
    if array.size and t.data_ptr() != ptr:
        raise RuntimeError("DLPack export copied the array (pointers differ); refusing a silent "
                           "copy")
    _record(_exported, ptr, t)
    return t


def to_torch(array: jax.Array) -> torch.Tensor:
    """A torch tensor aliasing a single-device JAX array's buffer (zero-copy).

    Args:
      array: a ``jax.Array`` on one device (CPU or GPU), any shape, of a dtype torch has
        (``bfloat16``, ``float8_e4m3fn``, ``uint8``, ``int32``, ...).

    Returns:
      A tensor of the same shape and dtype on the matching torch device, with
      ``tensor.data_ptr() == array.unsafe_buffer_pointer()``.  The JAX array's owner stays JAX;
      while the tensor (or any view of it) lives the array cannot be donated (see
      ``donate_safe``).  Do not write through the tensor while JAX computations read the array.

    Raises:
      ValueError: not a concrete, live jax.Array; an array over several devices (use
        ``to_torch_shards``); a dtype DLPack cannot carry.
    """
    _check_jax_array(array)
    devices = array.sharding.device_set
    if len(devices) > 1:
        raise ValueError(f"array is spread over {len(devices)} devices (sharding "
                         f"{array.sharding}); DLPack describes one buffer: use "
                         "to_torch_shards(array) for one tensor per shard")
    (device,) = devices
    return _export_one(array, device)


def to_torch_shards(array: jax.Array) -> list[torch.Tensor]:
    """One zero-copy torch tensor per addressable shard of ``array``.

    Returns:
      ``[to_torch(s.data) for s in array.addressable_shards]``: the i-th tensor holds
      ``array[array.addressable_shards[i].index]`` and lives on that shard's device.  Replicated
      arrays give one tensor per device, all with the same values.
    """
    _check_jax_array(array)
    return [_export_one(s.data, s.device) for s in array.addressable_shards]


def torch_views(cache) -> tuple[torch.Tensor, ...]:
    """Zero-copy ``uint8[rows, row_bytes]`` torch views of every buffer of a JAX-owned cache.

    The cache stays JAX-owned: it cannot be donated while the views live (``donate_safe``).
    """
    buffers = getattr(cache, "buffers", None)
    if buffers is None:
        raise ValueError(f"cache must be a jaxkv Cache, got {type(cache).__name__}")
    return tuple(to_torch(b) for b in buffers)


# ---------------------------------------------------------------------------------------------
# torch -> JAX

_X64 = {torch.int64: "int64", torch.uint64: "uint64", torch.float64: "float64",
        torch.complex128: "complex128"}
_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)


def _x64_enabled() -> bool:
    return jax.dtypes.canonicalize_dtype(np.int64) == np.dtype(np.int64)


# Fast import path.  ``jax.dlpack.from_dlpack`` spends ~60 us per call in Python on CPU (device
# lookup, a stream query that raises UNIMPLEMENTED, dtype canonicalisation), and torch's
# ``Tensor.__dlpack__(stream=...)`` builds a ``torch.cuda.ExternalStream`` and a fresh
# ``torch.cuda.Event`` per call on CUDA.  The fast path caches, per DLPack device: the JAX device,
# JAX's stream for external ready events, a torch ``ExternalStream`` wrapping it and one reusable
# event; per call it does torch's handshake itself (record the event on torch's current stream,
# make JAX's stream wait on it -- ``cudaStreamWaitEvent`` captures the event's state at the call,
# so reusing the event is safe; a lock keeps record+wait pairs from interleaving across threads),
# then ``torch._C._to_dlpack`` and jaxlib's ``dlpack_managed_tensor_to_buffer`` (the entry point
# ``jax.dlpack.from_dlpack`` ends in).  Internal API, so it is used only when it imports and
# passes a self-check on first use, else the public API.
#
# jaxlib's contract (0.10 and 0.11 alike: ``dlpack_managed_tensor_to_buffer(dlpack, device,
# stream, copy, dl_device_type)``): ``stream`` is ``device.get_stream_for_external_ready_events()``
# (or None where that is UNIMPLEMENTED, e.g. CPU) -- XLA looks the value up among its own
# external-ready-event streams -- and on success jaxlib renames the capsule "used_dltensor" and
# owns the tensor (torch's deleter runs when the JAX buffer dies).  The fast path passes exactly
# what ``jax.dlpack.from_dlpack`` passes.  An earlier variant (``direct_stream``) passed torch's
# current stream instead; on jaxlib 0.11.2 + CUDA that aborted the process with a double free
# ("free(): double free detected in tcache 2", "Fatal Python error: Aborted" while
# ``_fast_import``'s frame was torn down, i.e. while the capsule was dropped; only the
# direct_stream test and benchmark row died, the handshake variant passed): jaxlib 0.11.2 fails
# on such a stream *after* calling the tensor's deleter but leaves the capsule named "dltensor"
# (measured with the CPU client), so torch's capsule destructor freed the tensor a second time.
# The variant is gone; ``_quarantine`` makes any other failure inside jaxlib safe.
# Idle branch (CUDA).  When torch's current stream has no pending work (``cudaStreamQuery``
# through torch's ``Stream.query``, ~1 us), every write enqueued on it before the call has
# completed, so there is nothing to order: the fast path skips the event handshake *and* passes
# ``stream=None`` to jaxlib, which then creates the buffer without a definition event (as it does
# for every CPU import) -- JAX may use it at once, and the memory already holds the final values.
# Otherwise (work pending) the handshake runs exactly as above.  jaxlib's behaviour for
# ``stream=None`` on a CUDA device is checked once per device on a scratch tensor (a failure
# quarantines that scratch capsule silently and keeps the handshake for every call);
# ``JAXKV_DLPACK_IDLE=0`` switches the idle branch off.  ``IMPORT_BRANCHES`` counts the CUDA
# imports per branch (tests and benchmarks read it).
_ENV_IDLE = os.environ.get("JAXKV_DLPACK_IDLE", "1").strip().lower() not in ("0", "false", "off",
                                                                             "no")
_FAST = {"enabled": _ENV_FAST, "checked": False, "idle": _ENV_IDLE}
_DEVICES: dict = {}
_STREAM_OBJS: dict = {}  # (cuda index, raw stream pointer) -> a torch Stream of that stream
_handshake_lock = threading.Lock()
IMPORT_BRANCHES = {"idle": 0, "handshake": 0}


def _import_api():
    api = _FAST.get("api")
    if api is None:
        try:
            from jax._src import xla_bridge
            from jax._src.lib import _jax, jaxlib_extension_version
        except ImportError:
            _FAST["enabled"] = False
            return None
        api = _FAST["api"] = (xla_bridge, _jax.dlpack_managed_tensor_to_buffer,
                              jaxlib_extension_version >= 467,
                              getattr(torch._C, "_cuda_getDevice", None))
    return api


def _cuda_api():
    """torch's C-level stream / event methods (no Python frames, no Stream object per call):
    (raw current stream, Stream.query, Event.record(stream), Event.wait(stream)); None each
    where this torch lacks them (the Python methods are used then)."""
    api = _FAST.get("cuda_api")
    if api is None:
        sb = getattr(torch._C, "_CudaStreamBase", None)
        eb = getattr(torch._C, "_CudaEventBase", None)
        api = _FAST["cuda_api"] = (getattr(torch._C, "_cuda_getCurrentRawStream", None),
                                   getattr(sb, "query", None), getattr(eb, "record", None),
                                   getattr(eb, "wait", None))
    return api


def _current_stream(idx: int, raw_stream):
    """torch's current stream on ``cuda:idx`` as a torch Stream, cached per raw pointer (a raw
    pointer names one stream at a time; the cached object queries / records on that pointer)."""
    raw = raw_stream(idx) if raw_stream is not None else None
    if raw is not None:
        s = _STREAM_OBJS.get((idx, raw))
        if s is not None:
            return s
    s = torch.cuda.current_stream(idx)
    if raw is not None and s.cuda_stream == raw:
        if len(_STREAM_OBJS) >= 256:
            _STREAM_OBJS.clear()
        _STREAM_OBJS[(idx, raw)] = s
    return s


def _probe_idle(idx: int, device, dl_type: int, to_buffer, five_args: bool) -> bool:
    """Whether jaxlib aliases a CUDA tensor with ``stream=None`` (checked on a scratch tensor:
    no error and the same pointer).  A failure quarantines the scratch capsule (never freed
    twice; 256 bytes may leak) without a warning: the handshake then serves every call."""
    try:
        scratch = torch.empty(256, dtype=torch.uint8, device=torch.device("cuda", idx))
        cap = torch._C._to_dlpack(scratch)
    except Exception:  # noqa: BLE001
        return False
    try:
        out = (to_buffer(cap, device, None, False, dl_type) if five_args
               else to_buffer(cap, device, None, False))
    except Exception as e:  # noqa: BLE001 - jaxlib may have taken the tensor
        _quarantine(cap, "from_torch", e, warn=False)
        return False
    try:
        return isinstance(out, jax.Array) and int(out.unsafe_buffer_pointer()) == \
            scratch.data_ptr()
    except Exception:  # noqa: BLE001
        return False


def _import_device(idx: int, src: torch.Tensor, xla_bridge):
    """(jax device, JAX stream or None, DLPack device type, torch ExternalStream, torch Event,
    idle branch usable)."""
    hit = _DEVICES.get(idx)
    if hit is None:
        dl_type, dev_id = (int(x) for x in src.__dlpack_device__())
        platform = {1: "cpu", 2: "cuda"}[dl_type]
        device = xla_bridge.get_backend(platform).device_from_local_hardware_id(dev_id)
        stream = ext = event = None
        idle = False
        if dl_type == 2:
            try:
                stream = device.get_stream_for_external_ready_events()
            except Exception:  # noqa: BLE001 - UNIMPLEMENTED on some backends
                stream = None
            if stream is not None:
                ext = torch.cuda.ExternalStream(stream, device=torch.device("cuda", idx))
                event = torch.cuda.Event()
                api = _import_api()
                idle = bool(_FAST["idle"]) and _probe_idle(idx, device, dl_type, api[1], api[2])
        hit = _DEVICES[idx] = (device, stream, dl_type, ext, event, idle)
    return hit


def _fast_import(src: torch.Tensor, ptr: int | None = None):
    """jaxlib's ``dlpack_managed_tensor_to_buffer`` with cached device/stream, or None.

    ``ptr`` = ``src.data_ptr()``.  CUDA: the idle branch (torch's current stream has no pending
    work: no handshake, ``stream=None``) or the handshake branch (see above)."""
    if not _FAST["enabled"]:
        return None
    api = _FAST.get("api") or _import_api()
    if api is None:
        return None
    xla_bridge, to_buffer, five_args, get_device = api
    if ptr is None:
        ptr = src.data_ptr()
    try:
        if ptr % 64:
            return None  # JAX may refuse (CPU: 64-B alignment): the public API says so properly
        idx = src.get_device()  # -1 on CPU
        if idx < 0 and src.is_pinned():
            return None  # pinned host memory: the public API knows its DLPack device type
        hit = _DEVICES.get(idx) or _import_device(idx, src, xla_bridge)
        device, stream, dl_type, ext, event, idle = hit
        if idx >= 0:
            current = get_device() if get_device is not None else torch.cuda.current_device()
            if current != idx or ext is None:
                return None  # torch's own rules (and errors) for other devices / no stream
            raw_stream, query, ev_record, ev_wait = _FAST.get("cuda_api") or _cuda_api()
            cur = _current_stream(idx, raw_stream)
            if idle and (query(cur) if query is not None else cur.query()):
                stream = None  # nothing pending on torch's current stream: nothing to order
                IMPORT_BRANCHES["idle"] += 1
            else:
                with _handshake_lock:  # what Tensor.__dlpack__(stream) does, cached objects
                    if ev_record is not None and ev_wait is not None:
                        ev_record(event, cur)  # torch's current stream
                        ev_wait(event, ext)  # JAX's external-ready stream waits on it
                    else:
                        event.record(cur)
                        ext.wait_event(event)
                IMPORT_BRANCHES["handshake"] += 1
        cap = torch._C._to_dlpack(src)
    except Exception:  # noqa: BLE001 - nothing handed to jaxlib yet: the public API answers
        return None
    try:
        if five_args:
            out = to_buffer(cap, device, stream, False, dl_type)
        else:
            out = to_buffer(cap, device, stream, False)
    except TypeError as e:  # the arguments did not bind (another jaxlib): nothing consumed
        _quarantine(cap, "from_torch", e)
        _FAST["enabled"] = False  # the public API knows its own jaxlib
        return None
    except Exception as e:  # noqa: BLE001 - jaxlib may already have freed the tensor
        _quarantine(cap, "from_torch", e)
        raise FastPathError(f"jaxlib's DLPack import failed: {e}") from e  # no public retry:
        # jax.dlpack.from_dlpack makes the same call and would drop its capsule -- a double free
    if not _FAST["checked"]:  # first use: the result must look exactly like the public API's
        ok = (isinstance(out, jax.Array) and tuple(out.shape) == tuple(src.shape)
              and out.dtype.itemsize == src.element_size()
              and int(out.unsafe_buffer_pointer()) == ptr)
        if not ok:
            _FAST["enabled"] = False
            return None
        _FAST["checked"] = True
    return out


_STRIDED = torch.strided
_DTYPE_KIND: dict = {}  # torch dtype -> 0 (exchanged as is), 1 (64-bit), 2 (fp8)


def _dtype_kind(dtype) -> int:
    kind = _DTYPE_KIND.get(dtype)
    if kind is None:
        kind = _DTYPE_KIND[dtype] = 1 if dtype in _X64 else 2 if dtype in _FP8 else 0
    return kind


def from_torch(tensor: torch.Tensor, *, int64: str = "error", fp8: str = "auto") -> jax.Array:
    """A JAX array aliasing a torch tensor's memory (zero-copy), or an error.

    Args:
      tensor: a row-major contiguous CPU or CUDA tensor (``bfloat16``, ``float8_e4m3fn``,
        ``uint8``, ``int32``, ...), not requiring grad.
      int64: policy for 64-bit dtypes while ``jax_enable_x64`` is off (JAX would silently copy
        them down to 32 bits): ``"error"`` (default) raises; ``"convert"`` converts int64 to an
        int32 *copy* (values must fit; warns).  With x64 on, 64-bit tensors are aliased.
      fp8: ``"auto"`` (native fp8, falling back to a uint8 view with a warning where unsupported),
        ``"native"`` (fp8 or an error), ``"uint8"`` (always the uint8 view).

    Returns:
      A ``jax.Array`` of the tensor's shape and dtype with
      ``array.unsafe_buffer_pointer() == tensor.data_ptr()`` (except ``int64="convert"``).  It is a
      *read-only view* of torch-owned memory: never donate it (``donate_safe`` refuses).

    Raises:
      ValueError: not a tensor; requires grad; not contiguous; unaligned; a 64-bit dtype under
        the ``"error"`` policy; a value that does not fit in int32 under ``"convert"``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if int64 != "error" and int64 != "convert":
        raise ValueError(f"int64 must be 'error' or 'convert', got {int64!r}")
    if fp8 != "auto" and fp8 != "native" and fp8 != "uint8":
        raise ValueError(f"fp8 must be 'auto', 'native' or 'uint8', got {fp8!r}")
    if tensor.requires_grad:
        raise ValueError("tensor requires grad: pass tensor.detach() (zero-copy)")
    if tensor.layout is not _STRIDED:
        raise ValueError(f"tensor has layout {tensor.layout}; only dense (torch.strided) tensors "
                         "can be exchanged: call tensor.to_dense() first (a copy)")
    if not (tensor.is_cuda or tensor.is_cpu):  # (attributes: cheaper than tensor.device)
        raise ValueError(f"tensor must be on a cpu or cuda device, got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"tensor has non-contiguous strides {tuple(tensor.stride())} for shape "
                         f"{tuple(tensor.shape)}; JAX can only alias row-major compact memory: "
                         "call tensor.contiguous() first (that makes a copy)")
    if tensor.is_conj() or tensor.is_neg():
        raise ValueError("tensor has a lazy conj/neg bit: call tensor.resolve_conj()/"
                         "resolve_neg() first")
    kind = _DTYPE_KIND.get(tensor.dtype)
    if kind is None:
        kind = _dtype_kind(tensor.dtype)
    converted = False
    if kind == 1 and not _x64_enabled():
        if tensor.dtype != torch.int64 or int64 == "error":
            raise ValueError(
                f"tensor has dtype {tensor.dtype} but JAX has x64 disabled: it would silently "
                "copy it down to 32 bits. Pass an int32 tensor (tensor.to(torch.int32)), "
                "call from_torch(tensor, int64='convert') for an explicit checked copy, or "
                "enable jax_enable_x64")
        if tensor.numel():
            lo, hi = int(tensor.min()), int(tensor.max())
            if lo < -2**31 or hi >= 2**31:
                raise ValueError(f"int64 tensor has values in [{lo}, {hi}], outside int32: "
                                 "cannot convert")
        warnings.warn("from_torch: converting an int64 tensor to an int32 copy (int64='convert')",
                      stacklevel=2)
        tensor = tensor.to(torch.int32)
        converted = True
    src = tensor.view(torch.uint8) if kind == 2 and fp8 == "uint8" else tensor
    numel = src.numel()
    ptr = src.data_ptr()
    try:
        out = _fast_import(src, ptr) if numel else None
        if out is None:
            out = jax.dlpack.from_dlpack(src, copy=False)
    except ValueError as e:
        if "aligned" in str(e):
            raise ValueError(f"tensor's memory at {tensor.data_ptr():#x} is not aligned as JAX "
                             "requires (64 bytes on CPU), so it cannot be aliased: call "
                             "tensor.clone() first (a copy), or allocate aligned") from e
        raise
    except (BufferError, RuntimeError, TypeError) as e:
        if kind == 2 and fp8 == "auto":
            warnings.warn(f"from_torch: fp8 DLPack unsupported here ({e}); returning a uint8 view",
                          stacklevel=2)
            src = tensor.view(torch.uint8)
            out = jax.dlpack.from_dlpack(src, copy=False)
        else:
            hint = " (try fp8='uint8')" if kind == 2 else ""
            raise ValueError(f"DLPack import of a {tensor.dtype} tensor failed: {e}{hint}") from e
    if numel:
        if int(out.unsafe_buffer_pointer()) != ptr:  # zero-copy, proven on every call
            raise RuntimeError("DLPack import copied the tensor (pointers differ); refusing a "
                               "silent copy")
        if not converted:
            _record(_imported, ptr, out)
    return out


# ---------------------------------------------------------------------------------------------
# Donation


def donate_safe(tree: Any, arg: str = "cache") -> Any:
    """Checks that every JAX array in ``tree`` may be donated; returns ``tree`` unchanged.

    Raises:
      OwnershipError: a leaf's buffer is viewed by a live torch tensor (made by ``to_torch`` /
        ``torch_views``), or a leaf aliases torch memory (made by ``from_torch``).  The message
        says which leaf and what to do.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        if not isinstance(leaf, jax.Array) or isinstance(leaf, _TRACER):
            continue
        where = f"{arg}{jax.tree_util.keystr(path)}"
        if leaf.is_deleted():
            raise OwnershipError(f"{where} was already donated or deleted; pass the array the "
                                 "previous call returned")
        with _lock:
            ptrs = _array_pointers(leaf)
            views = sum(len(_live(_exported.get(p, ()))) for p in ptrs)
            owned = any(_live(_imported.get(p, ())) for p in ptrs)
        if views:
            raise OwnershipError(
                f"{where} cannot be donated: {views} torch tensor(s) made by "
                "jaxkv.interop.to_torch still view its buffer (XLA would fail with 'Donation "
                "requested for buffer with external reference'). Drop them first (del the "
                "tensors and every view of them), or call without donation.")
        if owned:
            raise OwnershipError(
                f"{where} aliases torch-owned memory (made by jaxkv.interop.from_torch) and is "
                "a read-only view: donating it would hand torch's allocation to XLA. Write "
                "through the torch owner (e.g. DSV4TorchPool), or pass a JAX-owned copy "
                "(jnp.array(x, copy=True)).")
    return tree


def jit_donating(fn: Callable, *, donate_argnames: str | tuple[str, ...],
                 **jit_kwargs) -> Callable:
    """``jax.jit(fn, donate_argnames=...)`` that checks ownership of the donated arguments first.

    Each call runs ``donate_safe`` on the donated arguments (keyword or positional), so misuse is
    an ``OwnershipError`` from jaxkv instead of an XLA error deep inside the call (GPU) or a
    donation silently skipped (CPU).
    """
    import inspect

    names = (donate_argnames,) if isinstance(donate_argnames, str) else tuple(donate_argnames)
    jitted = jax.jit(fn, donate_argnames=names, **jit_kwargs)
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        for n in names:
            if n in bound.arguments:
                donate_safe(bound.arguments[n], arg=n)
        return jitted(*args, **kwargs)

    call.jitted = jitted
    return call
