"""Perplexity of a model on token streams, fed through a cache the way decoding feeds it.

Tokens go through the cache in chunks (a jitted `lax.scan` over chunks, the cache on the carry);
every token attends to exactly what the cache holds when it arrives, so a lossy cache spec
(window, quantized, evicting) changes the result the way it would change generation. With chunk 1
this is token-by-token decoding; kinds that declare `chunk_exact` use chunks of 256 for speed.

Several documents are scored in one batched call (ragged: each row's chunks carry their own
`n_valid`). The scan is jitted once per (step function, chunk, padded shape, cache type): lengths
are padded up to a bucket, so nearby lengths and repeated calls share one executable.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import kernels, prompts, runtime, sharding
from kvjax import layouts
from kvjax import spec as spec_lib
from kvjax.caches import base
from kvjax.decode import Stopwatch
from kvjax.models.protocol import check_model, static_step


@dataclasses.dataclass
class PerplexityResult:
  ppl: float
  nll: float  # mean negative log-likelihood (nats) over the predicted tokens
  tokens: int  # tokens evaluated (the first token has no prediction; tokens - 1 are scored)
  cache_bytes: dict
  seconds: float  # scoring time, compile excluded (of the whole batch, for batched calls)
  token_nll: np.ndarray  # [tokens - 1] per-token NLL, for rolling curves


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _score(params, tokens, n_valid, cache, *, model):
  """tokens, n_valid-masked chunks [C, B, T] -> per-token NLL [C, B, T] of predicting each row's
  next token (the target of the last position of a chunk is the first of the next chunk)."""
  c, b, t = tokens.shape
  flat = tokens.transpose(1, 0, 2).reshape(b, c * t)
  targets = jnp.concatenate([flat[:, 1:], jnp.zeros((b, 1), flat.dtype)], axis=1)
  targets = targets.reshape(b, c, t).transpose(1, 0, 2)

  def body(cache, xs):
    chunk, nv, target = xs
    logits, cache = model.step(params, chunk, cache, nv)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return cache, -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]

  cache, nll = jax.lax.scan(body, cache, (tokens, n_valid, targets))
  return nll, cache


def default_chunk(cache) -> int:
  """256 for kinds that declare `chunk_exact` (chunked feeding is exact for them), else 1.

  Quantized kinds stay at 1: a chunk's tokens would see each other before they are quantized,
  which decoding never allows. Accepts a cache, a spec string or a `CacheSpec`, or a layout
  (`kvjax.layouts`: 256 only if every spec it places is chunk-exact).
  """
  if isinstance(cache, (str, dict, spec_lib.CacheSpec, layouts.Layout)):
    request = layouts.parse_request(cache)
    specs = ([request] if isinstance(request, spec_lib.CacheSpec)
             else [request.plain] + [s for _, s in request.placements])
    probes = [jax.eval_shape(lambda s=s: spec_lib.make_cache(s, _ProbeConfig(), 1, _probe_capacity(s)))
              for s in specs]
    return 256 if all(p.caps.chunk_exact for p in probes) else 1
  return 256 if cache.caps.chunk_exact else 1


@dataclasses.dataclass(frozen=True)
class _ProbeConfig:
  n_layers: int = 2
  n_kv_heads: int = 1
  head_dim: int = 32
  vocab_size: int = 16


def _probe_capacity(spec) -> int:
  return max(64, spec.budget or 0)


def perplexity(model, ids, *, cache="full", chunk: int | None = None, capacity: int | None = None,
               cache_options: dict | None = None, mesh=None, rules=None, kernel: str = "auto"):
  """Perplexity of `model` on token ids, fed through a cache.

  ids: one document (1-D ids) -> a `PerplexityResult`; several (a list of 1-D id sequences,
    ragged, or a 2-D array) -> a list of `PerplexityResult`, one per document, scored together
    in one batched call.
  cache: spec string / `CacheSpec` (a registered kind too), or a cache object with one row per
    document (left untouched: a copy is fed).
  chunk: tokens fed per step (default `default_chunk`); capacity: slots per row (default: the
    kind's own choice for the longest document).
  cache_options: keyword arguments for `make_cache` (e.g. `maps=` for share:G:cal; a paged:P
    pool otherwise holds the pages the documents fill).
  mesh, rules: run over a device mesh (documents split over the batch axes); see `kvjax.sharding`.
  kernel: the decode attention kernel, as for `kvjax.generate` (scoring feeds chunks of several
    tokens, which stay on jnp; a chunk of 1 uses the decode kernels).
  The cache is built and placed by `kvjax.runtime.resolve`.
  """
  check_model(model, "perplexity")
  docs, batched = prompts.token_rows(ids, getattr(model, "tokenizer", None), what="document")
  for i, d in enumerate(docs):
    if d.size < 2:
      raise ValueError(f"perplexity needs at least 2 tokens per document; document {i} has {d.size}")
    prompts.check_vocab(d, model.config.vocab_size, what=f"document {i}")
  if runtime.is_cache(cache):
    base.check_cache(cache, "perplexity")
    cache = jax.tree_util.tree_map(jnp.copy, cache)  # fed (donated) instead of the caller's
  if kernels.check_kernel(kernel) != "auto":
    cache_options = {**(cache_options or {}), "kernel": kernel}
  sizes = np.array([d.size for d in docs], np.int32)
  kv_cache, plan = runtime.resolve(model, cache, lengths=sizes, capacity=capacity, mesh=mesh,
                                   rules=rules, options=cache_options, what="perplexity",
                                   row="document", demand=f"{int(sizes.max())} tokens")
  chunk = chunk or default_chunk(kv_cache)
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  chunks, n_valid = _chunks(docs, plan.padded_batch, chunk)
  with Stopwatch() as clock:  # `seconds` excludes compiling
    nll, final_cache = _score(plan.params(model.params), plan.rows(chunks, axis=1),
                              plan.rows(n_valid, axis=1), kv_cache, model=static_step(model))
    nll = sharding.fetch(nll).transpose(1, 0, 2).reshape(plan.padded_batch, -1)
  cache_bytes = final_cache.nbytes()
  results = []
  for b, d in enumerate(docs):
    token_nll = nll[b, : d.size - 1]
    mean = float(token_nll.mean())
    results.append(PerplexityResult(ppl=float(np.exp(mean)), nll=mean, tokens=int(d.size),
                                    cache_bytes=cache_bytes, seconds=clock.seconds, token_nll=token_nll))
  return results if batched else results[0]


def _chunks(docs, batch: int, chunk: int):
  """(tokens int32 [C, B, chunk], n_valid int32 [C, B]): the documents right-padded to a bucket
  that is a multiple of `chunk`; rows past the documents (mesh padding) hold one token 0."""
  longest = max(d.size for d in docs)
  padded_len = -(-runtime.bucket(longest) // chunk) * chunk
  n_chunks = padded_len // chunk
  tokens = np.zeros((batch, padded_len), np.int32)
  lengths = np.array([d.size for d in docs] + [1] * (batch - len(docs)), np.int32)
  for b, d in enumerate(docs):
    tokens[b, :d.size] = d
  starts = np.arange(n_chunks, dtype=np.int32)[:, None] * chunk
  n_valid = np.clip(lengths[None, :] - starts, 0, chunk).astype(np.int32)  # [C, B]
  return tokens.reshape(batch, n_chunks, chunk).transpose(1, 0, 2), n_valid
