"""Presses whose kept keys are re-rotated to contiguous positions: key_rerotation, finch.

kvjax stores keys rotated at their true positions, so after compression a kept token keeps its
true distance to later queries. These presses instead close the gaps, as kvpress's
KeyRerotationPress (and HF's SinkCache) do: the i-th kept token of each (row, layer, kv head) is
moved to position i by one extra rotation of its key by (i - old position) (RoPE rotations
compose: R(a) R(b) = R(a + b)), and the cache's `lengths` become the kept count n, so decoding
continues at position n. The compressed cache then equals a full cache holding only the kept
tokens at positions 0..n-1 (tests/presses/test_rerotation.py).

Every kv head must keep the same number of tokens (their next token shares one position), so a
pooled selection (adakv) cannot be re-rotated; `compress` refuses it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.caches.terms import SpecError
from kvjax.presses.base import LayerInputs, Press, protect, register_press, topk_per_head
from kvjax.presses.wrappers import Wrapper


def rerotate(rope, k, old, new):
  """k [..., S, H] rotated at positions old int32 [..., S] -> the same keys rotated at new [..., S]
  (one rotation by new - old; unchanged when rope is None)."""
  if rope is None:
    return k
  return rope.apply(k[..., None, :], new - old)[..., 0, :]


@register_press
@dataclasses.dataclass(frozen=True)
class KeyRerotationPress(Wrapper):
  """The inner press's scores, a per-head top-k, and the kept keys re-rotated to positions 0..n-1
  (kvpress's KeyRerotationPress; the re-rotation of HF's SinkCache and of FINCH, Corallo & Papotti
  2024). As in kvpress only the inner press's `score` is used: its own selection or per-layer
  budgets are not (key_rerotation(pyramidkv) keeps n_kept per layer, like kvpress, which takes any
  ScorerPress); a press with its own `select` (adakv, chunkkv, ...) is refused."""

  name: ClassVar[str] = "key_rerotation"
  example: ClassVar[str | None] = "key_rerotation(knorm)"
  doc: ClassVar[str] = "inner press's top-k, kept keys re-rotated to 0..n-1 (SinkCache, FINCH)"
  rerotates: ClassVar[bool] = True

  def __post_init__(self):
    super().__post_init__()
    inner = self.press
    if type(inner).select is not Press.select or getattr(inner, "shared_heads", False):
      raise SpecError(f"key_rerotation re-rotates a per-head top-k of the inner press's scores; "
                      f"{inner.name} selects its own way (pooled or in chunks), which kvpress's "
                      "KeyRerotationPress does not take either; wrap a scorer such as knorm or "
                      "snapkv")
    if inner.rerotates or not inner.takes_budget:
      raise SpecError(f"key_rerotation: {inner.name} already re-rotates or sizes its layers "
                      "itself; wrap a scorer such as knorm or snapkv")

  def select(self, x: LayerInputs, scores, n_kept):
    return topk_per_head(scores, n_kept, x.context)

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    return n_kept


@register_press
@dataclasses.dataclass(frozen=True)
class FinchPress(Press):
  """The question at the end of the prompt is SnapKV's observation window, its attention
  normalized by each query's position, and the kept keys re-rotated to positions 0..n-1 (Corallo
  & Papotti 2024, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models").

  kvpress finds the question by a delimiter token it adds to the tokenizer (and drops from the
  embeddings); kvjax has none, so `window_size` says how many tokens at the end of each row are
  the question (required; the same for every row). Scores: the attention of the window's queries
  (softmax over every key up to the query), the query at position p weighted by p
  (`normalize_scores`), averaged over the window and the kv head's query heads; the window itself
  is always kept (max + 1). No pooling. `rerotate_keys=False` keeps the true positions.
  kvpress's `chunk_length` (a top-k per chunk of the prompt) is not supported.
  """

  name: ClassVar[str] = "finch"
  budget_free: ClassVar[bool] = True
  example: ClassVar[str | None] = "finch(window_size=8)"
  doc: ClassVar[str] = "question-window attention, keys re-rotated (Corallo & Papotti 2024)"
  window_size: int | None = None
  normalize_scores: bool = True
  rerotate_keys: bool = True
  chunk_length: int | None = None

  def __post_init__(self):
    if self.window_size is not None and (not isinstance(self.window_size, int)
                                         or self.window_size < 1):
      raise SpecError(f"finch: window_size must be an int >= 1, got {self.window_size!r}")
    if self.chunk_length is not None:
      raise SpecError("finch: chunk_length (kvpress's top-k per chunk) is not supported; leave it "
                      "unset")

  @property
  def rerotates(self) -> bool:
    return self.rerotate_keys

  def score(self, x: LayerInputs, n_kept):
    if self.window_size is None:
      raise SpecError("finch needs window_size=N: the question's tokens at the end of each row "
                      "(kvpress finds them with a delimiter token), e.g. \"finch(window_size=24)\"")
    w = self.window_size
    q, at, seen = x.last_queries(w)
    probs = x.attention_of(q, at)  # [B, N, w, T]
    weight = seen.astype(probs.dtype)  # [B, w]
    if self.normalize_scores:  # query at position p: p + 1 keys, kvpress multiplies by p
      weight = weight * at.astype(probs.dtype)
    mass = jnp.einsum("bnwt,bw->bnt", probs, weight)
    mass = mass / jnp.maximum(jnp.sum(seen, axis=1), 1)[:, None, None]
    in_window = jnp.arange(x.tokens)[None, :] >= (x.n_valid - w)[:, None]  # [B, T]
    mass = jnp.where(in_window[:, None, :], 0.0, mass)
    return protect(x.group_mean(mass), in_window[:, None, :])
