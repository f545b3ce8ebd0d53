"""Perplexity of a model on a token stream, fed through a cache the way decoding feeds it.

Tokens go through the cache in chunks (a jitted `lax.scan` over chunks, the cache on the carry);
every token attends to exactly what the cache holds when it arrives, so a lossy cache spec (window,
quantized, evicting) changes the result the way it would change generation. With chunk 1 this is
token-by-token decoding; lossless caches may use larger chunks for speed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import spec as spec_lib
from kvjax.models.llama import Llama, params_dtype


@dataclasses.dataclass
class PerplexityResult:
  ppl: float
  nll: float  # mean negative log-likelihood (nats) over the predicted tokens
  tokens: int  # tokens evaluated (the first token has no prediction; tokens - 1 are scored)
  cache_bytes: dict
  seconds: float  # scoring time, compile excluded
  token_nll: np.ndarray  # [tokens - 1] per-token NLL, for rolling curves


def _score(params, tokens, cache, *, config, dtype):
  """tokens [C, B, T] chunks -> per-token NLL [C, B, T] of predicting token t+1 from its prefix."""
  model = Llama(config, dtype)

  def step(cache, chunk):
    logits, cache = model.apply({"params": params}, chunk, cache)
    return cache, jax.nn.log_softmax(logits, axis=-1)

  def body(cache, pair):
    chunk, targets = pair
    cache, logp = step(cache, chunk)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return cache, nll

  targets = jnp.concatenate([tokens.reshape(-1)[1:], jnp.zeros((1,), tokens.dtype)]).reshape(tokens.shape)
  cache, nll = jax.lax.scan(body, cache, (tokens, targets))
  return nll, cache


# Kinds whose chunked attend gives every token exactly what token-by-token feeding would:
# full-precision buffers that keep every token (full, offload) or the last N (window/sinks)...
_CHUNK_EXACT_KINDS = ("full", "offload", "window")
# ...and kinds whose `attend` itself scans a chunk one token at a time (eviction and tier moves
# happen between tokens), with or without quantized storage.
_STEPWISE_KINDS = ("h2o", "tiered")


def default_chunk(spec) -> int:
  """Chunks of 256 where chunking is exact (see above); token by token otherwise.

  Quantized kinds (`int4+residual:64`, ...) and shared ones stay at 1: a chunk's tokens would see
  each other before they are quantized (or mapped), which decoding never allows.
  """
  spec = spec_lib.parse_spec(spec)
  exact = (spec.kind in _STEPWISE_KINDS
           or (spec.kind in _CHUNK_EXACT_KINDS and spec.bits is None))
  return 256 if exact else 1


def perplexity(model, ids, *, cache="full", chunk: int | None = None,
               cache_options: dict | None = None) -> PerplexityResult:
  """Perplexity of `model` on the token ids (1-D), fed through a cache of the given spec.

  cache_options: keyword arguments for `make_cache` (e.g. `maps=` for share:G:cal).
  """
  ids = np.asarray(ids, np.int32).reshape(-1)
  if ids.size < 2:
    raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
  spec = spec_lib.parse_spec(cache)
  if spec.mode == "none":
    raise spec_lib.SpecError("perplexity needs a cache; 'none' has nothing to feed tokens through")
  chunk = chunk or default_chunk(spec)
  n = ids.size
  n_chunks = -(-n // chunk)
  padded = np.zeros(n_chunks * chunk, np.int32)
  padded[:n] = ids
  dtype = params_dtype(model.params)
  # The padding after the last real token is written past the capacity and dropped by the cache.
  capacity = max(n, 16, spec.budget or 0)
  kv_cache = spec_lib.make_cache(spec, model.config, 1, capacity, dtype, **(cache_options or {}))
  tokens = jnp.asarray(padded.reshape(n_chunks, 1, chunk))
  fn = jax.jit(lambda p, t, c: _score(p, t, c, config=model.config, dtype=dtype))
  fn = fn.lower(model.params, tokens, kv_cache).compile()  # `seconds` below excludes compiling
  start = time.perf_counter()
  nll, final_cache = fn(model.params, tokens, kv_cache)
  nll = np.asarray(nll).reshape(-1)[: n - 1]
  seconds = time.perf_counter() - start
  mean = float(nll.mean())
  return PerplexityResult(ppl=float(np.exp(mean)), nll=mean, tokens=int(n),
                          cache_bytes=final_cache.nbytes(), seconds=seconds, token_nll=nll)
