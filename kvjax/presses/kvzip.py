"""KVzip: score the context by how much the model needs each token to repeat it (query-agnostic).

The model is asked to reproduce its context, and a context token's score is the most attention
any of the repetition's queries gives it (max over those queries and over the kv head's query
heads). Two ways to run it, as in kvpress 0.5.5 (KVzipPress):

  * Rows of at most `chunk` tokens (2048, kvpress's chunk_size; or every row with chunk=None):
    the press extends each row (`Press.extend`) to [context, repeat prompt, chat suffix, context]
    and `compress` prefills the extension in one pass (the context's own hidden states are those
    of a plain prefill, causality), scoring with `score`.
  * Longer rows: the context is repeated one chunk at a time (`own_scores`). The plain prefill's
    keys and values stand for the context; each chunk's repetition [prompt, suffix, chunk] (a
    later chunk's prompt is `next_prompt` and the previous chunk's last `overlap` = 8 tokens)
    runs through the model after it, attending over the whole context and itself at positions
    n, n + 1, ... (a row of n tokens), and its queries score the chunk with a softmax over only
    the first `n_sink` tokens (not for the first chunk), the chunk and the repetition itself:
    kvpress's score_kvzip. The repetitions are never kept. Cost: every chunk's repetition
    attends over the whole context; on a 2-core CPU the passes took 2.5-4x a plain prefill of
    the rows (kvpress warns of 2-3x), at 4096 tokens about what the one-pass extension took.

Either way only context positions are kept and the cache's `lengths` are the context lengths, so
decoding continues right after the context. Its scores ignore the budget: a sweep scores once and
compresses a plain prefill of the context at every ratio (`compress(..., scores=)`).

kvpress 0.5.5 and kvjax, where they differ:
  * kvpress expects the context to start with the chat template's opening (its length is skipped
    by the repetition); kvjax rows are plain ids, so the whole row is the context.
  * Selection: kvjax's is kvpress's `layerwise=True` (every layer drops the same share; a layer's
    kv heads compete for its K x n_kept slots, the cache is a pool shared by the heads as with
    adakv), keeping K x floor(n (1 - r)) where kvpress keeps K n - floor(K n r) (up to K
    more). kvpress's default `layerwise=False` (one budget over every layer of the model) and
    `kvzip_plus_normalization` are not implemented.
  * The first `n_sink` tokens are always kept (max + 1), as in kvpress.
  * kvpress refuses KVzip on Gemma 3; kvjax scores its global layers only (a sliding layer of the
    repetition attends within its window, as in the model) and keeps every sliding window whole.

Both paths are checked against kvpress's KVzipPress on SmolLM2 (tests/fixtures/kvpress/kvzip.npz:
scores to 1e-4 and kept sets equal, docs/kvpress_oracle.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as attn
from kvjax.caches.terms import SpecError
from kvjax.models.config import layer_windows
from kvjax.models.protocol import static_step
from kvjax.presses.base import LayerInputs, Press, protect, register_press

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


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
  chunk: rows longer than this are repeated chunk by chunk (module docstring; kvpress's
  chunk_size); None repeats every row whole. next_prompt / next_prompt_ids: a later chunk's
  instruction (ids: the whole opening, default prompt_ids), followed by the previous chunk's last
  `overlap` tokens and then (with a tokenizer) the suffix.
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
  chunk: int | None = 2048
  next_prompt: str = NEXT_PROMPT
  next_prompt_ids: tuple | None = None
  overlap: int = 8

  def __post_init__(self):
    for name in ("prompt_ids", "next_prompt_ids"):
      ids = getattr(self, name)
      if ids is not None and (not isinstance(ids, tuple) or not ids
                              or not all(isinstance(i, int) for i in ids)):
        raise SpecError(f"kvzip: {name} must be a non-empty tuple of ints, got {ids!r}")
    for name, low in (("n_sink", 0), ("overlap", 0), ("block", 1)):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
        raise SpecError(f"kvzip: {name} must be an int >= {low}, got {getattr(self, name)!r}")
    if self.chunk is not None and (not isinstance(self.chunk, int)
                                   or self.chunk < max(1, self.overlap)):
      raise SpecError(f"kvzip: chunk must be None or an int >= max(1, overlap={self.overlap}), "
                      f"got {self.chunk!r}")

  def repeat_ids(self, tokenizer) -> list[int]:
    """The ids between the context and its repetition: instruction, then the answer's opening."""
    if self.prompt_ids is not None:
      return list(self.prompt_ids)
    if tokenizer is None:
      raise SpecError("kvzip: this model has no tokenizer to encode the repeat prompt; pass "
                      "prompt_ids=(...) (the instruction and the answer's opening as token ids)")
    return _encode(tokenizer, self.prompt) + _encode(tokenizer, _suffix(self.suffix, tokenizer))

  def next_ids(self, tokenizer, previous: list[int]) -> list[int]:
    """The ids before a later chunk: its instruction, the previous chunk's end, the suffix."""
    if self.prompt_ids is not None:
      return list(self.next_prompt_ids or self.prompt_ids) + previous
    if tokenizer is None:
      return self.repeat_ids(tokenizer)  # raises the error that names prompt_ids
    return (_encode(tokenizer, self.next_prompt) + previous
            + _encode(tokenizer, _suffix(self.suffix, tokenizer)))

  def chunked(self, rows) -> bool:
    """True when these rows are repeated chunk by chunk (`own_scores`), not extended."""
    return self.chunk is not None and max(len(r) for r in rows) > self.chunk

  def extend(self, rows, tokenizer):
    if self.chunked(rows):
      return rows, [len(r) for r in rows]
    middle = self.repeat_ids(tokenizer)
    return [r + middle + r for r in rows], [len(r) for r in rows]

  def own_scores(self, model, rows, prefilled):
    if not self.chunked(rows):
      return None
    return chunked_scores(model, prefilled(), self)

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


# ---- the chunked repetition ------------------------------------------------------------------------
def chunked_scores(model, prefilled, press: KVzipPress):
  """float32 [pressed layers, B, K, T]: kvzip's scores of the rows of a plain `prefill` (T the
  longest), repeating the context `press.chunk` tokens at a time (module docstring)."""
  rows = [list(r) for r in prefilled.rows]
  if [tuple(r) for r in rows] != list(prefilled.run):
    raise SpecError("kvzip: chunked scoring reads a plain prefill of the rows, not an extension")
  tokenizer = getattr(model, "tokenizer", None)
  size, t = press.chunk, max(len(r) for r in rows)
  n_context = np.array([len(r) for r in rows], np.int32)
  windows = layer_windows(model.config)
  keys = tuple(jnp.pad(k, ((0, 0), (0, size), (0, 0), (0, 0))) for k in prefilled.k)
  chunks = []  # per chunk: each row's repetition [instruction (+ overlap), suffix, chunk]
  for start in range(0, t, size):
    heads = [press.repeat_ids(tokenizer) if start == 0 else
             press.next_ids(tokenizer, r[max(0, start - press.overlap):start]) for r in rows]
    chunks.append([h + r[start:start + size] for h, r in zip(heads, rows)])
  width = max(len(run) for runs in chunks for run in runs)  # one compiled shape for every chunk
  pieces = []
  for c, runs in enumerate(chunks):
    tokens = np.zeros((len(rows), width), np.int32)
    for b, run in enumerate(runs):
      tokens[b, :len(run)] = run
    pieces.append(_repeat_chunk(
        static_step(model), model.params, jnp.asarray(tokens),
        jnp.asarray([len(x) for x in runs], jnp.int32), keys, prefilled.v,
        jnp.asarray(n_context), jnp.int32(c * size), size, press.n_sink, press.block,
        tuple(windows)))
  scores = jnp.concatenate(pieces, axis=-1)[..., :t]  # [pressed, B, K, T]
  context = jnp.arange(t)[None, :] < n_context[:, None]
  scores = jnp.where(context[None, :, None, :], scores, 0.0)
  sinks = (jnp.arange(t) < press.n_sink)[None, None, :]
  return jax.vmap(protect, in_axes=(0, None))(scores, sinks)  # each layer's sinks above its max


@functools.partial(jax.jit, static_argnames=("step", "size", "n_sink", "block", "windows"))
def _repeat_chunk(step, params, tokens, n_valid, keys, values, n_context, start, size: int,
                  n_sink: int, block: int, windows: tuple):
  """float32 [pressed layers, B, K, size]: one chunk's scores, positions start..start + size - 1.
  tokens int32 [B, W]: each row's repetition (n_valid real); keys (padded by size) and values:
  per layer [B, T, K, H] un-rotated, the plain prefill's."""
  repeating = _Repeating(keys=keys, values=values, n_context=n_context, start=start, size=size,
                         n_sink=n_sink, block=block, windows=windows)
  _, done = step.step_last(params, tokens, repeating, n_valid)
  return jnp.stack(done.scores)


@struct.dataclass
class _Repeating:
  """The model's cache while one chunk's repetition runs after the context: at each layer the
  repetition attends over the context's keys and values (a prefill's, rotated here at 0..n-1) and
  its own at positions n, n + 1, ...; a global layer also scores the chunk (kvpress's softmax over
  the sinks, the chunk and the repetition). Nothing is stored: the context stays as it was."""

  keys: tuple  # per layer [B, T + size, K, H] un-rotated
  values: tuple  # per layer [B, T, K, H]
  n_context: jax.Array  # int32 [B]
  start: jax.Array  # int32 []: the chunk's first position
  scores: tuple = ()  # per global layer float32 [B, K, size]
  size: int = struct.field(pytree_node=False, default=2048)
  n_sink: int = struct.field(pytree_node=False, default=4)
  block: int = struct.field(pytree_node=False, default=256)
  windows: tuple = struct.field(pytree_node=False, default=())

  @property
  def lengths(self):
    return self.n_context

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, W, N, H], k/v [B, W, K, H] un-rotated: the repetition at this layer."""
    b, w, _, h = q.shape
    n_valid = jnp.full((b,), w, jnp.int32) if n_valid is None else n_valid
    kv_heads = k.shape[2]
    t = self.values[layer].shape[1]
    positions = self.n_context[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, W]
    held = jnp.broadcast_to(jnp.arange(t + self.size, dtype=jnp.int32), (b, t + self.size))
    context_k = attn.apply_rope(rope, self.keys[layer], held)  # [B, T + size, K, H]
    q, k = attn.apply_rope(rope, q, positions), attn.apply_rope(rope, k, positions)
    qg = attn.prepare_queries(q, kv_heads, scale)  # [B, W, K, G, H]

    # Slot s holds position s: the context, then this row's repetition from slot n_context.
    width = -(-(t + w) // self.block) * self.block
    place = jax.vmap(lambda buf, x, at: jax.lax.dynamic_update_slice_in_dim(buf, x, at, axis=0))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0), (0, 0)))
    k_buf = place(pad(context_k[:, :t]), k.astype(context_k.dtype), self.n_context).swapaxes(1, 2)
    v_buf = place(pad(self.values[layer]), v.astype(self.values[layer].dtype),
                  self.n_context).swapaxes(1, 2)  # [B, K, width, H]

    def load_block(first):
      return (jax.lax.dynamic_slice_in_dim(k_buf, first, self.block, axis=2),
              jax.lax.dynamic_slice_in_dim(v_buf, first, self.block, axis=2))

    out = attn.attend_prefix_blocks(qg, load_block, positions, self.n_context + n_valid,
                                    self.block, self.windows[layer])
    if self.windows[layer] is not None:  # a sliding layer is never pressed
      return out, self
    chunk_k = jax.lax.dynamic_slice_in_dim(context_k, self.start, self.size, axis=1)
    scored = jnp.concatenate([context_k[:, :self.n_sink], chunk_k, k.astype(context_k.dtype)],
                             axis=1).swapaxes(1, 2)  # [B, K, n_sink + size + W, H]
    return out, self.replace(scores=self.scores + (self._chunk_scores(qg, scored, n_valid),))

  def _chunk_scores(self, qg, keys, n_valid):
    """[B, K, size]: the most any real repetition query (and any query head of the kv head)
    attends to each chunk position, over the sinks, the chunk and the repetition."""
    b, w = qg.shape[:2]
    sink = jnp.arange(self.n_sink)
    chunk = self.start + jnp.arange(self.size)
    seen_sink = (sink < jnp.minimum(self.start, self.n_context[:, None]))         & (sink < self.n_sink)  # [B, n_sink]: kvpress's min(n_sink, start)
    seen_chunk = chunk[None, :] < self.n_context[:, None]  # [B, size]
    rows = -(-w // self.block)
    qg = jnp.pad(qg, ((0, 0), (0, rows * self.block - w), (0, 0), (0, 0), (0, 0)))

    def one(i):  # queries i * block ... of every row
      qb = jax.lax.dynamic_slice_in_dim(qg, i * self.block, self.block, axis=1)
      at = i * self.block + jnp.arange(self.block)  # [bq]
      own = (jnp.arange(w)[None, None, :] <= at[None, :, None])           & (jnp.arange(w)[None, None, :] < n_valid[:, None, None])  # [B, bq, W]
      fixed = jnp.concatenate([seen_sink, seen_chunk], axis=1)[:, None, :]  # [B, 1, S']
      mask = jnp.concatenate([jnp.broadcast_to(fixed, (b, self.block, fixed.shape[-1])), own],
                             axis=-1)  # [B, bq, n_sink + size + W]
      probs = attn.masked_softmax(attn.scores_of(qb, keys), mask[:, None, None])  # [B,K,G,bq,S']
      probs = probs[..., self.n_sink:self.n_sink + self.size]
      real = (at[None, :] < n_valid[:, None])[:, None, None, :, None]
      return jnp.max(jnp.where(real, probs, 0.0), axis=(2, 3))  # [B, K, size]

    return jax.lax.fori_loop(1, rows, lambda i, m: jnp.maximum(m, one(i)), one(0))

  def advance(self, n_valid):
    return self


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
