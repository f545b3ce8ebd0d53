"""Bit-packing and group quantization (kvjax.caches.packing) against plain NumPy.

Checks: pack/unpack is a bit-exact round trip for every code of every width (hypothesis over shapes
and lengths that are not whole units), the byte layout matches a NumPy reference, packed sizes
(int8 1/byte, int4 2/byte, int2 4/byte, int3 8 per 3 bytes), quantize's codes equal a float32 NumPy
oracle, the round-trip error stays within scale / 2 (+ the float16 rounding of the zero point),
constant groups survive, jit == no jit, and bad arguments raise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvjax.caches import packing
from kvjax.testing import oracle
from tests.helpers import examples

BITS = (8, 4, 3, 2)


# ---- NumPy references ----------------------------------------------------------------------------
def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Little-endian bit stream per unit: code i of a unit at bits [i*bits, (i+1)*bits)."""
  per, nbytes = packing.unit(bits)
  n = codes.shape[-1]
  units = -(-n // per)
  padded = np.zeros(codes.shape[:-1] + (units * per,), np.uint64)
  padded[..., :n] = codes
  padded = padded.reshape(codes.shape[:-1] + (units, per))
  word = np.zeros(padded.shape[:-1], np.uint64)
  for i in range(per):
    word |= padded[..., i] << np.uint64(i * bits)
  out = np.stack([(word >> np.uint64(8 * j)) & np.uint64(0xFF) for j in range(nbytes)], axis=-1)
  return out.astype(np.uint8).reshape(codes.shape[:-1] + (units * nbytes,))


# ---- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_every_code_at_every_place_round_trips(bits):
  per, _ = packing.unit(bits)
  levels = 1 << bits
  # Row r puts code (r + i) % levels at place i of every unit: all codes at all places.
  codes = (np.arange(levels)[:, None] + np.arange(4 * per)[None, :]) % levels
  packed = packing.pack(jnp.asarray(codes, jnp.uint8), bits)
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits))
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, codes.shape[-1])), codes)


@examples(25)
@given(bits=st.sampled_from(BITS), lead=st.sampled_from([(), (2,), (3, 1)]),
       n=st.sampled_from([1, 5, 8, 13, 24, 64, 70]), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_is_bit_exact(bits, lead, n, seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 1 << bits, size=tuple(lead) + (n,)).astype(np.uint8)
  packed = packing.pack(jnp.asarray(codes), bits)
  assert packed.shape == tuple(lead) + (packing.packed_length(n, bits),)
  np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits))
  back = packing.unpack(packed, bits, n)
  assert back.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits,nbytes", [(8, 64), (4, 32), (3, 24), (2, 16)])
def test_packed_sizes(bits, nbytes):
  assert packing.packed_length(64, bits) == nbytes
  assert packing.pack(jnp.zeros((5, 64), jnp.uint8), bits).shape == (5, nbytes)
  assert packing.packed_length(10, 3) == 6  # two int3 units for 10 codes (6 padding)


def test_unpack_rejects_short_input():
  with pytest.raises(ValueError, match="cannot hold"):
    packing.unpack(jnp.zeros((4,), jnp.uint8), 4, 9)
  with pytest.raises(ValueError, match="unsupported bit width"):
    packing.pack(jnp.zeros((4,), jnp.uint8), 5)


# ---- quantization --------------------------------------------------------------------------------
def _bound(x, bits, group, axis, symmetric):
  """Per-element error bound from the definition, in float64: scale / 2 + float16 slack.

  The slack: float16 keeps ~11 significant bits (2^-11 relative on the zero point and on
  code * scale), and below 2^-14 scales are subnormal with a fixed spacing of 2^-24.
  """
  x = np.asarray(x, np.float64)
  axis = axis % x.ndim
  shp = x.shape[:axis] + (x.shape[axis] // group, group) + x.shape[axis + 1:]
  xg = x.reshape(shp)
  amax = np.max(np.abs(xg), axis=axis + 1, keepdims=True)
  if symmetric:
    scale = amax / ((1 << (bits - 1)) - 1)
  else:
    scale = (np.max(xg, axis=axis + 1, keepdims=True) - np.min(xg, axis=axis + 1, keepdims=True))
    scale = scale / ((1 << bits) - 1)
  top = (1 << bits) - 1
  bound = scale / 2 + 2.0**-10 * amax + top * 2.0**-24 + 1e-7
  return np.broadcast_to(bound, xg.shape).reshape(x.shape)


@examples(25)
@given(bits=st.sampled_from(BITS), groups=st.integers(1, 3), group=st.sampled_from([4, 8, 32]),
       axis=st.sampled_from([0, 1, -1]), magnitude=st.sampled_from([1e-3, 1.0, 50.0]),
       symmetric=st.sampled_from([None, True, False]), seed=st.integers(0, 2**31 - 1))
def test_quantize_matches_oracle_and_error_bound(bits, groups, group, axis, magnitude, symmetric, seed):
  rng = np.random.default_rng(seed)
  shape = [3, 5, 6]
  shape[axis] = groups * group
  x = (rng.standard_normal(shape) * magnitude + rng.standard_normal() * magnitude).astype(np.float32)
  q = packing.quantize(jnp.asarray(x), bits, group, axis, symmetric)
  sym = bits == 8 if symmetric is None else symmetric
  assert q.symmetric == sym
  codes, scale, zero, deq = oracle.quantize_groups(x, bits, group, axis, sym)
  got_codes = np.asarray(packing.unpack(q.packed, bits, x.shape[-1]))
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(np.asarray(q.scale), np.squeeze(scale, (axis % 3) + 1))
  if not sym:
    np.testing.assert_array_equal(np.asarray(q.zero), np.squeeze(zero, (axis % 3) + 1))
  back = np.asarray(packing.dequantize(q))
  np.testing.assert_allclose(back, deq, rtol=1e-6, atol=1e-6 * magnitude)
  err = np.abs(back.astype(np.float64) - x)
  bound = _bound(x, bits, group, axis, sym)
  assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_and_zeros_survive(bits):
  x = jnp.concatenate([jnp.zeros((2, 8)), jnp.full((2, 8), 0.75), jnp.full((2, 8), -3.0)], axis=1)
  back = np.asarray(packing.dequantize(packing.quantize(x, bits, 8, axis=1)))
  np.testing.assert_array_equal(back[:, :8], 0.0)
  if bits == 8:  # symmetric: constants land on a code, within half a step (|x| / 127 / 2)
    np.testing.assert_allclose(back, np.asarray(x), atol=3.0 / 127 / 2)
  else:  # asymmetric: scale 0 and the zero point (exact in float16 here) reproduce them
    np.testing.assert_array_equal(back, np.asarray(x))


def test_scale_shapes_and_storage_cost():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64))
  q4 = packing.quantize(x, 4, 32, axis=1)
  assert q4.packed.shape == (2, 64, 32) and q4.scale.shape == (2, 2, 64) and q4.zero.shape == (2, 2, 64)
  assert q4.scale.dtype == jnp.float16
  q8 = packing.quantize(x, 8, 32, axis=2)
  assert q8.zero is None and q8.scale.shape == (2, 64, 2)
  assert packing.nbytes(q8) == 2 * 64 * 64 + 2 * 64 * 2 * 2
  assert packing.bits_per_value(4, 32, False) == 4 + 1.0
  assert packing.bits_per_value(8, 32, True) == 8 + 0.5
  assert packing.bits_per_value(3, 32, False) == 3 + 1.0
  assert packing.nbytes(q4) * 8 / x.size == packing.bits_per_value(4, 32, False)


def test_jit_matches_eager():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 16)) * 3
  for bits in BITS:
    eager = packing.quantize(x, bits, 8, axis=1)
    jitted = jax.jit(lambda a, b=bits: packing.quantize(a, b, 8, axis=1))(x)
    np.testing.assert_array_equal(np.asarray(eager.packed), np.asarray(jitted.packed))
    np.testing.assert_array_equal(np.asarray(packing.dequantize(eager)),
                                  np.asarray(jax.jit(packing.dequantize)(jitted)))


def test_bad_arguments():
  x = jnp.zeros((4, 30))
  with pytest.raises(ValueError, match="not a multiple of group"):
    packing.quantize(x, 4, 32, axis=1)
  with pytest.raises(ValueError, match="unsupported bit width"):
    packing.quantize(x, 5, 10, axis=1)
