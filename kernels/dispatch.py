"""Chooses a kernel implementation for an op: ``"reference" | "pallas" | "triton" | "auto"``.

``"auto"`` picks the fastest implementation measured for the current platform
(``benchmarks/results/kernels-*.json``): on CPU the reference (XLA's gather/scatter), on GPU the
Triton kernels through jax-triton (Pallas when jax-triton is missing).  jax-triton's call has no
``vmap`` rule and no sharding rule (it runs on whole local arrays): code that ``vmap``s these ops,
or lets XLA partition a sharded buffer through them, passes ``impl="reference"`` (inside
``shard_map`` the arrays are local and every implementation works).
"""
from __future__ import annotations

import jax

from jaxkv.kernels import reference
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing

IMPLS = ("auto", "reference", "pallas", "triton")

# Fastest implementation per (platform, op), from the committed benchmark results
# (benchmarks/results/kernels-h100.json): on the GPU the Triton kernels (through jax-triton) beat
# Pallas (Triton lowering) by ~2x and XLA's gather/scatter by 2-6x on every op.  On CPU only the
# reference is compiled (Pallas runs in the interpreter there).
_GPU_ORDER = ("triton", "pallas")
_AUTO = {"cpu": {}, "gpu": {op: _GPU_ORDER for op in (
    "gather_tokens", "scatter_tokens", "gather_pages", "scatter_pages", "copy_pages",
    "copy_tokens")}}


def _available(name: str) -> bool:
    if name == "triton":
        try:
            import jax_triton  # noqa: F401
            import triton  # noqa: F401
        except Exception:  # jax-triton missing or built for another jax
            return False
    return True


def _platform(arrays) -> str:
    """The platform the op runs on: that of the first concrete array among ``arrays`` (a CPU
    cache on a GPU machine must not get the GPU kernels), else JAX's default backend (under
    ``jit`` the operands are tracers: the default backend is the best guess there)."""
    for a in arrays:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            try:
                return next(iter(a.devices())).platform
            except Exception:  # noqa: BLE001 - deleted / odd arrays: the default decides
                break
    return jax.default_backend()


def _resolve(impl: str, op: str, *arrays) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = _platform(arrays)
    for name in _AUTO.get(platform, {}).get(op, ()):
        if _available(name):
            return name
    return "reference"


def _module(name: str):
    if name == "reference":
        return reference
    if name == "pallas":
        from jaxkv.kernels import pallas_ops
        return pallas_ops
    if name == "triton":
        from jaxkv.kernels import triton_jax
        return triton_jax
    raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")


def gather_tokens(buf, locs, a: TokenAddressing, *, impl: str = "auto"):
    """See ``reference.gather_tokens``."""
    return _module(_resolve(impl, "gather_tokens", buf)).gather_tokens(buf, locs, a)


def scatter_tokens(buf, locs, value, scale, a: TokenAddressing, *, impl: str = "auto"):
    """See ``reference.scatter_tokens``."""
    return _module(_resolve(impl, "scatter_tokens", buf)).scatter_tokens(buf, locs, value, scale, a)


def gather_pages(buf, pages, a: PageAddressing, *, impl: str = "auto"):
    """See ``reference.gather_pages``."""
    return _module(_resolve(impl, "gather_pages", buf)).gather_pages(buf, pages, a)


def scatter_pages(buf, pages, data, a: PageAddressing, *, impl: str = "auto"):
    """See ``reference.scatter_pages``."""
    return _module(_resolve(impl, "scatter_pages", buf)).scatter_pages(buf, pages, data, a)


def copy_pages(src, dst, src_pages, dst_pages, src_a: PageAddressing, dst_a: PageAddressing, *,
               impl: str = "auto"):
    """See ``reference.copy_pages``."""
    return _module(_resolve(impl, "copy_pages", src, dst)).copy_pages(src, dst, src_pages, dst_pages,
                                                            src_a, dst_a)


def copy_tokens(src, dst, src_locs, dst_locs, src_a: TokenAddressing, dst_a: TokenAddressing, *,
                impl: str = "auto"):
    """See ``reference.copy_tokens``."""
    return _module(_resolve(impl, "copy_tokens", src, dst)).copy_tokens(src, dst, src_locs, dst_locs,
                                                              src_a, dst_a)
