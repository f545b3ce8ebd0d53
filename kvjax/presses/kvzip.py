"""KVzip: score the context by how much the model needs each token to repeat it (query-agnostic).

The press extends each prompt row (`Press.extend`) to [context, repeat prompt, chat suffix,
context]: the model is asked to reproduce its context, and a context token's score is the most
attention any of the repetition's queries gives it (max over those queries and over the kv head's
query heads). `compress` prefills the extended rows in one pass (the context's own hidden states
are those of a plain prefill, causality) and keeps only context positions; the cache's `lengths`
are the context lengths, so decoding continues right after the context. Its scores ignore the
budget: a sweep scores the extension once (`score_prompt`) and compresses a plain prefill of the
context at every ratio (`compress(..., scores=)`).

kvpress 0.5.5 (KVzipPress) and kvjax, where they differ:
  * kvpress prefills the context, then runs the repetition against that cache, one pass per
    `chunk_size` = 2048 context tokens (each later chunk's prompt ends with the previous chunk's
    last 8 tokens, and its queries see only 4 sink tokens, that chunk and themselves). kvjax
    repeats the whole context in one pass: identical for contexts up to 2048 tokens.
  * kvpress expects the context to start with the chat template's opening (its length is skipped
    by the repetition); kvjax rows are plain ids, so the whole row is the context.
  * Selection: kvjax's is kvpress's `layerwise=True` (every layer drops the same share; a layer's
    kv heads compete for its K x n_kept slots, the cache is a pool shared by the heads as with
    adakv), keeping K x floor(n (1 - r)) where kvpress keeps K n - floor(K n r) (up to K - 1
    more). kvpress's default `layerwise=False` (one budget over every layer of the model) and
    `kvzip_plus_normalization` are not implemented.
  * The first `n_sink` tokens are always kept (max + 1), as in kvpress.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.caches.terms import SpecError
from kvjax.presses.base import LayerInputs, Press, protect, register_press

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."


@register_press
@dataclasses.dataclass(frozen=True)
class KVzipPress(Press):
  """Keeps the context tokens the model attends to most while repeating the context (Kim et al.
  2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"); see the module
  docstring for the differences from kvpress.

  prompt: the repeat instruction (kvpress's); suffix: what opens the model's answer (default: the
  tokenizer's chat template after a user turn, as kvpress does, or "\\n" without one);
  prompt_ids: the instruction and suffix as token ids instead (a tuple; for models without a
  tokenizer); block: queries scored at a time.
  """

  name: ClassVar[str] = "kvzip"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "max attention while the model repeats the context (Kim et al. 2025)"
  shared_heads: ClassVar[bool] = True  # a layer's kv heads compete for its budget
  n_sink: int = 4
  prompt: str = REPEAT_PROMPT
  suffix: str | None = None
  prompt_ids: tuple | None = None
  block: int = 256

  def __post_init__(self):
    if self.prompt_ids is not None and (not isinstance(self.prompt_ids, tuple)
                                        or not all(isinstance(i, int) for i in self.prompt_ids)):
      raise SpecError(f"kvzip: prompt_ids must be a tuple of ints, got {self.prompt_ids!r}")
    if not isinstance(self.n_sink, int) or self.n_sink < 0:
      raise SpecError(f"kvzip: n_sink must be an int >= 0, got {self.n_sink!r}")

  def repeat_ids(self, tokenizer) -> list[int]:
    """The ids between the context and its repetition: instruction, then the answer's opening."""
    if self.prompt_ids is not None:
      return list(self.prompt_ids)
    if tokenizer is None:
      raise SpecError("kvzip: this model has no tokenizer to encode the repeat prompt; pass "
                      "prompt_ids=(...) (the instruction and the answer's opening as token ids)")
    return _encode(tokenizer, self.prompt) + _encode(tokenizer, _suffix(self.suffix, tokenizer))

  def extend(self, rows, tokenizer):
    middle = self.repeat_ids(tokenizer)
    return [r + middle + r for r in rows], [len(r) for r in rows]

  def score(self, x: LayerInputs, n_kept):
    if x.n_context is None:
      raise SpecError("kvzip scores the repetition of the context: run it through kvjax.compress "
                      "or score_prompt, which extend the rows (Press.extend)")
    t, block = x.tokens, min(self.block, x.tokens)
    n_blocks = -(-t // block)
    q = jnp.pad(x.q, ((0, 0), (0, n_blocks * block - t), (0, 0), (0, 0)))
    pos = jnp.arange(n_blocks * block, dtype=jnp.int32)

    def one(i):  # the most attention each key gets from this block's repetition queries
      qb = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
      pb = jax.lax.dynamic_slice_in_dim(pos, i * block, block)
      probs = x.attention_of(qb, jnp.broadcast_to(pb, (x.batch, block)))  # [B, N, block, T]
      repeat = (pb[None, :] >= x.n_context[:, None]) & (pb[None, :] < x.n_valid[:, None])
      return jnp.max(jnp.where(repeat[:, None, :, None], probs, 0.0), axis=2)  # [B, N, T]

    # Blocks wholly inside every row's context hold no repetition query: start past them.
    first = jnp.min(x.n_context) // block
    best = jax.lax.fori_loop(first, n_blocks, lambda i, m: jnp.maximum(m, one(i)),
                             jnp.zeros((x.batch, x.q.shape[2], t), jnp.float32))  # [B, N, T]
    scores = jnp.max(best.reshape(x.batch, x.kv_heads, x.groups, t), axis=2)  # [B, K, T]
    scores = jnp.where(x.context[:, None, :], scores, 0.0)
    return protect(scores, (jnp.arange(t) < self.n_sink)[None, None, :])

  def select(self, x: LayerInputs, scores, n_kept):
    """The K x n_kept best (kv head, position) pairs of the layer's context."""
    b, kh, t = scores.shape
    ok = x.context[:, None, :]
    ranked = jnp.where(ok, scores, -jnp.inf).reshape(b, kh * t)
    rank = jnp.argsort(jnp.argsort(-ranked, axis=-1, stable=True), axis=-1).reshape(b, kh, t)
    return (rank < (kh * n_kept)[:, None, None]) & ok


def _suffix(suffix: str | None, tokenizer) -> str:
  """kvpress's answer opening: the chat template's text after a user turn's content."""
  if suffix is not None:
    return suffix
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    return "\n"
  content = "dummy context"
  separator = "\n" + "#" * len(content)
  text = tokenizer.apply_chat_template([{"role": "user", "content": content + separator}],
                                       add_generation_prompt=True, enable_thinking=False)
  return text.split(separator)[1]


def _encode(tokenizer, text: str) -> list[int]:
  try:
    return list(tokenizer.encode(text, add_bos=False))
  except TypeError:  # a tokenizer without the add_bos switch
    return list(tokenizer.encode(text))
