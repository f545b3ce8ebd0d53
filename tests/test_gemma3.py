"""The Gemma 3 decoder on a tiny random Gemma-3-shaped model (`tiny-gemma3`: 6 layers, 5 sliding
with a 16-token window and 1 global, MQA):

  * the uncached forward equals the float64 NumPy oracle (`kvjax.testing.oracle.gemma3_forward`),
    on sequences longer than the window, so the sliding mask and the two RoPE bases are both
    exercised;
  * decoding with kvjax's default cache for it (window rings on sliding layers, full on global)
    gives the uncached forward's logits at every step, token by token and in chunks, with ragged
    rows;
  * the GGUF reader maps Gemma 3's tensor names (a tiny file written with `gguf.GGUFWriter`).
"""

import numpy as np
import pytest
import jax.numpy as jnp

import kvjax
from kvjax import loading
from kvjax.models import config as config_lib
from kvjax.testing import oracle


@pytest.fixture(scope="module")
def tiny():
  return kvjax.load("tiny-gemma3", dtype=jnp.float32, seed=3)


def test_layer_types_follow_gemma3s_pattern():
  assert config_lib.GEMMA3_270M.layer_types.count("global") == 3
  assert [i for i, t in enumerate(config_lib.GEMMA3_270M.layer_types) if t == "global"] == [5, 11, 17]
  assert config_lib.layer_types(config_lib.TINY) == ("global",) * 4
  with pytest.raises(ValueError, match="layer_types"):
    config_lib.TINY_GEMMA3.replace(layer_types=("sliding",) * 5)


def test_forward_matches_the_numpy_oracle(tiny):
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 256, size=40)  # 40 > 16: sliding layers drop the oldest keys
  got = np.asarray(loading.forward(tiny.config, tiny.params, jnp.asarray(tokens[None])))[0]
  want = oracle.gemma3_forward(tiny.config, tiny.params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_the_window_matters(tiny):
  """Tokens more than a window back change global layers only: with an all-global config the
  logits at the last position differ, so the test above does check the sliding mask."""
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, size=(1, 40)))
  sliding = np.asarray(loading.forward(tiny.config, tiny.params, tokens))[0, -1]
  all_global = tiny.config.replace(layer_types=("global",) * tiny.config.n_layers)
  dense = np.asarray(loading.forward(all_global, tiny.params, tokens))[0, -1]
  assert np.abs(sliding - dense).max() > 1e-3


GEMMA3_NAMES = {
    "attn_norm/scale": "attn_norm.weight", "attn/wq": "attn_q.weight", "attn/wk": "attn_k.weight",
    "attn/wv": "attn_v.weight", "attn/wo": "attn_output.weight",
    "attn/q_norm/scale": "attn_q_norm.weight", "attn/k_norm/scale": "attn_k_norm.weight",
    "post_attn_norm/scale": "post_attention_norm.weight", "mlp_norm/scale": "ffn_norm.weight",
    "mlp/w_gate": "ffn_gate.weight", "mlp/w_up": "ffn_up.weight", "mlp/w_down": "ffn_down.weight",
    "post_mlp_norm/scale": "post_ffw_norm.weight",
}


def test_gguf_reader_maps_gemma3_tensors(tmp_path, monkeypatch):
  """A tiny gemma3 GGUF (F32, tensors as llama.cpp's converter names them, matrices [out, in])
  reads back as the tiny model's config and param tree: no Q/K row permutation (that is Llama's)."""
  gguf = pytest.importorskip("gguf")
  from kvjax.models import gguf as kg

  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "kvcache"))
  c = config_lib.TINY_GEMMA3.replace(vocab_size=64)
  rng = np.random.default_rng(0)
  flat = kg.flatten(jax_tree_to_numpy(loading.architecture(c).init_params(c, 0, jnp.float32)))
  flat = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in flat.items()}
  path = tmp_path / "tiny-gemma3.gguf"
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(c.n_layers)
  w.add_context_length(c.max_position)
  w.add_embedding_length(c.dim)
  w.add_feed_forward_length(c.ffn_dim)
  w.add_head_count(c.n_heads)
  w.add_head_count_kv(c.n_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(c.rope_theta)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_sliding_window(c.sliding_window)
  w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
  for key, value in flat.items():
    if key == "embed/embedding":
      name = "token_embd.weight"
    elif key == "final_norm/scale":
      name = "output_norm.weight"
    else:
      layer, rest = key.split("/", 1)
      name = f"blk.{layer.split('_')[1]}.{GEMMA3_NAMES[rest]}"
    stored = value.T.copy() if key.startswith("layers_") and value.ndim == 2 else value
    w.add_tensor(name, stored)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

  config, params, _ = kg.read_gguf(path, cache=False)
  assert isinstance(config, config_lib.Gemma3Config)
  assert config.layer_types == c.layer_types and config.sliding_window == c.sliding_window
  assert (config.n_kv_heads, config.head_dim, config.query_scale) == (1, 32, 32.0)
  got = kg.flatten(params)
  assert set(got) == set(flat)
  for key in flat:
    np.testing.assert_array_equal(got[key], flat[key], err_msg=key)


def jax_tree_to_numpy(tree):
  return {k: jax_tree_to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def _forward_nll(tiny, ids):
  logits = np.asarray(loading.forward(tiny.config, tiny.params, jnp.asarray(ids[None])))[0, :-1]
  peak = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
  return float(np.mean(lse - logits[np.arange(len(ids) - 1), ids[1:]]))


@pytest.mark.parametrize("chunk", [1, 8, 256])
@pytest.mark.parametrize("cache", ["full", "full@all"])
def test_cached_decoding_equals_the_forward(tiny, cache, chunk):
  """Window rings on sliding layers (the default) and masked full storage (`full@all`) score a
  48-token text exactly as the uncached forward does: token by token, in chunks shorter than the
  16-token window and in one chunk longer than it."""
  ids = np.random.RandomState(2).randint(0, 256, size=48).astype(np.int32)
  got = kvjax.perplexity(tiny, ids, cache=cache, chunk=chunk)
  assert np.isclose(np.log(got.ppl), _forward_nll(tiny, ids), atol=1e-5)


def test_uncached_generation_keeps_the_window(tiny):
  ids = [list(np.random.RandomState(0).randint(0, 256, 30)), [5, 6, 7]]
  cached = kvjax.generate(tiny, ids, max_new_tokens=12, cache="full").tokens
  np.testing.assert_array_equal(kvjax.generate(tiny, ids, max_new_tokens=12, cache="none").tokens,
                                cached)
