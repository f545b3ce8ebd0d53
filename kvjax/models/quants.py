"""kvjax's own NumPy dequantizers for the GGUF (ggml) tensor types its readers meet.

`dequantize(data, qtype)` is a drop-in for `gguf.quants.dequantize`: it takes a tensor's
`data` exactly as `gguf.GGUFReader` hands it out (quantized types as uint8 arrays shaped
``[..., bytes per row]``; F32/F16 as float arrays already shaped ``[..., elements per row]``)
and returns float32 shaped ``[..., elements per row]``. Its values are bit-identical to gguf's:
every kernel does the same float32 operations in the same order (scale times sub-scale first,
then times the quant, then minus the offset), which is also the order of ggml's C reference.

The work is vectorized over blocks: the blocks are processed in chunks of `_CHUNK_BLOCKS`
(a loop over chunks, never over blocks) written straight into one preallocated output, so the
temporaries stay small and cache-resident however large the tensor.

Block layouts (QK_K = 256 values per super-block; "fp16" is an IEEE half, little-endian):

  Q4_0  18 bytes / 32 values: fp16 d, then 16 bytes of nibbles. Byte j holds value j in its
        low nibble and value j+16 in its high nibble.  x = d * (nibble - 8)
  Q4_1  20 bytes / 32: fp16 d, fp16 m, 16 bytes of nibbles as Q4_0.  x = d * nibble + m
  Q5_0  22 bytes / 32: fp16 d, a little-endian uint32 whose bit i is the fifth (high) bit of
        value i, then nibbles as Q4_0.  x = d * (q5 - 16)
  Q5_1  24 bytes / 32: fp16 d, fp16 m, the uint32 of high bits, nibbles.  x = d * q5 + m
  Q8_0  34 bytes / 32: fp16 d, 32 int8.  x = d * q
  Q2_K  84 bytes / 256: 16 scale bytes (low nibble: sub-block scale, high nibble: its min),
        64 bytes of 2-bit quants, fp16 d, fp16 dmin. 16 sub-blocks of 16 values.
        x = (d * scale) * q - (dmin * min)
  Q3_K  110 bytes / 256: 32 bytes "hmask" (high bits), 64 bytes of 2-bit quants, 12 bytes of
        sixteen packed 6-bit signed scales (stored +32), fp16 d. The quant is the 2-bit value
        minus 4 when its hmask bit is clear.  x = (d * (scale - 32)) * q
  Q4_K  144 bytes / 256: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs,
        128 bytes of nibbles. 8 sub-blocks of 32.  x = (d * scale) * q - (dmin * min)
  Q5_K  176 bytes / 256: as Q4_K plus 32 bytes of high bits before the nibbles.
  Q6_K  210 bytes / 256: 128 bytes low nibbles, 64 bytes of 2-bit high parts, 16 int8
        scales, fp16 d. 16 sub-blocks of 16.  x = (d * scale) * (q6 - 32)

The 2- and 4-bit streams of the K-quants are laid out in runs of 32 bytes: within a run, the
bit-field at shift s of byte l is value l of the s-th group of 32 values (see each kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

QK_K = 256

# ggml type ids (ggml.h's enum ggml_type, also gguf.GGMLQuantizationType's values).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
BF16 = 30

# id -> (name, values per block, bytes per block)
_LAYOUT: dict[int, tuple[str, int, int]] = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    BF16: ("BF16", 1, 2),
    Q4_0: ("Q4_0", 32, 2 + 16),
    Q4_1: ("Q4_1", 32, 2 + 2 + 16),
    Q5_0: ("Q5_0", 32, 2 + 4 + 16),
    Q5_1: ("Q5_1", 32, 2 + 2 + 4 + 16),
    Q8_0: ("Q8_0", 32, 2 + 32),
    Q2_K: ("Q2_K", QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    Q3_K: ("Q3_K", QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    Q4_K: ("Q4_K", QK_K, 2 + 2 + 12 + QK_K // 2),
    Q5_K: ("Q5_K", QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    Q6_K: ("Q6_K", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}

SUPPORTED: tuple[str, ...] = tuple(name for name, _, _ in _LAYOUT.values())

# Blocks per chunk: large enough that the per-chunk NumPy overhead vanishes, small enough that
# a chunk's temporaries (a few float32 copies of 32K-256K values) stay in cache.
_CHUNK_BLOCKS = 4096


class UnsupportedQuantType(NotImplementedError):
  """A ggml tensor type kvjax has no dequantizer for (a NotImplementedError, as gguf raises)."""


def _type_name(qtype) -> str:
  name = getattr(qtype, "name", None)
  if name:
    return str(name)
  try:
    from gguf import GGMLQuantizationType  # Only for the name in an error message.
    return GGMLQuantizationType(int(qtype)).name
  except Exception:  # noqa: BLE001 -- unknown id, or no gguf package: just show the number.
    return f"type {int(qtype)}"


def block_layout(qtype) -> tuple[int, int]:
  """(values per block, bytes per block) of a supported type; raises UnsupportedQuantType."""
  entry = _LAYOUT.get(int(qtype))
  if entry is None:
    raise UnsupportedQuantType(
        f"kvjax cannot dequantize GGUF tensor type {_type_name(qtype)} (id {int(qtype)}); "
        f"supported: {', '.join(SUPPORTED)}")
  return entry[1], entry[2]


# ---------------------------------------------------------------------------------------------
# Helpers. Every kernel maps blocks [n, bytes per block] (uint8) to values [n, block] float32.
# ---------------------------------------------------------------------------------------------

def _half(blocks: np.ndarray, at: int) -> np.ndarray:
  """The fp16 at byte offset `at` of every block, as float32 [n, 1]."""
  return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
  """[..., L] bytes -> [..., 2, L]: the low nibbles (the first L values), then the high ones."""
  out = np.empty(packed.shape[:-1] + (2, packed.shape[-1]), np.uint8)
  np.bitwise_and(packed, 0x0F, out=out[..., 0, :])
  np.right_shift(packed, 4, out=out[..., 1, :])
  return out


def _crumbs(packed: np.ndarray) -> np.ndarray:
  """[..., L] bytes -> [..., 4, L]: the 2-bit fields at shifts 0, 2, 4, 6."""
  shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
  return (packed[..., None, :] >> shifts) & np.uint8(3)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
  """[..., L] bytes -> [..., count, L]: bit b of byte l at [..., b, l]."""
  shifts = np.arange(count, dtype=np.uint8)[:, None]
  return (packed[..., None, :] >> shifts) & np.uint8(1)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K/Q5_K's 12 scale bytes [n, 12] -> (scales [n, 8], mins [n, 8]) as float32.

  Sub-blocks 0-3 keep their 6-bit scale in the low 6 bits of bytes 0-3 and their min in those
  of bytes 4-7. Sub-blocks 4-7 take their low 4 bits from the nibbles of bytes 8-11 (scale low,
  min high) and their top 2 bits from the spare top bits of bytes 0-3 (scale) and 4-7 (min).
  """
  first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
  scales = np.concatenate([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], axis=1)
  mins = np.concatenate([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], axis=1)
  return scales.astype(np.float32), mins.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------

def _q4_0(b: np.ndarray) -> np.ndarray:
  d = _half(b, 0)
  q = _nibbles(b[:, None, 2:18]).reshape(len(b), 32).view(np.int8) - np.int8(8)
  return d * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
  d, m = _half(b, 0), _half(b, 2)
  q = _nibbles(b[:, None, 4:20]).reshape(len(b), 32)
  return d * q.astype(np.float32) + m


def _five_bit(b: np.ndarray, high_at: int) -> np.ndarray:
  """The 32 5-bit quants of a Q5_0/Q5_1 block: nibbles | (bit i of the uint32) << 4."""
  high = _bits(b[:, high_at:high_at + 4], 8)            # [n, 8 bits, 4 bytes]
  high = high.transpose(0, 2, 1).reshape(len(b), 32)    # value 8*byte + bit (little-endian)
  low = _nibbles(b[:, None, high_at + 4:high_at + 20]).reshape(len(b), 32)
  return low | (high << np.uint8(4))


def _q5_0(b: np.ndarray) -> np.ndarray:
  d = _half(b, 0)
  q = _five_bit(b, 2).view(np.int8) - np.int8(16)
  return d * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
  d, m = _half(b, 0), _half(b, 2)
  return d * _five_bit(b, 4).astype(np.float32) + m


def _q8_0(b: np.ndarray) -> np.ndarray:
  return _half(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q2_k(b: np.ndarray) -> np.ndarray:
  n = len(b)
  sm = b[:, 0:16]
  d, dmin = _half(b, 80), _half(b, 82)
  scale = (d * (sm & 0x0F).astype(np.float32))[:, :, None]   # [n, 16 sub-blocks, 1]
  low = (dmin * (sm >> 4).astype(np.float32))[:, :, None]
  # Two runs of 32 bytes, each giving 4 groups of 32 values = 8 sub-blocks of 16.
  q = _crumbs(b[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16).astype(np.float32)
  return (scale * q - low).reshape(n, QK_K)


def _q3_k(b: np.ndarray) -> np.ndarray:
  n = len(b)
  hmask, packed, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
  d = _half(b, 108)
  # Scale i: low 4 bits from byte i % 8 (low nibble for i < 8, high nibble otherwise), top 2
  # bits from byte 8 + i % 4 at shift 2 * (i // 4); stored with +32 offset.
  low4 = np.concatenate([sc[:, 0:8] & 0x0F, sc[:, 0:8] >> 4], axis=1)
  top2 = _crumbs(sc[:, 8:12]).reshape(n, 16)
  scales = (low4 | (top2 << np.uint8(4))).view(np.int8) - np.int8(32)
  scale = (d * scales.astype(np.float32))[:, :, None]      # [n, 16, 1]
  # Value 32*g + l (g = 0..7) uses the 2-bit field of run g // 4 at shift 2 * (g % 4) and bit
  # g of hmask[l]; a clear bit subtracts 4.
  low = _crumbs(packed.reshape(n, 2, 32)).reshape(n, 8, 32).view(np.int8)
  clear = (_bits(hmask, 8) ^ np.uint8(1)).view(np.int8)  # [n, 8, 32]
  q = (low - (clear << np.int8(2))).reshape(n, 16, 16).astype(np.float32)
  return (scale * q).reshape(n, QK_K)


def _k_sub_blocks(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K/Q5_K: per-sub-block (d * scale, dmin * min) as [n, 8, 1]."""
  d, dmin = _half(b, 0), _half(b, 2)
  scales, mins = _k_scales_mins(b[:, 4:16])
  return (d * scales)[:, :, None], (dmin * mins)[:, :, None]


def _q4_k(b: np.ndarray) -> np.ndarray:
  n = len(b)
  scale, low = _k_sub_blocks(b)
  # Four runs of 32 bytes; run r gives sub-block 2r (low nibbles) and 2r+1 (high nibbles).
  q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
  return (scale * q - low).reshape(n, QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
  n = len(b)
  scale, low = _k_sub_blocks(b)
  high = _bits(b[:, 16:48], 8)                           # sub-block k's fifth bit: bit k
  q = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32) | (high << np.uint8(4))
  return (scale * q.astype(np.float32) - low).reshape(n, QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
  n = len(b)
  d = _half(b, 208)
  scale = (d * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]  # [n, 16, 1]
  # Each half of 128 values reads 64 low-nibble bytes and 32 high bytes. Value 32*g + l of a
  # half (g = 0..3) takes the nibble of byte l + 32*(g % 2) (low for g < 2, high otherwise)
  # and the 2-bit field of high byte l at shift 2*g.
  lows = b[:, 0:128].reshape(n, 2, 2, 32)                # [n, half, g % 2, l]
  low = np.concatenate([lows & 0x0F, lows >> 4], axis=2)  # [n, half, g, l]
  high = _crumbs(b[:, 128:192].reshape(n, 2, 32))        # [n, half, g, l]
  q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
  return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _bf16(b: np.ndarray) -> np.ndarray:
  return (b.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


_KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0,
    Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k,
}


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------

def dequantize(data: np.ndarray, qtype, shape: Sequence[int] | None = None) -> np.ndarray:
  """Float32 values of one GGUF tensor; a drop-in for `gguf.quants.dequantize`.

  Args:
    data: the tensor's bytes as `gguf.GGUFReader` gives them in `tensor.data`: uint8
      ``[..., bytes per row]`` for quantized types and BF16, float32/float16
      ``[..., values per row]`` for F32/F16 (any array whose memory holds the bytes works).
    qtype: a `gguf.GGMLQuantizationType` or its integer id.
    shape: optional logical shape in NumPy order (the reverse of `tensor.shape`, which lists
      ggml's dimensions innermost first). Default: ``[..., values per row]`` from `data`'s
      leading dimensions, as gguf returns. Needed when `data` is a flat byte buffer.

  Returns:
    A new float32 array (never a view of `data`).

  Raises:
    UnsupportedQuantType (a NotImplementedError): a type with no kernel here; the message
      names the type and lists `SUPPORTED`.
    ValueError: the byte count is not whole blocks, or does not match `shape`.
  """
  code = int(qtype)
  block, type_size = block_layout(code)
  raw = np.ascontiguousarray(data)
  if raw.ndim == 0:
    raw = raw.reshape(1)
  raw = raw.view(np.uint8)  # Contiguous, so this only rescales the last axis.
  row_bytes = raw.shape[-1]
  if row_bytes % type_size:
    raise ValueError(f"{_type_name(qtype)} rows of {row_bytes} bytes are not whole "
                     f"{type_size}-byte blocks")
  out_shape = tuple(raw.shape[:-1]) + (row_bytes // type_size * block,)
  if shape is not None:
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(out_shape, dtype=np.int64)):
      raise ValueError(f"{_type_name(qtype)} data holds {int(np.prod(out_shape))} values, "
                       f"not the {int(np.prod(shape))} of shape {shape}")
    out_shape = shape

  if code == F32:
    return raw.view(np.float32).reshape(out_shape).copy()
  if code == F16:
    return raw.view(np.float16).astype(np.float32).reshape(out_shape)
  if code == BF16:
    return _bf16(raw).reshape(out_shape)

  kernel = _KERNELS[code]
  blocks = raw.reshape(-1, type_size)
  out = np.empty((len(blocks), block), np.float32)
  for start in range(0, len(blocks), _CHUNK_BLOCKS):
    stop = start + _CHUNK_BLOCKS
    out[start:stop] = kernel(blocks[start:stop])
  return out.reshape(out_shape)
