"""The Triton kernels of ``triton_kernels`` on JAX arrays, through jax-triton (GPU only).

Same signatures as ``kernels.reference``.  jax-triton is imported lazily: it only imports with a GPU
jaxlib, so on CPU every function raises a ``RuntimeError`` saying so (use ``impl="reference"`` or
``"pallas"`` there).  Scatters and copies alias the destination (``input_output_aliases``), so a
donated buffer is updated in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.kernels.addressing import PageAddressing, TokenAddressing


def _jt():
    if jax.default_backend() == "cpu":
        raise RuntimeError("impl='triton' on JAX arrays needs a GPU (jax-triton launches CUDA "
                           "kernels); on CPU use impl='reference' or 'pallas', or the torch "
                           "functions of jaxkv.kernels.triton_kernels with TRITON_INTERPRET")
    try:
        import jax_triton
    except ImportError as e:  # pragma: no cover - depends on the GPU environment
        raise RuntimeError("impl='triton' needs jax-triton (pip install 'jaxkv[gpu]')") from e
    return jax_triton


def _k():
    from jaxkv.kernels import triton_kernels
    return triton_kernels


# Note: jax-triton's input_output_aliases count array operands only (scalars are not operands).
# Everything static (row widths, capacities, page counts, strides, alignment hints) goes to the
# kernels as constexprs (``**meta``), as on the torch path: jax-triton compiles runtime int
# scalars without Triton's divisible-by-16 specialisation; only the token / page count (N, P)
# stays a runtime scalar.


def _tables(a):
    return jnp.asarray(a.row_base, jnp.int32), jnp.asarray(a.col_base, jnp.int32)


def _cdiv(a, b):
    return -(-a // b)


def gather_tokens(buf: jax.Array, locs: jax.Array, a: TokenAddressing):
    """See ``reference.gather_tokens``."""
    jt, K = _jt(), _k()
    locs = jnp.asarray(locs, jnp.int32)
    L, N = a.num_layers, locs.shape[0]
    V, SB = a.value_bytes, a.scale_bytes
    if L == 0 or N == 0:
        return jnp.zeros((L, N, V), jnp.uint8), jnp.zeros((L, N, SB), jnp.uint8)
    meta = K.token_params(a, buf.shape[1])
    out = [jax.ShapeDtypeStruct((L, N, V), jnp.uint8),
           jax.ShapeDtypeStruct((L, N, max(SB, 1)), jnp.uint8)]
    value, scale = jt.triton_call(
        buf, locs, *_tables(a), int(N), kernel=K.jit_kernel("gather_tokens"), out_shape=out, grid=(_cdiv(N, meta["BT"]), L),
        num_warps=K.num_warps_for(meta["BT"] * meta["VWP"]), num_stages=1, **meta)
    return value, (scale if SB else jnp.zeros((L, N, 0), jnp.uint8))


def scatter_tokens(buf: jax.Array, locs: jax.Array, value: jax.Array, scale: jax.Array,
                   a: TokenAddressing) -> jax.Array:
    """See ``reference.scatter_tokens`` (in place on the aliased ``buf``)."""
    jt, K = _jt(), _k()
    locs = jnp.asarray(locs, jnp.int32)
    L, N = a.num_layers, locs.shape[0]
    if L == 0 or N == 0:
        return buf
    if not a.scale_bytes:
        scale = jnp.zeros((1,), jnp.uint8)
    meta = K.token_params(a, buf.shape[1])
    return jt.triton_call(
        buf, locs, *_tables(a), value, scale, int(N), kernel=K.jit_kernel("scatter_tokens"), out_shape=jax.ShapeDtypeStruct(buf.shape, buf.dtype),
        grid=(_cdiv(N, meta["BT"]), L), input_output_aliases={0: 0},
        num_warps=K.num_warps_for(meta["BT"] * meta["VWP"]), num_stages=1, **meta)


def copy_tokens(src: jax.Array, dst: jax.Array, src_locs: jax.Array, dst_locs: jax.Array,
                src_a: TokenAddressing, dst_a: TokenAddressing) -> jax.Array:
    """See ``reference.copy_tokens`` (in place on the aliased ``dst``)."""
    jt, K = _jt(), _k()
    K.check_same_token_format(src_a, dst_a)
    src_locs = jnp.asarray(src_locs, jnp.int32)
    dst_locs = jnp.asarray(dst_locs, jnp.int32)
    L, N = src_a.num_layers, src_locs.shape[0]
    if L == 0 or N == 0:
        return dst
    meta = K.copy_tokens_meta(src_a, dst_a, src.shape[1], dst.shape[1])
    return jt.triton_call(
        src, src_locs, *_tables(src_a), dst_locs, *_tables(dst_a), int(N), dst,
        kernel=K.jit_kernel("copy_tokens"), out_shape=jax.ShapeDtypeStruct(dst.shape, dst.dtype),
        grid=(_cdiv(N, meta["BT"]), L), input_output_aliases={7: 0},
        num_warps=K.num_warps_for(meta["BT"] * meta["VWP"]), num_stages=1, **meta)


def _pages_call(src, dst, src_pages, dst_pages, src_a, dst_a, *, zero, out_shape, alias):
    jt, K = _jt(), _k()
    P = src_pages.shape[0]
    dst_cols = out_shape.shape[-1]
    meta = K.page_params(src_a, dst_a, src.shape[1], dst_cols)
    return jt.triton_call(
        src, src_pages, *_tables(src_a), dst_pages, *_tables(dst_a), int(P), dst,
        kernel=K.jit_kernel("copy_pages"), out_shape=out_shape,
        grid=K.page_grid(meta, P, src_a.num_layers),
        input_output_aliases={7: 0} if alias else None,
        num_warps=K.page_warps(), num_stages=1, ZERO=int(zero), **meta)


def copy_pages(src: jax.Array, dst: jax.Array, src_pages: jax.Array, dst_pages: jax.Array,
               src_a: PageAddressing, dst_a: PageAddressing) -> jax.Array:
    """See ``reference.copy_pages`` (in place on the aliased ``dst``)."""
    _jt()
    _k().check_same_page(src_a, dst_a)
    src_pages = jnp.asarray(src_pages, jnp.int32)
    dst_pages = jnp.asarray(dst_pages, jnp.int32)
    if src_a.num_layers == 0 or src_pages.shape[0] == 0:
        return dst
    return _pages_call(src, dst, src_pages, dst_pages, src_a, dst_a, zero=False,
                       out_shape=jax.ShapeDtypeStruct(dst.shape, dst.dtype), alias=True)


def _dense_pages(L: int, P: int, page_bytes: int) -> PageAddressing:
    """``uint8[L * P, page_bytes]`` viewed as pages 0..P-1 of L layers."""
    return PageAddressing(row_base=tuple(l * P for l in range(L)), col_base=(0,) * L, row_step=1,
                          num_pages=P, page_bytes=page_bytes)


def gather_pages(buf: jax.Array, pages: jax.Array, a: PageAddressing) -> jax.Array:
    """See ``reference.gather_pages``."""
    _jt()
    pages = jnp.asarray(pages, jnp.int32)
    L, P = a.num_layers, pages.shape[0]
    if L == 0 or P == 0:
        return jnp.zeros((L, P, a.page_bytes), jnp.uint8)
    out = _pages_call(buf, jnp.zeros((1,), jnp.uint8), pages, jnp.arange(P, dtype=jnp.int32), a,
                      _dense_pages(L, P, a.page_bytes), zero=True,
                      out_shape=jax.ShapeDtypeStruct((L * P, a.page_bytes), jnp.uint8),
                      alias=False)
    return out.reshape(L, P, a.page_bytes)


def scatter_pages(buf: jax.Array, pages: jax.Array, data: jax.Array,
                  a: PageAddressing) -> jax.Array:
    """See ``reference.scatter_pages`` (in place on the aliased ``buf``)."""
    _jt()
    pages = jnp.asarray(pages, jnp.int32)
    L, P = a.num_layers, pages.shape[0]
    if L == 0 or P == 0:
        return buf
    return _pages_call(data.reshape(L * P, a.page_bytes), buf, jnp.arange(P, dtype=jnp.int32),
                       pages, _dense_pages(L, P, a.page_bytes), a, zero=False,
                       out_shape=jax.ShapeDtypeStruct(buf.shape, buf.dtype), alias=True)
