import os

# Tests run on the CPU in float32; keep XLA from grabbing every core for one test's threads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def tiny():
  """The random-weight 4-layer tiny model (MHA) with its byte tokenizer."""
  import kvjax

  return kvjax.load("tiny")


@pytest.fixture(scope="session")
def tiny_gqa(tiny):
  """Like tiny but with 2 kv heads for 4 query heads (GQA), random weights."""
  import jax.numpy as jnp

  import kvjax
  from kvjax.loading import Model
  from kvjax.models import llama

  cfg = kvjax.TINY.replace(n_kv_heads=2, name="tiny-gqa")
  return Model("tiny-gqa", cfg, llama.init_params(cfg, 1, jnp.float32), tiny.tokenizer)
