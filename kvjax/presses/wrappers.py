"""Presses around presses: they change how a press's scores become a selection or a budget.

A wrapper is a Press whose first field is the inner press; `score` delegates to it (so a wrapper
of any press, built-in or registered, works) and `select` / `layer_kept` carry the wrapper's rule:

  adakv         a layer's kv heads share its budget (pooled top-k)
  criticaladakv adakv's head budgets, criticalkv's two stages inside each head
  criticalkv    rescales the press's scores by how much each value moves the layer's output
  chunkkv       keeps whole chunks of tokens, the same ones in every kv head
  block         scores the prompt block by block, each time among the survivors and the new block
  per_layer     a compression ratio per layer
  composed      several presses one after another (not a wrapper of one press: a chain)

`restrict` shows a press a subset of the prompt as if it were the whole prompt (block, composed).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import math

import jax
import jax.numpy as jnp

from kvjax.caches.terms import SpecError
from kvjax.presses.base import LayerInputs, Press, register_press, topk_per_head


@dataclasses.dataclass(frozen=True)
class Wrapper(Press):
  """A press around `press`: scores and budgets are the inner press's unless overridden."""

  press: Press = None

  def __post_init__(self):
    if not isinstance(self.press, Press):
      raise ValueError(f"{self.name} wraps a press, e.g. {self.name}(snapkv); got {self.press!r}")

  @property
  def needs_wo(self) -> bool:  # a wrapper needs what its press needs
    return self.press.needs_wo

  @property
  def rerotates(self) -> bool:  # ... and re-rotates, sizes and extends the prompt as it does
    return self.press.rerotates

  @property
  def takes_budget(self) -> bool:
    return self.press.takes_budget

  @property
  def budget_free(self) -> bool:
    return self.press.budget_free

  def extend(self, rows, tokenizer):
    return self.press.extend(rows, tokenizer)

  def own_scores(self, model, rows, prefilled):
    if type(self).score is not Wrapper.score:  # this wrapper rescores inside the prefill
      def refuse():
        raise SpecError(f"{self.name} rescores {self.press}'s scores inside the prefill, but "
                        f"{self.press} scores these rows by model passes of its own "
                        "(Press.own_scores); use a wrapper that only selects (adakv, pyramidkv)")
      return self.press.own_scores(model, rows, refuse)
    return self.press.own_scores(model, rows, prefilled)

  def score(self, x: LayerInputs, n_kept):
    return self.press.score(x, n_kept)

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    return self.press.layer_kept(n_kept, tokens, layer, n_layers, ratio)


@register_press
@dataclasses.dataclass(frozen=True)
class AdaKVPress(Wrapper):
  """Heads of a layer share its budget (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by
  Adaptive Budget Allocation"): each head keeps its `alpha_safeguard` share of n_kept best, then
  one top-k over every (head, token) pair of the layer fills K x n_kept. The cache is a pool shared
  by the kv heads, so a head that needs more tokens gets them."""

  name: ClassVar[str] = "adakv"
  example: ClassVar[str | None] = "adakv(snapkv)"
  doc: ClassVar[str] = "a layer's heads compete for one budget (Feng et al. 2024)"
  shared_heads: ClassVar[bool] = True
  alpha_safeguard: float = 0.2

  def select(self, x: LayerInputs, scores, n_kept):
    b, kh, t = scores.shape
    valid = x.valid[:, None, :]
    n_safe = jnp.maximum(1, jnp.floor(n_kept * self.alpha_safeguard + 1e-6)).astype(jnp.int32)
    safe = self.press.select(x, scores, n_safe)  # each head's own best
    ranked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    ranked = jnp.where(safe, jnp.finfo(jnp.float32).max, ranked).reshape(b, kh * t)
    order = jnp.argsort(-ranked, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).reshape(b, kh, t)
    return (rank < (kh * n_kept)[:, None, None]) & valid


def _topk_budgets(scores, budgets, valid):
  """bool [B, K, T]: per (row, kv head) the budgets[b, h] highest scores among the valid positions
  (ties to the lower position). scores [B, K, T]; budgets int [B, K]; valid bool [B, T]."""
  ranked = jnp.where(valid[:, None, :], scores.astype(jnp.float32), -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-ranked, axis=-1, stable=True), axis=-1)
  return (rank < budgets[:, :, None]) & valid[:, None, :]


_NORM_BLOCK = 256  # tokens per block of value_output_norms


def value_output_norms(x: LayerInputs):
  """float32 [B, K, T]: ||v_t W_o^n||_1, how far value t of a kv head moves the layer's output
  through query head n's slice of the output projection, averaged over the kv head's query heads
  (CriticalKV's ||V W_o||; needs x.wo [N * H, D])."""
  if x.wo is None:
    raise ValueError("value_output_norms needs the layer's output projection: the press must set "
                     "needs_wo = True")
  wo = x.wo.astype(jnp.float32).reshape(x.kv_heads, x.groups, x.head_dim, -1)  # [K, G, H, D]
  v = x.v.astype(jnp.float32)
  b, k, t, h = v.shape
  block = min(_NORM_BLOCK, t)
  pad = -t % block
  blocks = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, k, -1, block, h)

  def norms(vb):  # [B, K, block, H] -> [B, K, block]
    moved = jnp.einsum("bkth,kghd->bkgtd", vb, wo)
    return jnp.mean(jnp.sum(jnp.abs(moved), axis=-1), axis=2)

  # Block by block: the projected values [B, K, G, T, D] at once took 4.8 GiB of temporaries for
  # 7 SmolLM2 rows of 1024 tokens (0.6 GiB this way) and ran out of memory at 4096.
  out = jax.lax.map(norms, jnp.moveaxis(blocks, 2, 0))  # [T / block, B, K, block]
  return jnp.moveaxis(out, 0, 2).reshape(b, k, -1)[..., :t]


@register_press
@dataclasses.dataclass(frozen=True)
class CriticalKVPress(Wrapper):
  """Two stages over the press's scores s (Feng et al. 2025, "Identify Critical KV Cache in LLM
  Inference from an Output Perturbation Perspective"): each head first keeps its
  max(1, floor(first_stage_ratio n_kept)) best by s; the rest of the budget goes to the best by
  (s + epsilon) ||v W_o||_1 (`value_output_norms`). Scores: the second-stage ones, with the
  first stage's raised to float32's max. kvpress computes the first stage's budget as
  int(first_stage_ratio (1 - ratio) n), which is the same number for its first_stage_ratio 0.5.
  Wrap a press that does not scale by ||v|| itself: expected_attention(use_vnorm=False)."""

  name: ClassVar[str] = "criticalkv"
  budget_free: ClassVar[bool] = False  # the first stage keeps a share of n_kept
  example: ClassVar[str | None] = "criticalkv(snapkv)"
  doc: ClassVar[str] = "scores rescaled by each value's effect on the output (Feng et al. 2025)"
  epsilon: float = 1e-4
  first_stage_ratio: float = 0.5

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.first_stage_ratio <= 1.0:
      raise ValueError(f"criticalkv: first_stage_ratio must be in [0, 1], got "
                       f"{self.first_stage_ratio!r}")

  @property
  def needs_wo(self) -> bool:
    return True

  def score(self, x: LayerInputs, n_kept):
    s = self.press.score(x, n_kept).astype(jnp.float32)
    n_first = jnp.floor(n_kept * self.first_stage_ratio + 1e-6).astype(jnp.int32)
    if self.first_stage_ratio > 0:
      n_first = jnp.maximum(n_first, 1)
    first = topk_per_head(s, n_first, x.valid)
    rescaled = (s + self.epsilon) * value_output_norms(x)
    return jnp.where(first, jnp.finfo(jnp.float32).max, rescaled)


@register_press
@dataclasses.dataclass(frozen=True)
class CriticalAdaKVPress(AdaKVPress):
  """AdaKV's head budgets with CriticalKV's two stages inside each head (Feng et al. 2025): the
  press's scores s give each kv head its budget b_h by AdaKV's pooled rule (its safeguard
  included); each head then keeps its safeguard tokens, its floor(first_stage_ratio b_h) best
  by s, and fills b_h with the best by (s + epsilon) ||v W_o||_1. As kvpress's CriticalAdaKVPress.
  The layer's heads share one pool in the cache, like adakv."""

  name: ClassVar[str] = "criticaladakv"
  example: ClassVar[str | None] = "criticaladakv(snapkv)"
  doc: ClassVar[str] = "AdaKV's head budgets, CriticalKV's rescaled scores (Feng et al. 2025)"
  epsilon: float = 1e-4
  first_stage_ratio: float = 0.5

  @property
  def needs_wo(self) -> bool:
    return True

  def select(self, x: LayerInputs, scores, n_kept):
    s = scores.astype(jnp.float32)
    budgets = jnp.sum(super().select(x, s, n_kept), axis=-1)  # [B, K] AdaKV's pooled split
    n_safe = jnp.maximum(1, jnp.floor(n_kept * self.alpha_safeguard + 1e-6)).astype(jnp.int32)
    top = jnp.finfo(jnp.float32).max
    safe = self.press.select(x, s, n_safe)
    n_first = jnp.floor(budgets * self.first_stage_ratio + 1e-6).astype(jnp.int32)
    first = _topk_budgets(jnp.where(safe, top, s), n_first, x.valid) | safe
    rescaled = jnp.where(first, top, (s + self.epsilon) * value_output_norms(x))
    return _topk_budgets(rescaled, budgets, x.valid)


@register_press
@dataclasses.dataclass(frozen=True)
class ChunkKVPress(Wrapper):
  """Keeps whole chunks of `chunk_length` tokens, the same in every kv head (Liu et al. 2025,
  "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference").

  A chunk's score is the mean over its tokens of the press's scores summed over the kv heads (a
  row's last chunk may be shorter; it is scored over its own tokens). Of a row's C chunks the
  best max(1, int(C (1 - ratio))) are kept (kvpress's rule), or with budget=n the best
  max(1, n // chunk_length) (all C when n covers the row), so the kept count is whole chunks,
  not n_kept; the layer's budget (`layer_kept`) is those chunks' length, an upper bound (a kept
  short chunk counts in full).
  A row shorter than one chunk is left to the press's own selection. The press's own per-layer
  budgets (pyramidkv) are not used, as in kvpress.
  """

  name: ClassVar[str] = "chunkkv"
  example: ClassVar[str | None] = "chunkkv(snapkv)"
  doc: ClassVar[str] = "whole chunks of tokens, one selection per layer (Liu et al. 2025)"
  chunk_length: int = 20

  def __post_init__(self):
    super().__post_init__()
    if self.chunk_length < 1:
      raise ValueError(f"chunkkv: chunk_length must be >= 1, got {self.chunk_length!r}")

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    c = self.chunk_length
    if tokens < c:
      return self.press.layer_kept(n_kept, tokens, layer, n_layers, ratio)
    n_chunks = -(-tokens // c)
    if ratio is not None:
      kept_chunks = max(1, int(n_chunks * (1.0 - ratio)))
    elif n_kept >= tokens:
      kept_chunks = n_chunks
    else:
      kept_chunks = max(1, n_kept // c)
    return min(kept_chunks * c, tokens)

  def select(self, x: LayerInputs, scores, n_kept):
    b, _, t = scores.shape
    c = self.chunk_length
    n_chunks = -(-t // c)
    summed = jnp.sum(jnp.where(x.valid[:, None, :], scores.astype(jnp.float32), 0.0), axis=1)
    summed = jnp.pad(summed, ((0, 0), (0, n_chunks * c - t))).reshape(b, n_chunks, c)
    size = jnp.clip(x.n_valid[:, None] - c * jnp.arange(n_chunks)[None, :], 0, c)  # [B, C]
    chunk_scores = jnp.sum(summed, axis=-1) / jnp.maximum(size, 1)
    kept_chunks = -(-n_kept // c)  # layer_kept gave whole chunks' length
    chosen = topk_per_head(chunk_scores[:, None, :], kept_chunks, size > 0)[:, 0]  # [B, C]
    keep = jnp.repeat(chosen, c, axis=-1)[:, :t] & x.valid  # [B, T]
    keep = jnp.broadcast_to(keep[:, None, :], scores.shape)
    short = (x.n_valid < c)[:, None, None]  # no whole chunk: the press's own selection
    return jnp.where(short, self.press.select(x, scores, n_kept), keep)


def restrict(x: LayerInputs, mask) -> tuple[LayerInputs, jax.Array]:
  """(sub, order): the layer as if each (row, kv head) held only its `mask`ed tokens.

  mask: bool [B, K, T], valid positions only, the same count in every kv head of a row.
  order: int32 [B, K, T], per (row, kv head) a permutation of the positions, the masked ones first
  in position order: token i of `sub` in kv head h is position order[b, h, i]. sub.n_valid is the
  count per row; each query head reads the queries at its kv head's positions. Positions inside
  `sub` are indices into it (RoPE stays that of the true positions), so a press scores the subset
  as if it were the whole prompt, as kvpress's BlockPress and ComposedPress hand it.
  """
  t = mask.shape[-1]
  pos = jnp.arange(t, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(mask, pos, pos + t), axis=-1).astype(jnp.int32)
  count = jnp.max(jnp.sum(mask, axis=-1), axis=-1).astype(jnp.int32)  # [B]
  take = lambda a: jnp.take_along_axis(a, order[..., None], axis=2)
  q_order = jnp.repeat(order, x.groups, axis=1).swapaxes(1, 2)[..., None]  # [B, T, N, 1]
  take_q = lambda a: jnp.take_along_axis(a, q_order, axis=1)
  sub = x.replace(q=take_q(x.q), q_raw=take_q(x.q_raw), k=take(x.k), k_raw=take(x.k_raw),
                  v=take(x.v), n_valid=count)
  return sub, order


def unrestrict(values, order):
  """values [B, K, T] of `restrict`'s sub-layer, back at the original positions."""
  return jnp.take_along_axis(values, jnp.argsort(order, axis=-1), axis=-1)


@register_press
@dataclasses.dataclass(frozen=True)
class BlockPress(Wrapper):
  """Compresses the prompt block by block, as a chunked prefill would (the KeyDiff paper's
  block-wise eviction, Park et al. 2025, arXiv:2504.15364; kvpress's BlockPress).

  The first n_kept tokens are kept; then for each block of `block_size` later tokens, the press
  scores the survivors and the block as if they were the whole prompt (`restrict`) and each kv
  head keeps its n_kept best of them. Everything is computed in one prefill (attention is not
  chunked). Scores are the press's over the whole prompt; the selection is not their top-k.
  kvpress hands the press the survivors in top-k order, kvjax in position order (the same for
  presses that do not read positions, like keydiff or knorm).
  """

  name: ClassVar[str] = "block"
  example: ClassVar[str | None] = "block(keydiff)"
  doc: ClassVar[str] = "block-wise rescoring of survivors + the next block (KeyDiff, Park 2025)"
  block_size: int = 128

  def __post_init__(self):
    super().__post_init__()
    if self.block_size < 1:
      raise ValueError(f"block: block_size must be >= 1, got {self.block_size!r}")

  def select(self, x: LayerInputs, scores, n_kept):
    shape = (x.batch, x.kv_heads, x.tokens)
    pos = jnp.arange(x.tokens, dtype=jnp.int32)[None, :]
    valid = x.valid[:, None, :]
    first = jnp.broadcast_to((pos < n_kept[:, None])[:, None, :], shape) & valid
    n_blocks = jnp.max(jnp.maximum(x.n_valid - n_kept, 0) + self.block_size - 1) // self.block_size

    def step(i, kept):
      start = n_kept + i * self.block_size  # [B]
      block = (pos >= start[:, None]) & (pos < start[:, None] + self.block_size)  # [B, T]
      sub, order = restrict(x, (kept | block[:, None, :]) & valid)
      chosen = self.press.select(sub, self.press.score(sub, n_kept).astype(jnp.float32), n_kept)
      return unrestrict(chosen & sub.valid[:, None, :], order)

    return jax.lax.fori_loop(0, n_blocks, step, first)


@register_press
@dataclasses.dataclass(frozen=True)
class PerLayerCompressionPress(Wrapper):
  """The press with its own compression ratio in each layer (kvpress's PerLayerCompressionPress):
  layer l of a row of n tokens keeps max(1, floor(n (1 - compression_ratios[l]))), through the
  press's own `layer_kept`. The call's ratio must be the mean of the ratios (what kvpress reports
  as the press's compression_ratio), so a ratio never silently goes unused; budget= is refused.
  Spec: "per_layer(snapkv, compression_ratios=(0.2, 0.5, ...))", one ratio per layer."""

  name: ClassVar[str] = "per_layer"
  example: ClassVar[str | None] = None
  doc: ClassVar[str] = "a compression ratio per layer (kvpress's PerLayerCompressionPress)"
  compression_ratios: tuple = ()

  def __post_init__(self):
    super().__post_init__()
    ratios = tuple(float(r) for r in self.compression_ratios)
    if not ratios or not all(0.0 <= r < 1.0 for r in ratios):
      raise ValueError("per_layer: compression_ratios must be one ratio in [0, 1) per layer, got "
                       f"{self.compression_ratios!r}")
    object.__setattr__(self, "compression_ratios", ratios)

  @property
  def mean_ratio(self) -> float:
    return sum(self.compression_ratios) / len(self.compression_ratios)

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    ratios = self.compression_ratios
    if len(ratios) != n_layers:
      raise SpecError(f"per_layer: {len(ratios)} compression_ratios for a model of {n_layers} "
                      "layers; give one per layer")
    if ratio is None or not math.isclose(ratio, self.mean_ratio, abs_tol=1e-6):
      raise SpecError(f"per_layer: its compression_ratios average {self.mean_ratio!r}; call with "
                      f"ratio={self.mean_ratio!r} (got ratio={ratio!r})")
    r = ratios[layer]
    kept = max(1, math.floor(tokens * (1.0 - r) + 1e-9))  # compress.row_budgets' rule
    return self.press.layer_kept(kept, tokens, layer, n_layers, r)


def stage_budgets(n_valid, n_kept, n_stages: int) -> list:
  """int32 [B] budgets of a chain of n_stages presses over rows of n_valid tokens that must end at
  n_kept: stage i of m keeps round(n (k / n)^(i / m)) (k = min(n_kept, n)), so every stage drops
  the same share of what reaches it; the last keeps exactly n_kept."""
  n = n_valid.astype(jnp.float32)
  k = jnp.minimum(n_kept, n_valid)
  budgets = []
  for i in range(1, n_stages):
    share = (k.astype(jnp.float32) / n) ** (i / n_stages)
    budgets.append(jnp.clip(jnp.round(n * share).astype(jnp.int32), k, n_valid))
  return budgets + [n_kept]


@register_press
@dataclasses.dataclass(frozen=True)
class ComposedPress(Press):
  """Presses applied one after another (kvpress's ComposedPress): each chooses among the tokens
  the one before kept, scoring them as if they were the whole prompt (`restrict`).

  Budget rule: the call's budget n_kept is the chain's; with m presses over a row of n tokens,
  press i keeps round(n (n_kept / n)^(i / m)) of what reaches it (`stage_budgets`), so each drops
  the same share and the last keeps n_kept (kvpress gives every press its own ratio and ends at
  their product; with ratio=r each press here keeps a share (1 - r)^(1/m)). Layer budgets are the
  presses' `layer_kept` applied in order. Scores are the last press's, with the tokens an earlier
  press dropped put below every survivor. Presses that pool a layer's heads (adakv) are refused,
  as in kvpress. Spec: "composed(knorm, snapkv)".
  """

  name: ClassVar[str] = "composed"
  example: ClassVar[str | None] = "composed(knorm, snapkv)"
  doc: ClassVar[str] = "presses in sequence, each among the previous one's survivors"
  presses: tuple = ()

  def __init__(self, *stages, presses=()):
    stages = tuple(stages) + tuple(presses)
    if len(stages) < 2 or not all(isinstance(p, Press) for p in stages):
      raise ValueError(f"composed chains two presses or more, e.g. composed(knorm, snapkv); got "
                       f"{stages!r}")
    pooled = [str(p) for p in stages if getattr(p, "shared_heads", False)]
    if pooled:
      raise ValueError(f"composed: {', '.join(pooled)} pools a layer's heads and cannot be "
                       "chained (kvpress refuses AdaKV in ComposedPress too)")
    object.__setattr__(self, "presses", stages)

  @property
  def needs_wo(self) -> bool:
    return any(p.needs_wo for p in self.presses)

  def resolve(self, compat):
    super().resolve(compat)  # checks compat
    return ComposedPress(*(p.resolve(compat) for p in self.presses))

  def __str__(self) -> str:
    return f"{self.name}({', '.join(str(p) for p in self.presses)})"

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    for p in self.presses:
      n_kept = p.layer_kept(n_kept, tokens, layer, n_layers, ratio)
    return n_kept

  def chain(self, x: LayerInputs, n_kept):
    """(scores, kept, reached) [B, K, T] at the prompt's positions: the last press's scores and
    selection, and the tokens that reached it."""
    sub, order = x, None
    reached = jnp.broadcast_to(x.valid[:, None, :], (x.batch, x.kv_heads, x.tokens))
    budgets = stage_budgets(x.n_valid, n_kept, len(self.presses))
    for i, (press, budget) in enumerate(zip(self.presses, budgets)):
      scores = press.score(sub, budget).astype(jnp.float32)
      kept = press.select(sub, scores, budget) & sub.valid[:, None, :]
      if order is not None:
        scores, kept = unrestrict(scores, order), unrestrict(kept, order)
      if i < len(self.presses) - 1:
        sub, order = restrict(x, kept)
        reached = kept
    return scores, kept, reached

  def score(self, x: LayerInputs, n_kept):
    scores, _, reached = self.chain(x, n_kept)
    floor = jnp.min(jnp.where(reached, scores, jnp.inf), axis=-1, keepdims=True)
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0)
    below = jnp.maximum(floor - jnp.maximum(1.0, 0.5 * jnp.abs(floor)), -jnp.finfo(jnp.float32).max)
    return jnp.where(reached, scores, below)

  def select(self, x: LayerInputs, scores, n_kept):
    return self.chain(x, n_kept)[1]  # the same computation as score's (XLA merges the two)


@register_press
@dataclasses.dataclass(frozen=True)
class PyramidPress(Wrapper):
  """Any press with PyramidKV's budgets (Cai et al. 2024): the first layers keep more, the last
  fewer, the same total (`attention.pyramid_budget`; `window_size` is the part of each row the
  budget taper leaves out, 0 for presses without a window). pyramid(snapkv(window_size=w),
  window_size=w) is pyramidkv."""

  name: ClassVar[str] = "pyramid"
  example: ClassVar[str | None] = "pyramid(knorm)"
  doc: ClassVar[str] = "the inner press with PyramidKV's depth-tapered budgets (Cai et al. 2024)"
  window_size: int = 0
  beta: float = 20

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    from kvjax.presses.attention import pyramid_budget

    return pyramid_budget(n_kept, tokens, layer, n_layers, ratio, window=self.window_size,
                          beta=self.beta)
