"""Token and page formats, described as data.

A token of every cache kind is stored as two byte parts:

* a **value** part of ``value_bytes`` bytes, and
* an optional **scale** part of ``scale_stride`` bytes (0 when the format is not split).

A page of ``tpp`` tokens is laid out as (SPEC §2)::

    [0, tpp*V)                 token t's value part at t*V
    [tpp*V, tpp*(V+S))         token t's scale part at tpp*V + t*S
    [tpp*(V+S), page_bytes)    zero padding up to the page alignment

Each part holds typed fields (``Field``) at byte offsets.  Only the bytes covered by fields are ever
written: DSv4's scale word is 8 bytes but only its 7 UE8M0 bytes are written, the pad byte stays as
it was (SGLang's ``SetKAndS`` behaves the same way).

Formats defined here: ``DSV4_MLA`` (584 B), ``DSV4_INDEXER`` (132 B), ``DSV32_MLA`` (656 B,
contiguous) and ``state_format(width)`` for float32 compress-state rows.

``quantize(fmt, x)`` / ``dequantize(fmt, tokens)`` implement each format's quantization rule; the
DSv4 rule is SPEC §2's UE8M0 rule, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Field(NamedTuple):
    """One typed field of a token.

    Attributes:
      name: attribute name in the format's tokens NamedTuple.
      dtype: element dtype (numpy dtype object).
      count: number of elements per token.
      part: ``"value"`` or ``"scale"``.
      offset: byte offset of the field inside its part.
    """

    name: str
    dtype: np.dtype
    count: int
    part: str
    offset: int

    @property
    def nbytes(self) -> int:
        return self.count * np.dtype(self.dtype).itemsize


class MLATokens(NamedTuple):
    """DSv4 MLA tokens: ``nope`` fp8_e4m3fn[..., 448], ``rope`` bf16[..., 64], ``scale`` uint8[..., 7]."""

    nope: jax.Array
    rope: jax.Array
    scale: jax.Array


class V32Tokens(NamedTuple):
    """DeepSeek-V3.2 MLA tokens: ``nope`` fp8[..., 512], ``scale`` f32[..., 4], ``rope`` bf16[..., 64]."""

    nope: jax.Array
    scale: jax.Array
    rope: jax.Array


class IndexerTokens(NamedTuple):
    """Indexer keys: ``key`` fp8_e4m3fn[..., 128], ``scale`` f32[..., 1]."""

    key: jax.Array
    scale: jax.Array


class StateRows(NamedTuple):
    """Compress-state rows: ``row`` f32[..., width] (``[kv half | score half]``)."""

    row: jax.Array


@dataclasses.dataclass(frozen=True)
class TokenFormat:
    """A token format as data.

    Attributes:
      name: short identifier.
      fields: the typed fields, in order.
      value_bytes: V, bytes of the value part.
      scale_stride: S, bytes of one token's scale slot (0 = not split).
      align: default page alignment in bytes (FlashMLA wants 576).
      tokens_type: NamedTuple class whose attributes are the field names.
      quant: name of the quantization rule (``"dsv4_mla"``, ``"dsv32_mla"``, ``"indexer"``,
        ``"none"``).
      width: the unquantized row width (``x.shape[-1]`` for ``quantize``).
    """

    name: str
    fields: tuple[Field, ...]
    value_bytes: int
    scale_stride: int
    align: int
    tokens_type: type
    quant: str
    width: int

    def __post_init__(self):
        for f in self.fields:
            limit = self.value_bytes if f.part == "value" else self.scale_stride
            if f.part not in ("value", "scale") or f.offset + f.nbytes > limit:
                raise ValueError(f"format {self.name}: field {f.name} does not fit its part")
        if tuple(f.name for f in self.fields) != tuple(self.tokens_type._fields):
            raise ValueError(f"format {self.name}: fields must match {self.tokens_type.__name__}")

    @property
    def token_bytes(self) -> int:
        """Payload bytes per token (value + scale slot), e.g. 584 for DSv4 MLA."""
        return self.value_bytes + self.scale_stride

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scale slot that fields cover (7 for DSv4 MLA: the pad byte is never written)."""
        return max((f.offset + f.nbytes for f in self.fields if f.part == "scale"), default=0)

    @property
    def split(self) -> bool:
        return self.scale_stride > 0

    def page_bytes(self, tokens_per_page: int, align: int | None = None) -> int:
        """Bytes of one page of ``tokens_per_page`` tokens, padded to ``align`` (default: the format's)."""
        return page_bytes(self, tokens_per_page, align)


def page_bytes(fmt: TokenFormat, tokens_per_page: int, align: int | None = None) -> int:
    """Bytes of a page: ``ceil(tpp * (V + S) / align) * align``.

    >>> page_bytes(DSV4_MLA, 64), page_bytes(DSV4_MLA, 2), page_bytes(DSV4_MLA, 256)
    (37440, 1728, 149760)
    >>> page_bytes(DSV4_INDEXER, 64), page_bytes(DSV4_INDEXER, 64, align=576)
    (8448, 8640)
    """
    if tokens_per_page < 1:
        raise ValueError(f"tokens_per_page must be >= 1, got {tokens_per_page}")
    a = fmt.align if align is None else int(align)
    if a < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    return -(-tokens_per_page * fmt.token_bytes // a) * a


_u8 = np.dtype(np.uint8)
_fp8 = np.dtype(jnp.float8_e4m3fn)
_bf16 = np.dtype(jnp.bfloat16)
_f32 = np.dtype(np.float32)

DSV4_MLA = TokenFormat(
    name="dsv4_mla",
    fields=(Field("nope", _fp8, 448, "value", 0), Field("rope", _bf16, 64, "value", 448),
            Field("scale", _u8, 7, "scale", 0)),
    value_bytes=576, scale_stride=8, align=576, tokens_type=MLATokens, quant="dsv4_mla", width=512)

DSV4_INDEXER = TokenFormat(
    name="dsv4_indexer",
    fields=(Field("key", _fp8, 128, "value", 0), Field("scale", _f32, 1, "scale", 0)),
    value_bytes=128, scale_stride=4, align=1, tokens_type=IndexerTokens, quant="indexer", width=128)

DSV32_MLA = TokenFormat(
    name="dsv32_mla",
    fields=(Field("nope", _fp8, 512, "value", 0), Field("scale", _f32, 4, "value", 512),
            Field("rope", _bf16, 64, "value", 528)),
    value_bytes=656, scale_stride=0, align=1, tokens_type=V32Tokens, quant="dsv32_mla", width=576)


@functools.lru_cache(maxsize=None)
def state_format(width: int) -> TokenFormat:
    """Float32 compress-state rows of ``width`` floats (2048 C4, 512 C4 indexer, 1024 C128)."""
    return TokenFormat(
        name=f"state{width}", fields=(Field("row", _f32, width, "value", 0),),
        value_bytes=4 * width, scale_stride=0, align=1, tokens_type=StateRows, quant="none",
        width=width)


# ---------------------------------------------------------------------------------------------
# Typed fields <-> raw bytes


def _to_bytes(x: jax.Array, dtype: np.dtype, count: int) -> jax.Array:
    """``dtype[..., count]`` -> ``uint8[..., count * itemsize]`` (little-endian, as the GPU stores it)."""
    x = jnp.asarray(x)
    if x.dtype != dtype:
        raise ValueError(f"expected dtype {dtype}, got {x.dtype}")
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(*x.shape[:-1], count * dtype.itemsize)


def _from_bytes(b: jax.Array, dtype: np.dtype, count: int) -> jax.Array:
    size = dtype.itemsize
    if size == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], count, size), dtype)


def check_tokens(fmt: TokenFormat, tokens, arg: str = "tokens") -> int:
    """Validates a tokens NamedTuple against ``fmt``; returns N (the leading size).

    Raises ValueError naming ``arg`` and the field on a wrong type, dtype or shape.
    """
    if not isinstance(tokens, tuple) or tuple(getattr(tokens, "_fields", ())) != tuple(
            fmt.tokens_type._fields):
        raise ValueError(f"{arg} must be a {fmt.tokens_type.__name__} for format {fmt.name}, "
                         f"got {type(tokens).__name__}")
    lead = None
    for f in fmt.fields:
        a = getattr(tokens, f.name)
        shape, dtype = jnp.shape(a), jnp.result_type(a)
        if dtype != f.dtype:
            raise ValueError(f"{arg}.{f.name} must have dtype {f.dtype}, got {dtype}")
        if len(shape) < 1 or shape[-1] != f.count:
            raise ValueError(f"{arg}.{f.name} must have shape [..., {f.count}], got {shape}")
        if lead is None:
            lead = shape[:-1]
        elif shape[:-1] != lead:
            raise ValueError(f"{arg}.{f.name} has leading shape {shape[:-1]}, "
                             f"but {fmt.fields[0].name} has {lead}")
    return lead


def to_parts(fmt: TokenFormat, tokens) -> tuple[jax.Array, jax.Array]:
    """Tokens -> raw ``(value uint8[..., V], scale uint8[..., scale_bytes])``.

    The value part covers all V bytes; fields must tile it (true for every format here).
    The scale part covers ``fmt.scale_bytes`` (it may be shorter than ``scale_stride``).
    """
    check_tokens(fmt, tokens)
    parts = {"value": [], "scale": []}
    for f in fmt.fields:
        parts[f.part].append((f.offset, _to_bytes(getattr(tokens, f.name), f.dtype, f.count)))
    out = []
    for part in ("value", "scale"):
        chunks = [b for _, b in sorted(parts[part], key=lambda p: p[0])]
        if not chunks:
            lead = jnp.shape(getattr(tokens, fmt.fields[0].name))[:-1]
            out.append(jnp.zeros((*lead, 0), jnp.uint8))
        else:
            out.append(jnp.concatenate(chunks, axis=-1))
    return out[0], out[1]


def from_parts(fmt: TokenFormat, value: jax.Array, scale: jax.Array):
    """Raw ``(value uint8[..., V], scale uint8[..., scale_bytes])`` -> tokens NamedTuple."""
    parts = {"value": value, "scale": scale}
    vals = {}
    for f in fmt.fields:
        raw = parts[f.part][..., f.offset:f.offset + f.nbytes]
        vals[f.name] = _from_bytes(raw, f.dtype, f.count)
    return fmt.tokens_type(**vals)


# ---------------------------------------------------------------------------------------------
# Quantization


def _pow2_exponent(amax: jax.Array) -> jax.Array:
    """``ceil(log2(max(amax, 1e-8) / 448))`` as int32 (the UE8M0 exponent, SPEC §2)."""
    amax = jnp.maximum(amax, jnp.float32(1e-8))
    return jnp.ceil(jnp.log2(amax / jnp.float32(FP8_MAX))).astype(jnp.int32)


def _quant_tiles(x: jax.Array, tile: int, pow2: bool):
    """x f32[..., k*tile] -> (fp8[..., k*tile], e int32[..., k] or scale f32[..., k])."""
    t = x.reshape(*x.shape[:-1], -1, tile)
    amax = jnp.max(jnp.abs(t), axis=-1)
    if pow2:
        e = _pow2_exponent(amax)
        q = jnp.ldexp(t, -e[..., None])
        s = e
    else:
        s = jnp.maximum(amax, jnp.float32(1e-8)) / jnp.float32(FP8_MAX)
        q = t / s[..., None]
    q = jnp.clip(q, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q.reshape(x.shape), s


def quantize(fmt: TokenFormat, x: jax.Array):
    """Quantizes unquantized rows into ``fmt``'s tokens.

    Args:
      fmt: the token format.
      x: float[..., fmt.width] (any float dtype; computed in float32).  For DSv4 MLA the first 448
        columns are the "nope" part and the last 64 the RoPE part (512 = 448 + 64); for V3.2,
        512 + 64.

    Returns:
      A ``fmt.tokens_type`` NamedTuple.  Rules:

      * ``dsv4_mla``: per 64-wide nope tile, ``e = ceil(log2(max(amax, 1e-8) / 448))``, value
        ``clamp(x / 2^e, ±448)`` as e4m3, scale byte ``e + 127``; RoPE as bf16.
      * ``dsv32_mla``: per 128-wide tile an fp32 scale ``max(amax, 1e-8) / 448``; RoPE as bf16.
      * ``indexer``: one power-of-two fp32 scale ``2^e`` per 128-wide key (UE8M0 rounding, as the
        DSv4/V3.2 indexer's ``act_quant``).
      * ``none``: rows stored as float32.
    """
    x = jnp.asarray(x)
    if x.shape[-1:] != (fmt.width,):
        raise ValueError(f"x must have shape [..., {fmt.width}] for {fmt.name}, got {x.shape}")
    x32 = x.astype(jnp.float32)
    if fmt.quant == "dsv4_mla":
        q, e = _quant_tiles(x32[..., :448], 64, pow2=True)
        return MLATokens(q, x[..., 448:].astype(jnp.bfloat16), (e + 127).astype(jnp.uint8))
    if fmt.quant == "dsv32_mla":
        q, s = _quant_tiles(x32[..., :512], 128, pow2=False)
        return V32Tokens(q, s, x[..., 512:].astype(jnp.bfloat16))
    if fmt.quant == "indexer":
        q, e = _quant_tiles(x32, 128, pow2=True)
        return IndexerTokens(q, jnp.ldexp(jnp.ones(e.shape, jnp.float32), e))
    if fmt.quant == "none":
        return StateRows(x32)
    raise ValueError(f"unknown quantization rule {fmt.quant!r}")


def dequantize(fmt: TokenFormat, tokens) -> jax.Array:
    """Tokens -> float32[..., fmt.width] (the inverse of ``quantize`` up to fp8 rounding)."""
    check_tokens(fmt, tokens)
    if fmt.quant == "dsv4_mla":
        q = tokens.nope.astype(jnp.float32).reshape(*tokens.nope.shape[:-1], 7, 64)
        e = tokens.scale.astype(jnp.int32) - 127
        nope = jnp.ldexp(q, e[..., None]).reshape(tokens.nope.shape)
        return jnp.concatenate([nope, tokens.rope.astype(jnp.float32)], axis=-1)
    if fmt.quant == "dsv32_mla":
        q = tokens.nope.astype(jnp.float32).reshape(*tokens.nope.shape[:-1], 4, 128)
        nope = (q * tokens.scale[..., None]).reshape(tokens.nope.shape)
        return jnp.concatenate([nope, tokens.rope.astype(jnp.float32)], axis=-1)
    if fmt.quant == "indexer":
        return tokens.key.astype(jnp.float32) * tokens.scale
    if fmt.quant == "none":
        return tokens.row
    raise ValueError(f"unknown quantization rule {fmt.quant!r}")


def random_tokens(fmt: TokenFormat, key: jax.Array, n: int | tuple[int, ...]):
    """Random tokens of ``fmt`` (quantized from random normal rows): test and demo data."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    x = jax.random.normal(key, (*shape, fmt.width), jnp.float32) * 3.0
    return quantize(fmt, x)


def format_table() -> list[tuple[str, int, int, int]]:
    """(name, value_bytes, scale_stride, token_bytes) of the built-in token formats."""
    return [(f.name, f.value_bytes, f.scale_stride, f.token_bytes)
            for f in (DSV4_MLA, DSV4_INDEXER, DSV32_MLA)]


__all__ = [
    "Field", "TokenFormat", "MLATokens", "V32Tokens", "IndexerTokens", "StateRows",
    "DSV4_MLA", "DSV4_INDEXER", "DSV32_MLA", "state_format", "page_bytes", "quantize",
    "dequantize", "to_parts", "from_parts", "check_tokens", "random_tokens", "FP8_MAX",
]
