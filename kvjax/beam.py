"""Beam search over any cache that can `reorder` its rows.

Each of the `beams` rows of the cache is one hypothesis. A step scores every (beam, next token)
pair by the summed log-probability, keeps the best `beams` pairs and reorders the cache rows to
follow their parents. On a full cache a reorder gathers whole rows (a copy); on a `paged:P`
cache it gathers block-table rows only, so hypotheses share the pages of their common prefix and
a page is copied only when two of them write into it (copy-on-write).

A finished hypothesis (it drew `eos_id`) keeps its score and extends with `eos_id` at no cost.
The whole search is one jitted `lax.fori_loop`: one compile per (prompt bucket, beams, steps).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import prompts, runtime
from kvjax.caches.base import supports
from kvjax.models.protocol import check_model, static_step


@dataclasses.dataclass
class BeamResult:
  """tokens int32 [beams, max_new_tokens] best first; scores fp32 [beams] (summed log-probs);
  cache: the cache after the search (row b holds hypothesis b, before sorting)."""

  tokens: np.ndarray
  scores: np.ndarray
  cache: object


@functools.partial(jax.jit, static_argnames=("model", "steps"), donate_argnames=("cache",))
def _search(params, tokens, n_valid, cache, eos_id, *, model, steps):
  beams = tokens.shape[0]
  logits, cache = model.step_last(params, tokens, cache, n_valid)  # only row 0 is fed
  cache = cache.reorder(jnp.zeros((beams,), jnp.int32))  # every beam starts from row 0
  scores, first = jax.lax.top_k(jax.nn.log_softmax(logits[0].astype(jnp.float32)), beams)
  first = first.astype(jnp.int32)
  out = jnp.zeros((beams, steps), jnp.int32).at[:, 0].set(first)
  vocab = logits.shape[-1]
  ones = jnp.ones((beams,), jnp.int32)

  def body(i, carry):
    cache, out, scores, last, done = carry
    logits, cache = model.step(params, last[:, None], cache, ones)
    logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))
    stay = jnp.where(jnp.arange(vocab) == eos_id, 0.0, -jnp.inf)
    logp = jnp.where(done[:, None], stay[None, :], logp)
    top, flat = jax.lax.top_k((scores[:, None] + logp).reshape(-1), beams)
    parent, token = (flat // vocab).astype(jnp.int32), (flat % vocab).astype(jnp.int32)
    cache = cache.reorder(parent)
    out = out[parent].at[:, i].set(token)
    return cache, out, top, token, done[parent] | (token == eos_id)

  carry = (cache, out, scores, first, first == eos_id)
  cache, out, scores, _, _ = jax.lax.fori_loop(1, steps, body, carry)
  return out, scores, cache


def beam_search(model, prompt, *, beams: int, max_new_tokens: int, cache="paged:16",
                capacity: int | None = None, eos_id: int = -1, **cache_options) -> BeamResult:
  """The `beams` best continuations of one prompt (1-D token ids) by summed log-probability.

  cache: a spec (default `paged:16`, whose beams share pages) or any cache kind with `reorder`;
    built by `kvjax.runtime.resolve` (capacity: the kind's choice by default; a paged pool holds
    the pages the beams fill, plus one spare per beam for copy-on-write).
  eos_id: a hypothesis that draws it is finished (-1: none is).
  """
  check_model(model, "beam_search")
  ids = prompts.token_row(prompt, getattr(model, "tokenizer", None), what="beam_search: the prompt")
  if not isinstance(beams, int) or beams < 1:
    raise ValueError(f"beam_search: beams must be a positive int, got {beams!r}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"beam_search: max_new_tokens must be a positive int, got {max_new_tokens!r}")
  prompts.check_vocab(ids, model.config.vocab_size)
  # Every beam ends up holding the prompt and its tokens; a paged pool also keeps one page per
  # beam spare for the copies a step makes of pages its beams share (copy-on-write).
  kv, _ = runtime.resolve(model, cache, lengths=np.full(beams, ids.size), extra=max_new_tokens,
                          capacity=capacity, options=cache_options, spare_pages=beams,
                          what="beam_search",
                          demand=f"{ids.size} + {max_new_tokens} tokens")
  if not supports(kv, "reorder"):
    raise ValueError(f"beam_search: cache {cache!r} cannot reorder its rows")
  tokens = np.zeros((beams, runtime.bucket(ids.size)), np.int32)
  tokens[0, :ids.size] = ids
  n_valid = np.zeros(beams, np.int32)
  n_valid[0] = ids.size
  out, scores, kv = _search(model.params, jnp.asarray(tokens), jnp.asarray(n_valid), kv,
                            jnp.int32(eos_id), model=static_step(model), steps=max_new_tokens)
  order = np.argsort(-np.asarray(scores), kind="stable")
  return BeamResult(tokens=np.asarray(out)[order], scores=np.asarray(scores)[order], cache=kv)
