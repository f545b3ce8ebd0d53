"""Storage codecs: how every cache kind that stores tokens keeps one token's key or value vector.

A `Codec` is a static, hashable name of a storage format (a pytree static field). `encode` turns
float vectors x [..., S, H] (S token slots, H channels: a head dim, or a latent rank) into a
`TokenStore`, `decode` turns a store back into floats. Token-major layout: every leaf of a store
has the slot axis at -2, so gathers and scatters over the leading axes are `TokenStore.map`s.

  format              data                          side arrays
  fp32 bf16 fp16      [..., S, H] of that dtype     none (a cast)
  int8 int4 int3 int2 uint8 [..., S, Hp] codes      scale (and zero, asymmetric) float16:
                      packed along H (kvjax.caches.   along="channels": [..., S, H / group], one
                      packing; Hp = packed bytes)     per `group` consecutive channels of a token;
                                                      along="tokens" (KIVI keys): [..., S / group,
                                                      H], one per channel and `group` consecutive
                                                      tokens (S a multiple of group)
  fp8_e4m3 fp8_e5m2   float8 [..., S, H]            scale [..., S, 1] (float16 or float32)
  ("fp8" = fp8_e4m3)

Integer codes are `packing.quantize`'s, bit for bit (int8 symmetric, narrower widths asymmetric,
unless a codec says otherwise); their error bound is `packing.error_bound(bits)`.

fp8. Per token, s = max|x| / F (F = 448 for e4m3, 57344 for e5m2) computed in float32 and rounded
*up* to the scale dtype, code = x / s rounded to the nearest fp8 value (ties to even),
x ~ code * s. As the stored s >= max|x| / F, no code overflows. The fp8 rounding of x / s is
relative (at most 2^-(m+1) of |x|, m mantissa bits: 3 for e4m3, 2 for e5m2) in the normal range
and absolute below it (at most half the smallest subnormal step u), so

  |x - decode(encode(x))| <= 2^-(m+1) |x| + s u / 2  <=  (2^-(m+1) + 2^-12) max|x|

per token: `error_bound` is 2^-4 + 2^-12 (e4m3) or 2^-3 + 2^-12 (e5m2), relative to the token's
max|x| like the integer bounds. (The 2^-12 covers the subnormal term, the float32 division and
the upward rounding of s. It holds for 2^-22 <= max|x| <= 65504 F with a float16 scale; a float32
scale removes both limits in practice.) A token of zeros has s = 0 and decodes to zeros.

Bytes. `token_bytes(H)` is the one formula for what one token's key (or value) vector costs in
one (layer, row, kv head) stream, scales and zero points included, read off the leaf shapes
`empty` allocates; every kind's `estimate_bytes` uses it and tests/caches/test_codec.py checks it
against caches' measured `nbytes()`.

Invariants (tests/caches/test_codec.py, tests/caches/test_packing.py): decode(encode(x)) is
within `error_bound` of x (fp8 against a NumPy oracle, bit for bit); integer formats equal
`packing.quantize`; encode works on any leading axes and under jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.caches import packing
from kvjax.caches.registry import SpecError

SUPPORTED_BITS = packing.SUPPORTED_BITS  # integer widths; defined once, in packing

FLOAT_FORMATS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
INT_FORMATS = {f"int{b}": b for b in SUPPORTED_BITS}
FP8_FORMATS = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
ALIASES = {"fp8": "fp8_e4m3"}
FORMATS = tuple(FLOAT_FORMATS) + tuple(INT_FORMATS) + ("fp8",) + tuple(FP8_FORMATS)
_MANTISSA = {"fp8_e4m3": 3, "fp8_e5m2": 2}
_FLOAT_STEPS = {"fp32": 0.0, "bf16": 2.0**-8, "fp16": 2.0**-11}


@dataclasses.dataclass(frozen=True)
class Codec:
  """A storage format (see the module docstring). Build one with `parse`, `of_dtype`, `of_bits`
  or `for_spec`.

  format: a name of FORMATS (aliases resolved), or a NumPy float dtype name for other floats.
  group: values per scale of integer formats (0 for the others).
  symmetric: integer codes are scale-only (no zero point).
  along: "channels" or "tokens": which axis an integer group runs along.
  scale_dtype: "float16" or "float32", fp8's per-token scale.
  """

  format: str = "fp32"
  group: int = 32
  symmetric: bool = False
  along: str = "channels"
  scale_dtype: str = "float16"

  def __post_init__(self):
    if self.kind != "int":  # one spelling per format, so equal formats hash (and compile) alike
      object.__setattr__(self, "group", 0)
      object.__setattr__(self, "symmetric", False)
      object.__setattr__(self, "along", "channels")
    if self.kind != "fp8":
      object.__setattr__(self, "scale_dtype", "float16")
    if self.kind == "int" and (not isinstance(self.group, int) or self.group <= 0):
      raise ValueError(f"Codec {self.format}: group must be a positive int, got {self.group!r}")
    if self.along not in ("channels", "tokens"):
      raise ValueError(f"Codec: along must be 'channels' or 'tokens', got {self.along!r}")
    if self.scale_dtype not in ("float16", "float32"):
      raise ValueError(f"Codec: scale_dtype must be 'float16' or 'float32', got {self.scale_dtype!r}")

  # ---- what the format is -------------------------------------------------------------------
  @property
  def kind(self) -> str:
    """'float', 'int' or 'fp8'."""
    if self.format in INT_FORMATS:
      return "int"
    return "fp8" if self.format in FP8_FORMATS else "float"

  @property
  def is_float(self) -> bool:
    return self.kind == "float"

  @property
  def bits(self) -> int | None:
    """The integer width (int formats), else None."""
    return INT_FORMATS.get(self.format)

  @property
  def dtype(self):
    """dtype of the `data` leaf."""
    if self.kind == "int":
      return jnp.dtype(jnp.uint8)
    if self.kind == "fp8":
      return jnp.dtype(FP8_FORMATS[self.format])
    return jnp.dtype(FLOAT_FORMATS.get(self.format, self.format))

  @property
  def scale_span(self) -> int:
    """Token slots that share one row of scales: `group` for KIVI keys, else 1."""
    return self.group if self.kind == "int" and self.along == "tokens" else 1

  @property
  def error_bound(self) -> float:
    """Worst |x - decode(encode(x))| relative to max|x| of a scale's group (fp8: of a token)."""
    if self.kind == "int":
      return packing.error_bound(self.bits)
    if self.kind == "fp8":
      return 2.0**-(_MANTISSA[self.format] + 1) + 2.0**-12
    return _FLOAT_STEPS.get(self.format, 2.0**-8)

  def fitted(self, width: int) -> "Codec":
    """This codec for vectors of `width` channels: an integer group along channels is cut to at
    most `width` and must divide it (ValueError otherwise)."""
    if self.kind != "int" or self.along != "channels":
      return self
    g = min(self.group, width)
    if width % g:
      raise ValueError(f"{self.format}: group {self.group} does not divide the width {width} "
                       "(values are quantized per token over groups of channels)")
    return dataclasses.replace(self, group=g)

  def along_tokens(self, group: int) -> "Codec":
    """The KIVI key codec: integer groups of `group` tokens per channel (fp8/float unchanged)."""
    if self.kind != "int":
      return self
    return dataclasses.replace(self, group=group, along="tokens")

  # ---- layout and bytes -----------------------------------------------------------------------
  def leaf_shapes(self, shape: tuple) -> tuple:
    """((shape, dtype) of data, of scale or None, of zero or None) for a store of logical
    shape [..., S, H]."""
    *lead, s, h = shape
    lead = tuple(lead)
    if self.kind == "float":
      return (shape, self.dtype), None, None
    if self.kind == "fp8":
      return (shape, self.dtype), (lead + (s, 1), jnp.dtype(self.scale_dtype)), None
    data = (lead + (s, packing.packed_length(h, self.bits)), self.dtype)
    if self.along == "tokens":
      if s % self.group:
        raise ValueError(f"{self.format}: {s} slots are not a multiple of the token group {self.group}")
      side = (lead + (s // self.group, h), jnp.dtype(jnp.float16))
    else:
      side = (lead + (s, h // self.fitted(h).group), jnp.dtype(jnp.float16))
    return data, side, None if self.symmetric else side

  def token_bytes(self, width: int) -> float:
    """Bytes of one token's vector of `width` channels in one (layer, row, kv head) stream,
    side arrays included (KIVI keys amortize a scale row over `group` tokens, so may be
    fractional; every other format gives a whole number)."""
    span = self.scale_span
    total = sum(int(np.prod(shp)) * dt.itemsize
                for shp, dt in (p for p in self.leaf_shapes((span, width)) if p is not None))
    return total / span if span > 1 else total

  def bytes_for(self, tokens: int, width: int) -> int:
    """Bytes of `tokens` token vectors of `width` channels (a whole number of scale spans)."""
    return int(round(tokens * self.token_bytes(width)))

  # ---- encoding ------------------------------------------------------------------------------
  def empty(self, shape: tuple) -> "TokenStore":
    """Zero-filled store of logical shape [..., S, H] (decodes to zeros)."""
    data, scale, zero = (None if p is None else jnp.zeros(*p) for p in self.leaf_shapes(shape))
    return TokenStore(data=data, scale=scale, zero=zero, codec=self, width=shape[-1])

  def encode(self, x: jax.Array) -> "TokenStore":
    """Stores float x [..., S, H] (any leading axes)."""
    h = x.shape[-1]
    if self.kind == "float":
      return TokenStore(data=x.astype(self.dtype), codec=self, width=h)
    if self.kind == "fp8":
      data, scale = _fp8_encode(x, self.dtype, jnp.dtype(self.scale_dtype))
      return TokenStore(data=data, scale=scale, codec=self, width=h)
    c = self.fitted(h)
    axis = -2 if c.along == "tokens" else -1
    q = packing.quantize(x, c.bits, c.group, axis=axis, symmetric=c.symmetric)
    return TokenStore(data=q.packed, scale=q.scale, zero=q.zero, codec=self, width=h)

  def decode(self, store: "TokenStore", dtype=jnp.float32) -> jax.Array:
    """Floats [..., S, H] of `dtype` (None: a float format's own dtype, else float32)."""
    if self.kind == "float":
      return store.data if dtype is None else store.data.astype(dtype)
    dtype = jnp.float32 if dtype is None else dtype
    if self.kind == "fp8":
      return (store.data.astype(jnp.float32) * store.scale.astype(jnp.float32)).astype(dtype)
    c = self.fitted(store.width)
    shape = store.data.shape[:-1] + (store.width,)
    axis = len(shape) - (2 if c.along == "tokens" else 1)
    q = packing.Quantized(packed=store.data, scale=store.scale, zero=store.zero, bits=c.bits,
                          group=c.group, axis=axis, shape=shape)
    return packing.dequantize(q, dtype)

  def wrap(self, leaves, width: int) -> "TokenStore":
    """The store whose non-None leaves are `leaves` (data, then scale, then zero): the inverse
    of `TokenStore.leaves`, for kinds that keep stores as flat tuples of arrays."""
    data, *side = leaves
    scale = side[0] if side else None
    zero = side[1] if len(side) > 1 else None
    return TokenStore(data=data, scale=scale, zero=zero, codec=self, width=width)


def _fp8_encode(x, dtype, scale_dtype):
  """(codes [..., H] of fp8 `dtype`, scale [..., 1] of `scale_dtype`); see the module docstring."""
  top = float(jnp.finfo(dtype).max)
  xf = x.astype(jnp.float32)
  # Multiply by the float32 reciprocal (as packing does): stored scales must not depend on jit.
  s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) * np.float32(1.0 / top)
  if scale_dtype != jnp.float32:
    big = float(jnp.finfo(scale_dtype).max)
    s = jnp.minimum(s, big)
    r = s.astype(scale_dtype)
    s = jnp.where(r.astype(jnp.float32) < s, jnp.nextafter(r, jnp.asarray(big, scale_dtype)), r)
  sf = s.astype(jnp.float32)
  y = jnp.where(sf > 0, xf / jnp.where(sf > 0, sf, 1.0), 0.0)
  return jnp.clip(y, -top, top).astype(dtype), s.astype(scale_dtype)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class TokenStore:
  """Keys (or values) of a set of token slots in one format; logical shape [..., S, H].

  data:  [..., S, H] floats, uint8 packed codes [..., S, Hp], or fp8 codes [..., S, H].
  scale: see the module docstring's table (None for float formats).
  zero:  float16 like scale for asymmetric integer formats, else None.
  codec (static): the format; width (static): H.
  """

  data: jax.Array
  scale: jax.Array | None = None
  zero: jax.Array | None = None
  codec: Codec = struct.field(pytree_node=False, default=Codec())
  width: int = struct.field(pytree_node=False, default=0)

  @property
  def bits(self) -> int | None:
    return self.codec.bits

  @property
  def group(self) -> int:
    return self.codec.group

  @property
  def head_dim(self) -> int:
    return self.width

  @property
  def shape(self) -> tuple:
    """The logical shape [..., S, H]."""
    return self.data.shape[:-1] + (self.width,)

  def decode(self, dtype=jnp.float32) -> jax.Array:
    return self.codec.decode(self, dtype)

  def map(self, fn, *others: "TokenStore") -> "TokenStore":
    """fn applied leaf by leaf to this store and `others` (same format and leading axes)."""
    return jax.tree_util.tree_map(fn, self, *others)

  def map_parts(self, data_fn, side_fn, *others: "TokenStore") -> "TokenStore":
    """data_fn on the codes, side_fn on the scales and zero points, each with the matching
    arrays of `others` as further arguments (KIVI keys index their scales by group of tokens,
    not by token)."""
    def side(name):
      a = getattr(self, name)
      return None if a is None else side_fn(a, *(getattr(o, name) for o in others))
    return self.replace(data=data_fn(self.data, *(o.data for o in others)), scale=side("scale"),
                        zero=side("zero"))

  def leaves(self) -> tuple:
    """The arrays, data first, then scale and zero where present."""
    return tuple(a for a in (self.data, self.scale, self.zero) if a is not None)

  def nbytes(self) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in self.leaves())


def stores_map(fn, *stores: TokenStore) -> TokenStore:
  """tree_map over several stores of the same format."""
  return jax.tree_util.tree_map(fn, *stores)


# ---------------------------------------------------------------------------------------------
# Building codecs
# ---------------------------------------------------------------------------------------------
def of_dtype(dtype) -> Codec:
  """The float codec storing a cast to `dtype`."""
  name = jnp.dtype(dtype).name
  for fmt, dt in FLOAT_FORMATS.items():
    if jnp.dtype(dt).name == name:
      return Codec(format=fmt, group=0)
  return Codec(format=name, group=0)


def of_bits(bits: int, group: int = 32, symmetric: bool | None = None) -> Codec:
  """The intN codec (int8 symmetric unless told otherwise)."""
  if bits not in SUPPORTED_BITS:
    raise SpecError(f"int{bits} is not supported; supported: "
                    + ", ".join(f"int{b}" for b in SUPPORTED_BITS))
  return Codec(format=f"int{bits}", group=group,
               symmetric=bits == 8 if symmetric is None else symmetric)


def parse(name: str | None, dtype=jnp.float32, group: int = 32,
          scale_dtype: str = "float16") -> Codec:
  """The codec of a format name (FORMATS), or of `dtype` when name is None."""
  if name is None:
    return of_dtype(dtype)
  name = ALIASES.get(name, name)
  if name in FLOAT_FORMATS:
    return Codec(format=name, group=0)
  if name in INT_FORMATS:
    return of_bits(INT_FORMATS[name], group)
  if name in FP8_FORMATS:
    return Codec(format=name, group=0, scale_dtype=scale_dtype)
  raise SpecError(f"storage format {name!r} is unknown; expected one of {', '.join(FORMATS)}")


def for_spec(spec, dtype=jnp.float32) -> Codec:
  """The codec a parsed spec asks for: its `storage` term when it has one ("int4", "fp8", ...),
  else `intN` from spec.bits, else a cast to `dtype`. spec.group sizes integer groups."""
  group = getattr(spec, "group", 32)
  storage = getattr(spec, "storage", None)
  if storage is not None:
    return parse(storage, dtype, group)
  bits = getattr(spec, "bits", None)
  return of_dtype(dtype) if bits is None else of_bits(bits, group)


__all__ = ["Codec", "TokenStore", "stores_map", "of_dtype", "of_bits", "parse", "for_spec",
           "FORMATS", "SUPPORTED_BITS"]
