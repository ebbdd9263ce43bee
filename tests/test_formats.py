"""Token formats: page sizes, byte encoding and the UE8M0 quantization rule (SPEC §2)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxkv import formats as F


def test_page_bytes_table():
    # SPEC §2's table.
    assert F.page_bytes(F.DSV4_MLA, 256) == 149_760
    assert F.page_bytes(F.DSV4_MLA, 64) == 37_440
    assert F.page_bytes(F.DSV4_MLA, 2) == 1_728
    assert F.page_bytes(F.DSV4_INDEXER, 64) == 8_448
    assert F.page_bytes(F.DSV4_INDEXER, 64, align=576) == 8_640
    assert F.DSV4_MLA.token_bytes == 584 and F.DSV4_INDEXER.token_bytes == 132
    assert F.DSV32_MLA.token_bytes == 656
    assert F.state_format(2048).token_bytes == 8192


@pytest.mark.parametrize("bad", [0, -3])
def test_page_bytes_rejects_bad_tpp(bad):
    with pytest.raises(ValueError, match="tokens_per_page"):
        F.page_bytes(F.DSV4_MLA, bad)


def _np_ue8m0(x):
    """Independent numpy version of SPEC §2's DSv4 quantization."""
    x = np.asarray(x, np.float32)
    nope = x[:, :448].reshape(-1, 7, 64)
    amax = np.maximum(np.abs(nope).max(-1), np.float32(1e-8))
    e = np.ceil(np.log2(amax / np.float32(448.0))).astype(np.int32)
    q = np.clip(nope * np.exp2(-e.astype(np.float32))[..., None], -448, 448)
    q = q.astype(ml_dtypes.float8_e4m3fn).reshape(-1, 448)
    return q, x[:, 448:].astype(ml_dtypes.bfloat16), (e + 127).astype(np.uint8)


def test_dsv4_quantize_matches_spec_rule():
    rng = np.random.default_rng(0)
    # Mixed magnitudes: tiles spanning many exponents, one all-zero tile (amax floor 1e-8).
    x = rng.normal(size=(64, 512)).astype(np.float32) * np.exp2(rng.integers(-12, 12, (64, 1)))
    x[3, 64:128] = 0.0
    tok = F.quantize(F.DSV4_MLA, jnp.asarray(x))
    q, rope, scale = _np_ue8m0(x)
    np.testing.assert_array_equal(np.asarray(tok.nope).view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(tok.rope).view(np.uint16), rope.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(tok.scale), scale)
    # Dequantization: fp8 * 2^(byte - 127); within fp8 rounding of the input.
    back = np.asarray(F.dequantize(F.DSV4_MLA, tok))
    want = q.astype(np.float32).reshape(-1, 7, 64) * np.exp2(scale.astype(np.float32) - 127)[
        ..., None]
    np.testing.assert_array_equal(back[:, :448], want.reshape(-1, 448))
    # e4m3 keeps 3 mantissa bits; below 2^-6 of the scaled range it is subnormal (step 2^-9).
    step = np.repeat(np.exp2(scale.astype(np.float32) - 127 - 9), 64, axis=1)
    assert np.all(np.abs(back[:, :448] - x[:, :448]) <= 0.0625 * np.abs(x[:, :448]) + step)


@pytest.mark.parametrize("fmt", [F.DSV4_MLA, F.DSV4_INDEXER, F.DSV32_MLA, F.state_format(64)],
                         ids=lambda f: f.name)
def test_parts_roundtrip_and_layout(fmt):
    tok = F.random_tokens(fmt, jax.random.key(1), (3, 5))
    value, scale = F.to_parts(fmt, tok)
    assert value.shape == (3, 5, fmt.value_bytes) and scale.shape == (3, 5, fmt.scale_bytes)
    # Independent byte layout: each field's bytes at its offset in its part.
    v, s = np.asarray(value), np.asarray(scale)
    for f in fmt.fields:
        raw = np.ascontiguousarray(np.asarray(getattr(tok, f.name))).view(np.uint8)
        part = v if f.part == "value" else s
        np.testing.assert_array_equal(part[..., f.offset:f.offset + f.nbytes], raw)
    back = F.from_parts(fmt, value, scale)
    for a, b in zip(back, tok):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_quantize_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 512\]"):
        F.quantize(F.DSV4_MLA, jnp.ones((2, 500)))


def test_check_tokens_names_field():
    tok = F.random_tokens(F.DSV4_MLA, jax.random.key(2), 4)
    with pytest.raises(ValueError, match=r"tokens\.rope must have dtype"):
        F.check_tokens(F.DSV4_MLA, tok._replace(rope=tok.rope.astype(jnp.float32)))
    with pytest.raises(ValueError, match=r"tokens\.scale must have shape"):
        F.check_tokens(F.DSV4_MLA, tok._replace(scale=tok.scale[:, :6]))
    with pytest.raises(ValueError, match="MLATokens"):
        F.check_tokens(F.DSV4_MLA, F.IndexerTokens(tok.nope, tok.rope))


def test_v32_and_indexer_quantize_close():
    x = jax.random.normal(jax.random.key(3), (16, 576)) * 5
    back = F.dequantize(F.DSV32_MLA, F.quantize(F.DSV32_MLA, x))
    np.testing.assert_allclose(back, x, rtol=0.07, atol=0.05)
    k = jax.random.normal(jax.random.key(4), (16, 128))
    it = F.quantize(F.DSV4_INDEXER, k)
    # power-of-two scales (UE8M0 rounding)
    m, _ = np.frexp(np.asarray(it.scale))
    assert np.all(m == 0.5)
    np.testing.assert_allclose(F.dequantize(F.DSV4_INDEXER, it), k, rtol=0.07, atol=0.05)
