"""Bit-packing of small integer codes into bytes, and group-wise integer quantization.

Packing (`pack` / `unpack`, along the last axis, into uint8):

  int8: 1 code per byte      int4: 2 codes per byte      int2: 4 codes per byte
  int3: 8 codes per 3 bytes (a 24-bit little-endian word split into 3 bytes)

Code i of a unit sits at bits [i * bits, (i + 1) * bits) of the unit's little-endian word. A
length that is not a whole number of units is zero-padded on packing; `unpack` takes the true
length back. `unpack(pack(c)) == c` bit for bit for every code in [0, 2^bits) (tested).

Quantization (`quantize` / `dequantize`): `x` is cut into groups of `group` consecutive elements
along `axis`; each group gets its own float16 scale (and float16 zero point when asymmetric):

  asymmetric: scale = (max - min) * float32(1 / (2^bits - 1)),  zero = min,
              code = round((x - zero) / scale) in [0, 2^bits - 1],  x ~ code * scale + zero
  symmetric:  scale = max|x| * float32(1 / (2^(bits-1) - 1)),
              code = round(x / scale) in [-(2^(bits-1) - 1), 2^(bits-1) - 1], stored offset by
              2^(bits-1),  x ~ code * scale

Codes are computed from the float16-rounded scale and zero, so the error bound holds for what is
stored: |x - dequantize(quantize(x))| <= scale / 2 + eps per element, where eps covers the float16
rounding of the zero point and scale (~2^-11 relative; below 2^-14 a float16 scale is subnormal,
with an absolute spacing of 2^-24, so groups whose range is under ~1e-3 lose relative accuracy)
(tested against a NumPy oracle). A constant group has scale 0 and is reproduced exactly (up to the
float16 rounding of its value) in the asymmetric scheme.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

def error_bound(bits: int | None) -> float:
  """Worst |x - dequantize(quantize(x))| relative to max|x| of the quantized group: half a step of
  a grid spanning at most 2 max|x| in 2^bits - 1 steps, plus float16 rounding of scales and zero
  points (0 for unquantized storage)."""
  return 0.0 if bits is None else 1.0 / ((1 << bits) - 1) + 2.0**-9


SUPPORTED_BITS = (8, 4, 3, 2)


def unit(bits: int) -> tuple[int, int]:
  """(codes per unit, bytes per unit) of the packing for `bits`."""
  if bits == 3:
    return 8, 3
  if bits in (2, 4, 8):
    return 8 // bits, 1
  raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")


def packed_length(n: int, bits: int) -> int:
  """Bytes that n codes of `bits` bits take once packed."""
  per, nbytes = unit(bits)
  return -(-n // per) * nbytes


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes [..., n] (values in [0, 2^bits)) into uint8 [..., packed_length(n, bits)]."""
  per, nbytes = unit(bits)
  n = codes.shape[-1]
  units = -(-n // per)
  codes = codes.astype(jnp.uint32) & ((1 << bits) - 1)
  if units * per != n:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, units * per - n)])
  codes = codes.reshape(*codes.shape[:-1], units, per)
  shifts = jnp.arange(per, dtype=jnp.uint32) * bits
  word = jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint32)  # bit fields are disjoint: sum == or
  byte_shifts = jnp.arange(nbytes, dtype=jnp.uint32) * 8
  out = ((word[..., None] >> byte_shifts) & 0xFF).astype(jnp.uint8)  # [..., units, nbytes]
  return out.reshape(*out.shape[:-2], units * nbytes)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: uint8 [..., packed_length(n, bits)] -> uint8 codes [..., n]."""
  per, nbytes = unit(bits)
  units = packed.shape[-1] // nbytes
  if units * nbytes != packed.shape[-1] or units * per < n:
    raise ValueError(f"unpack: {packed.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
  if bits == 8:
    return packed[..., :n]
  b = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], units, nbytes)
  word = b[..., 0]
  for i in range(1, nbytes):
    word = word | (b[..., i] << (8 * i))
  shifts = jnp.arange(per, dtype=jnp.uint32) * bits
  codes = (word[..., None] >> shifts) & ((1 << bits) - 1)  # [..., units, per]
  return codes.reshape(*codes.shape[:-2], units * per)[..., :n].astype(jnp.uint8)


@struct.dataclass
class Quantized:
  """An array stored as packed integer codes with per-group float16 scales (and zero points).

  packed: uint8 [..., packed_length(n, bits)]: codes packed along the last axis (n = shape[-1]).
  scale:  float16, the input's shape with `axis` divided by `group`.
  zero:   float16 like scale (asymmetric), or None (symmetric).
  """

  packed: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  bits: int = struct.field(pytree_node=False)
  group: int = struct.field(pytree_node=False)
  axis: int = struct.field(pytree_node=False)
  shape: tuple = struct.field(pytree_node=False)

  @property
  def symmetric(self) -> bool:
    return self.zero is None


def _levels(bits: int, symmetric: bool) -> tuple[int, int]:
  """(largest code, offset added before packing)."""
  if symmetric:
    half = (1 << (bits - 1)) - 1
    return half, half + 1
  return (1 << bits) - 1, 0


def group_stats(xg: jax.Array, bits: int, symmetric: bool, reduce_axis: int):
  """float16 (scale, zero | None) of groups laid out along `reduce_axis` of float32 `xg`."""
  top, _ = _levels(bits, symmetric)
  # Multiply by the float32 reciprocal rather than divide: XLA rewrites division by a constant that
  # way inside jit but not eagerly, and the stored scales must not depend on jit.
  inv_top = np.float32(1.0 / top)
  if symmetric:
    amax = jnp.max(jnp.abs(xg), axis=reduce_axis, keepdims=True)
    return _to_f16(amax * inv_top), None
  lo = jnp.min(xg, axis=reduce_axis, keepdims=True)
  hi = jnp.max(xg, axis=reduce_axis, keepdims=True)
  return _to_f16((hi - lo) * inv_top), _to_f16(lo)


def _to_f16(x):
  finite = jnp.finfo(jnp.float16).max
  return jnp.clip(x, -finite, finite).astype(jnp.float16)


def encode(xg: jax.Array, scale, zero, bits: int) -> jax.Array:
  """uint8 codes of float32 `xg` given broadcastable float16 scale / zero (None: symmetric)."""
  symmetric = zero is None
  top, offset = _levels(bits, symmetric)
  s = scale.astype(jnp.float32)
  shifted = xg if symmetric else xg - zero.astype(jnp.float32)
  steps = jnp.where(s > 0, shifted / jnp.where(s > 0, s, 1.0), 0.0)
  code = jnp.clip(jnp.round(steps), -top if symmetric else 0, top) + offset
  return code.astype(jnp.uint8)


def decode(codes: jax.Array, scale, zero, bits: int) -> jax.Array:
  """float32 values of uint8 codes given broadcastable float16 scale / zero (None: symmetric)."""
  symmetric = zero is None
  _, offset = _levels(bits, symmetric)
  c = codes.astype(jnp.float32)
  if symmetric:
    return (c - offset) * scale.astype(jnp.float32)
  return c * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def _grouped(x: jax.Array, group: int, axis: int) -> jax.Array:
  """x with `axis` split into (n // group, group): the group members sit at axis + 1."""
  n = x.shape[axis]
  return x.reshape(*x.shape[:axis], n // group, group, *x.shape[axis + 1:])


def quantize(x: jax.Array, bits: int, group: int = 32, axis: int = -1,
             symmetric: bool | None = None) -> Quantized:
  """Quantizes `x` in groups of `group` consecutive elements along `axis`.

  Args:
    x: float array; x.shape[axis] must be a multiple of `group`.
    bits: 8, 4, 3 or 2.
    symmetric: scale-only codes; default True for 8 bits, False otherwise.

  Returns:
    `Quantized` with codes packed along the last axis of x.
  """
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"quantize: unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
  axis = axis % x.ndim
  if group <= 0 or x.shape[axis] % group:
    raise ValueError(f"quantize: axis {axis} of length {x.shape[axis]} is not a multiple of "
                     f"group {group}")
  if symmetric is None:
    symmetric = bits == 8
  xg = _grouped(x.astype(jnp.float32), group, axis)
  scale, zero = group_stats(xg, bits, symmetric, axis + 1)
  codes = encode(xg, scale, zero, bits).reshape(x.shape)
  squeeze = lambda a: None if a is None else jnp.squeeze(a, axis + 1)
  return Quantized(packed=pack(codes, bits), scale=squeeze(scale), zero=squeeze(zero), bits=bits,
                   group=group, axis=axis, shape=tuple(x.shape))


def dequantize(q: Quantized, dtype=jnp.float32) -> jax.Array:
  """The float array a `Quantized` stands for (shape q.shape)."""
  codes = unpack(q.packed, q.bits, q.shape[-1])
  cg = _grouped(codes, q.group, q.axis)
  expand = lambda a: None if a is None else jnp.expand_dims(a, q.axis + 1)
  return decode(cg, expand(q.scale), expand(q.zero), q.bits).reshape(q.shape).astype(dtype)


def nbytes(q: Quantized) -> int:
  """Bytes of the packed codes plus scales and zero points."""
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(q))


def bits_per_value(bits: int, group: int, symmetric: bool) -> float:
  """Storage cost per value, scales included (float16 scale and zero per group)."""
  per, nb = unit(bits)
  return 8 * nb / per + (16 if symmetric else 32) / group


__all__ = ["Quantized", "quantize", "dequantize", "pack", "unpack", "packed_length", "encode",
           "decode", "group_stats", "nbytes", "bits_per_value", "unit", "SUPPORTED_BITS"]
