"""More of kvpress 0.5.5's presses that need no trained artifact: chunk, entropy_gated_chunkkv,
non_causal_attn, compactor, cap, merging.

  chunk                  the press on fixed-size chunks of the prompt, each keeping its share
  entropy_gated_chunkkv  ChunkKV whose spiky chunks (low score entropy) keep only a few tokens
  non_causal_attn        attention within fixed chunks, every query of a chunk seeing all its keys
  compactor              leverage of the keys blended with non_causal_attn, sinks kept
  cap                    query-weighted leverage of the values (capacity), sinks kept
  merging                the press's selection, each dropped value folded into its nearest survivor

Every statistic is taken over a row's real tokens, so a ragged row scores as it would alone.
kvpress computes some of them over the whole batch (it runs one prompt at a time); each class
says where kvjax's per-row rule and kvpress's differ.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.presses.attention import ExpectedAttentionPress, pool
from kvjax.presses.base import LayerInputs, Press, register_press, row_zscore, topk_per_head
from kvjax.presses.keys import LeverageScorePress, cholesky, forward_substitute
from kvjax.presses.wrappers import ChunkKVPress, Wrapper, restrict, unrestrict


# ---- chunk ---------------------------------------------------------------------------------------
def chunk_lengths(n_valid, chunk: int, n_chunks: int, xp=jnp):
  """int [B, M]: the real tokens of each of the M chunks of `chunk` positions of each row."""
  starts = chunk * xp.arange(n_chunks)[None, :]
  return xp.clip(xp.asarray(n_valid)[:, None] - starts, 0, chunk)


def chunk_budgets(n_valid, total, chunk: int, n_chunks: int, xp=jnp):
  """int [B, M]: ChunkPress's per-chunk budgets of rows of n_valid tokens keeping at most `total`.

  kvpress keeps max(1, int(L (1 - r))) of a chunk of L tokens. Written k_L(p) = max(1, floor(L p))
  with p = 1 - r, the chunks' budgets are one point of a family: two rates p giving the same total
  give the same budgets (each k_L is non-decreasing in p). So the budgets are found from the total
  alone: those of the largest total <= `total` over the rates where some k_L steps (p = j / L for
  the row's two chunk lengths), which are kvpress's own when `total` is the sum of kvpress's.
  Below one token per chunk, every chunk still keeps one (kvpress's floor of 1).
  """
  lengths = chunk_lengths(n_valid, chunk, n_chunks, xp)  # [B, M]
  n = xp.asarray(n_valid)
  last = n - chunk * xp.maximum((n + chunk - 1) // chunk - 1, 0)  # [B] the last chunk's length
  j = xp.arange(chunk + 1)
  num = xp.concatenate([xp.broadcast_to(j, (n.shape[0], chunk + 1))] * 2, axis=1)  # [B, P]
  den = xp.concatenate([xp.full((n.shape[0], chunk + 1), chunk),
                        xp.broadcast_to(xp.maximum(last, 1)[:, None], (n.shape[0], chunk + 1))],
                       axis=1)
  k = (lengths[:, None, :] * num[:, :, None]) // den[:, :, None]  # [B, P, M]
  k = xp.where(lengths[:, None, :] > 0, xp.clip(k, 1, lengths[:, None, :]), 0)
  sums = xp.sum(k, axis=-1)  # [B, P]
  fits = sums <= xp.asarray(total)[:, None]
  best = xp.argmax(xp.where(fits, sums, -1), axis=-1)  # none fits: p = 0, one per chunk
  return xp.take_along_axis(k, best[:, None, None], axis=1)[:, 0]


@register_press
@dataclasses.dataclass(frozen=True)
class ChunkPress(Wrapper):
  """The press applied to each chunk of `chunk_length` tokens on its own, each chunk keeping its
  share of the budget (kvpress's ChunkPress, after FINCH, Corallo & Papotti 2024, "FINCH:
  Prompt-guided Key-Value Cache Compression for Large Language Models").

  Chunk i is positions [i c, (i + 1) c) of the row; the press scores it as if it were the whole
  prompt (its n_valid is the chunk's tokens; RoPE stays that of the true positions) and each kv
  head keeps its top-k_i. With ratio r, chunk of L tokens keeps max(1, int(L (1 - r))) (kvpress's
  rule; `layer_kept` is their sum); with budget=n the chunks keep the largest such split whose
  total is at most n (`chunk_budgets`), one token per chunk at least. The press's own per-layer
  budgets and selection rule are not used (kvpress calls its scorer only); presses that pool heads,
  size layers or extend the prompt are refused. Differs from kvpress: kvpress rebuilds a window
  press's queries from the chunk's hidden states but rotates them at the prompt's last positions;
  kvjax uses the chunk's own rotated queries.
  """

  name: ClassVar[str] = "chunk"
  example: ClassVar[str | None] = "chunk(snapkv, chunk_length=16)"
  doc: ClassVar[str] = "the press on each chunk alone, each keeping its share (FINCH, Corallo 2024)"
  chunk_length: int = 1024

  def __post_init__(self):
    super().__post_init__()
    if self.chunk_length < 1:
      raise ValueError(f"chunk: chunk_length must be >= 1, got {self.chunk_length!r}")
    p = self.press
    if getattr(p, "shared_heads", False) or p.rerotates or not p.takes_budget \
        or p.keeps_every_token or p.extend([[3, 4, 5]], None)[0] != [[3, 4, 5]]:
      raise ValueError(f"chunk: {p} is not a plain scorer (kvpress's ChunkPress takes a "
                       "ScorerPress); wrap e.g. snapkv, knorm or expected_attention")

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    c = self.chunk_length
    m = -(-tokens // c)
    if ratio is not None:
      lengths = [min(c, tokens - i * c) for i in range(m)]
      return int(sum(max(1, int(length * (1.0 - ratio))) for length in lengths))
    budgets = chunk_budgets(np.array([tokens]), np.array([n_kept]), c, m, xp=np)
    return int(budgets.sum())

  def _chunks(self, x: LayerInputs):
    """(sub-layers stacked over chunks [M, ...], lengths [B, M], M)."""
    c = self.chunk_length
    m = -(-x.tokens // c)
    pad = m * c - x.tokens
    on = lambda a, axis: jnp.pad(a, [(0, pad) if i == axis else (0, 0) for i in range(a.ndim)])
    padded = x.replace(q=on(x.q, 1), q_raw=on(x.q_raw, 1), k=on(x.k, 2), k_raw=on(x.k_raw, 2),
                       v=on(x.v, 2))
    return padded, chunk_lengths(x.n_valid, c, m), m

  def score(self, x: LayerInputs, n_kept):
    c = self.chunk_length
    padded, lengths, m = self._chunks(x)
    budgets = chunk_budgets(x.n_valid, n_kept, c, m)  # [B, M]

    def one(i):
      cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=axis)
      sub = padded.replace(q=cut(padded.q, 1), q_raw=cut(padded.q_raw, 1), k=cut(padded.k, 2),
                           k_raw=cut(padded.k_raw, 2), v=cut(padded.v, 2), n_valid=lengths[:, i])
      s = self.press.score(sub, budgets[:, i]).astype(jnp.float32)  # [B, K, c]
      return jnp.where(sub.valid[:, None, :], s, 0.0)

    s = jax.lax.map(one, jnp.arange(m))  # [M, B, K, c]
    s = jnp.moveaxis(s, 0, 2).reshape(x.batch, x.kv_heads, m * c)[:, :, :x.tokens]
    return jnp.where(x.valid[:, None, :], s, 0.0)

  def select(self, x: LayerInputs, scores, n_kept):
    c = self.chunk_length
    m = -(-x.tokens // c)
    budgets = chunk_budgets(x.n_valid, n_kept, c, m)  # [B, M]
    pad = m * c - x.tokens
    valid = jnp.pad(x.valid, ((0, 0), (0, pad))).reshape(x.batch, 1, m, c)
    s = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
    s = jnp.where(valid, s.reshape(x.batch, x.kv_heads, m, c), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1)  # within each chunk
    keep = (rank < budgets[:, None, :, None]) & valid
    return keep.reshape(x.batch, x.kv_heads, m * c)[:, :, :x.tokens]


# ---- entropy_gated_chunkkv -----------------------------------------------------------------------
_EPS = 1e-8


@register_press
@dataclasses.dataclass(frozen=True)
class EntropyGatedChunkKVPress(ChunkKVPress):
  """ChunkKV whose important but spiky chunks keep only their best tokens (kvpress's
  EntropyGatedChunkKVPress, after Liu et al. 2025, "ChunkKV").

  Per row, token scores s are the press's summed over kv heads. A chunk of L tokens (the last may
  be shorter) scores mean(s), and has entropy H(p) / log L of p = s' / (sum s' + 1e-8), s' = s
  shifted so its minimum is >= 0 (a one-token chunk: 0), clipped to [0, 1]. Going through the
  chunks by decreasing score while budget n_kept remains, each keeps min(L, what remains) of its
  best tokens, at most `low_entropy_chunk_length` when its score is >= the chunks' median and its
  entropy < theirs (medians as torch's: the lower middle value). What remains after the last
  chunk goes to the best tokens not yet kept, so exactly n_kept are kept, the same in every kv
  head. Differs from kvpress: kvpress selects from batch row 0 for every row; kvjax per row.
  """

  name: ClassVar[str] = "entropy_gated_chunkkv"
  example: ClassVar[str | None] = "entropy_gated_chunkkv(snapkv)"
  doc: ClassVar[str] = "ChunkKV whose spiky chunks keep only their best tokens (Liu et al. 2025)"
  chunk_length: int = 10
  low_entropy_chunk_length: int = 4

  def __post_init__(self):
    super().__post_init__()
    if not self.chunk_length > self.low_entropy_chunk_length >= 1:
      raise ValueError("entropy_gated_chunkkv: needs chunk_length > low_entropy_chunk_length >= 1, "
                       f"got {self.chunk_length!r} and {self.low_entropy_chunk_length!r}")

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    return n_kept

  def select(self, x: LayerInputs, scores, n_kept):
    keep = jax.vmap(self._row, in_axes=(0, 0, 0))(
        jnp.sum(jnp.where(x.valid[:, None, :], scores.astype(jnp.float32), 0.0), axis=1),
        x.n_valid, jnp.asarray(n_kept, jnp.int32))  # [B, T]
    return jnp.broadcast_to(keep[:, None, :], scores.shape)

  def _row(self, s, n, budget):
    """bool [T]: the kept tokens of one row of head-summed scores s [T] with n real tokens."""
    c, t = self.chunk_length, s.shape[0]
    m = -(-t // c)
    pos = jnp.arange(m * c)
    real = pos < n
    sc = jnp.where(real, jnp.pad(s, (0, m * c - t)), 0.0).reshape(m, c)
    real_c = real.reshape(m, c)
    length = jnp.sum(real_c, axis=-1)  # [M]
    live = length > 0
    mean = jnp.sum(sc, axis=-1) / jnp.maximum(length, 1)
    low = jnp.minimum(jnp.min(jnp.where(real_c, sc, jnp.inf), axis=-1, keepdims=True), 0.0)
    shifted = jnp.where(real_c, sc - low, 0.0)
    p = shifted / (jnp.sum(shifted, axis=-1, keepdims=True) + _EPS)
    h = -jnp.sum(jnp.where(real_c, p * jnp.log(p + _EPS), 0.0), axis=-1)
    entropy = jnp.where(length > 1, jnp.clip(h / jnp.log(jnp.maximum(length, 2)), 0.0, 1.0), 0.0)
    n_live = jnp.sum(live)
    median = lambda v: jnp.sort(jnp.where(live, v, jnp.inf))[(n_live - 1) // 2]
    spiky = (mean >= median(mean)) & (entropy < median(entropy))
    order = jnp.argsort(jnp.where(live, -mean, jnp.inf), stable=True)  # best chunk first
    room = jnp.where(spiky, jnp.minimum(length, self.low_entropy_chunk_length), length)[order]
    before = jnp.cumsum(room) - room
    taken = jnp.zeros(m, jnp.int32).at[order].set(
        jnp.clip(budget - before, 0, room).astype(jnp.int32))  # [M] tokens kept per chunk
    ranked = jnp.where(real_c, sc, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-ranked, axis=-1, stable=True), axis=-1)
    keep = ((rank < taken[:, None]) & real_c).reshape(m * c)
    rest = jnp.maximum(budget - jnp.sum(taken), 0)  # top up with the best tokens left
    left = jnp.where(real & ~keep, jnp.pad(s, (0, m * c - t)), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-left, stable=True))
    keep = keep | ((rank < rest) & real & ~keep)
    return keep[:t]


# ---- non_causal_attn ----------------------------------------------------------------------------
def non_causal_column_sums(x: LayerInputs, chunk: int):
  """float32 [B, N, T]: per query head, the attention each key gets from the queries of its chunk
  of `chunk` positions, every query seeing every key of the chunk (logits q.k, not scaled, as
  kvpress's NonCausalAttnPress), summed over the chunk's queries.

  As kvpress, a row is zero-padded to a multiple of `chunk`: in its last chunk the padding slots
  are keys of logit 0 for every query, and queries whose logits are all 0 (each adds 1/chunk to
  every key of the chunk). Slots past that (batch padding) take no part.
  """
  m = -(-x.tokens // chunk)
  pad = m * chunk - x.tokens
  b, n, h, kh, g = x.batch, x.heads, x.head_dim, x.kv_heads, x.groups
  q = jnp.pad(x.q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))  # [B, T', N, H]
  q = q.reshape(b, m, chunk, kh, g, h)  # query head n = k G + g reads kv head k
  k = jnp.pad(x.k.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))  # [B, K, T', H]
  k = k.reshape(b, kh, m, chunk, h)
  logits = jnp.einsum("bmqkgh,bkmch->bkgmqc", q, k).reshape(b, n, m, chunk, chunk)  # [B,N,M,c,c]
  pos = jnp.arange(m * chunk).reshape(1, m, chunk)
  real = pos < x.n_valid[:, None, None]  # [B, M, c]
  padded_to = -(-x.n_valid // chunk) * chunk
  slot = pos < padded_to[:, None, None]  # kvpress's padded row
  both = real[:, None, :, :, None] & real[:, None, :, None, :]
  logits = jnp.where(both, logits, 0.0)
  logits = jnp.where(slot[:, None, :, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(slot[:, None, :, :, None], probs, 0.0)  # no NaN rows past the padded row
  return jnp.sum(probs, axis=-2).reshape(b, n, m * chunk)[:, :, :x.tokens]


@register_press
@dataclasses.dataclass(frozen=True)
class NonCausalAttnPress(Press):
  """Keeps the tokens their own chunk's queries attend to most, without the causal mask (Chari &
  Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
  Leverage Scores"; kvpress's NonCausalAttnPress).

  The attention each key gets from the queries of its chunk of `chunk_size` positions
  (`non_causal_column_sums`, kvpress's padding of the last chunk included), averaged over the kv
  head's query heads, times ||v||, averaged over 3 neighbours (zero padded, divided by 3), then
  z-scored. Differs from kvpress: the z-score is over each row's kv heads and tokens (kvpress's
  is over the whole batch, one prompt in its pipeline).
  """

  name: ClassVar[str] = "non_causal_attn"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "non-causal attention within chunks, z-scored (Compactor, Chari 2025)"
  chunk_size: int = 256

  def __post_init__(self):
    if self.chunk_size < 1:
      raise ValueError(f"non_causal_attn: chunk_size must be >= 1, got {self.chunk_size!r}")

  def score(self, x: LayerInputs, n_kept):
    valid = x.valid[:, None, :]
    a = x.group_mean(non_causal_column_sums(x, self.chunk_size))  # [B, K, T]
    s = jnp.where(valid, a * jnp.linalg.norm(x.v.astype(jnp.float32), axis=-1), 0.0)
    return row_zscore(pool(s, 3, "avg"), jnp.broadcast_to(valid, s.shape))


# ---- compactor -----------------------------------------------------------------------------------
@register_press
@dataclasses.dataclass(frozen=True)
class CompactorPress(Press):
  """Leverage of the keys blended with non-causal attention, sinks kept (Chari & Van Durme 2025,
  "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores";
  kvpress's CompactorPress).

  The first `sink_size_start` and last `sink_size_end` tokens of a row are kept (scored above the
  rest); the tokens between are scored as if they were the whole prompt (`restrict`) by
  blending x leverage(sketch_dimension) + non_causal_attn(chunk_size), both z-scored. `blending`
  None is kvpress's default, the compression ratio: here 1 - n_kept / n per row (the ratio, up to
  compress's floor). Differs from kvpress: the leverage sketch is seeded (`seed`, kvjax's
  `leverage`), kvpress draws it from torch.randn; z-scores are per row; sinks score max + 1
  (kvpress: max). A row with no token between its sinks keeps its first tokens.
  """

  name: ClassVar[str] = "compactor"
  example: ClassVar[str | None] = "compactor(sketch_dimension=4)"  # short prompts: a small sketch
  doc: ClassVar[str] = "key leverage + non-causal attention, sinks kept (Chari & Van Durme 2025)"
  sink_size_start: int = 8
  sink_size_end: int = 4
  chunk_size: int = 256
  sketch_dimension: int = 48
  blending: float | None = None
  seed: int = 0

  def __post_init__(self):
    if self.sink_size_start < 0 or self.sink_size_end < 0:
      raise ValueError("compactor: sink sizes must be >= 0, got "
                       f"{self.sink_size_start!r} and {self.sink_size_end!r}")
    LeverageScorePress(self.sketch_dimension, self.seed)  # checks sketch_dimension
    NonCausalAttnPress(self.chunk_size)  # checks chunk_size

  def score(self, x: LayerInputs, n_kept):
    pos = jnp.arange(x.tokens)[None, :]
    n = x.n_valid[:, None]
    left = jnp.minimum(self.sink_size_start, n)
    right = jnp.minimum(self.sink_size_end, jnp.maximum(n - left, 0))
    middle = (pos >= left) & (pos < n - right)  # [B, T]
    mask = jnp.broadcast_to(middle[:, None, :], (x.batch, x.kv_heads, x.tokens))
    sub, order = restrict(x, mask)
    lev = LeverageScorePress(self.sketch_dimension, self.seed).score(sub, n_kept)
    att = NonCausalAttnPress(self.chunk_size).score(sub, n_kept)
    if self.blending is None:
      blend = 1.0 - n_kept.astype(jnp.float32) / jnp.maximum(x.n_valid, 1)
      blend = blend[:, None, None]
    else:
      blend = self.blending
    s = unrestrict(jnp.where(sub.valid[:, None, :], blend * lev + att, 0.0), order)
    s = jnp.where(mask, s, 0.0)
    top = jnp.max(jnp.where(mask, s, -jnp.inf), axis=(1, 2), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0) + 1.0
    sinks = x.valid[:, None, :] & ~mask
    return jnp.where(sinks, top, s)



# ---- cap -----------------------------------------------------------------------------------------
def _unit(a):
  """a / max(||a||, 1e-12) along the last axis (torch's F.normalize)."""
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


@register_press
@dataclasses.dataclass(frozen=True)
class CapPress(Press):
  """Keeps the values that add most capacity for the queries to come (CAPKV, arXiv:2604.25975;
  kvpress's CapPress).

  Per query head, after the first `n_sink` tokens (always kept): the anchor mu is the mean of the
  row's pre-RoPE queries moved by the mean RoPE rotation of the `n_future_positions` after the row
  (expected_attention's); w_t = exp(tau (c_t - max c)) with c_t = cos(mu, k_t) (rotated keys);
  A = I + sum_t (w_t + epsilon) v_t v_t^T; score w_t v_t^T A^-1 v_t, averaged over the kv head's
  query heads. Options and defaults are kvpress's. Sinks score the row's max + 1 (kvpress: the
  batch's). A row of at most n_sink tokens keeps its first tokens (kvpress raises).
  """

  name: ClassVar[str] = "cap"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "query-weighted leverage of values, sinks kept (CAPKV, arXiv:2604.25975)"
  tau: float = 5.0
  n_future_positions: int = 512
  n_sink: int = 4
  epsilon: float = 1e-6

  def __post_init__(self):
    if self.n_future_positions < 1 or self.n_sink < 0:
      raise ValueError("cap: n_future_positions must be >= 1 and n_sink >= 0, got "
                       f"{self.n_future_positions} and {self.n_sink}")

  def score(self, x: LayerInputs, n_kept):
    pos = jnp.arange(x.tokens)[None, :]
    live = x.valid & (pos >= self.n_sink)  # [B, T] the tokens scored (and queries averaged)
    w_live = live.astype(jnp.float32)
    q = x.q_raw.astype(jnp.float32)  # [B, T, N, H]
    anchor = jnp.einsum("btnh,bt->bnh", q, w_live) / jnp.maximum(jnp.sum(w_live, 1), 1)[:, None,
                                                                                           None]
    rot = ExpectedAttentionPress(n_future_positions=self.n_future_positions).mean_rotation(x)
    if rot is not None:
      anchor = jnp.einsum("bji,bnj->bni", rot, anchor)  # R mu
    k = jnp.repeat(x.k.astype(jnp.float32), x.groups, axis=1)  # [B, N, T, H]
    v = jnp.repeat(x.v.astype(jnp.float32), x.groups, axis=1)
    cos = jnp.clip(jnp.einsum("bnh,bnth->bnt", _unit(anchor), _unit(k)), -1.0, 1.0)
    logits = jnp.where(live[:, None, :], self.tau * cos, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    w = jnp.where(live[:, None, :], jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    vw = v * jnp.sqrt(jnp.where(live[:, None, :], w + self.epsilon, 0.0))[..., None]
    capacity = jnp.eye(x.head_dim, dtype=jnp.float32) + jnp.einsum("bnti,bntj->bnij", vw, vw)
    # v^T C^-1 v = |L^-1 v|^2 (C = L L^T, symmetric positive definite; plain jnp, keys.cholesky)
    lev = jnp.sum(forward_substitute(cholesky(capacity), v) ** 2, axis=-1)  # [B, N, T]
    s = jnp.where(live[:, None, :], x.group_mean(w * lev), 0.0)
    best = jnp.max(s, axis=(1, 2), keepdims=True) + 1.0  # scores are >= 0
    return jnp.where((x.valid & ~live)[:, None, :], best, s)


# ---- merging -------------------------------------------------------------------------------------
_MERGE_EPS = 1e-6


def _torch_quantile(values, valid, q: float):
  """[..., 1]: torch.quantile(values, q) along the last axis over the `valid` entries only
  (linear interpolation, and torch's lerp, so -inf neighbours give -inf or NaN as in torch)."""
  count = jnp.sum(valid, axis=-1, keepdims=True)
  ranked = jnp.sort(jnp.where(valid, values, jnp.inf), axis=-1)  # the valid ones first
  at = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
  lo_i = jnp.floor(at).astype(jnp.int32)
  hi_i = jnp.minimum(lo_i + 1, jnp.maximum(count - 1, 0))
  lo = jnp.take_along_axis(ranked, lo_i, axis=-1)
  hi = jnp.take_along_axis(ranked, hi_i, axis=-1)
  w = at - lo_i
  return jnp.where(w < 0.5, lo + w * (hi - lo), hi - (hi - lo) * (1.0 - w))


@register_press
@dataclasses.dataclass(frozen=True)
class MergingPress(Wrapper):
  """The press's selection, each dropped token's value folded into its most similar survivor
  (kvpress's MergingPress, after Token Merging, Bolya et al. 2023, and D2O, Wan et al. 2024).

  Per (row, kv head), a dropped token d goes to the kept token s of highest key cosine similarity
  c (rotated keys) when c >= `similarity_threshold` and, with `merge_fraction` < 1, c is at least
  the (1 - merge_fraction) quantile of the dropped tokens' c (those below the threshold counted as
  -inf, as kvpress, whose torch.quantile then may give NaN: no merge). Its weight is
  max(c, 0) ||v_d|| / (||v_d|| + ||v_s|| + 1e-6); a survivor with weights w_i becomes
  (v_s + sum w_i v_i) / (1 + sum w_i) (`merge_values`). Keys are unchanged; the stored values
  change, not the prefill's (as in kvpress, which merges after attention). Selection is the
  press's scores' top-k per head (kvpress's ScorerPress rule). Ties in similarity go to the lower
  position (kvpress: to the survivor ranked first by score).
  """

  name: ClassVar[str] = "merging"
  example: ClassVar[str | None] = "merging(knorm)"
  doc: ClassVar[str] = "dropped values folded into their nearest kept token (ToMe/D2O style)"
  similarity_threshold: float = 0.0
  merge_fraction: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.similarity_threshold <= 1.0:
      raise ValueError(f"merging: similarity_threshold must be in [0, 1], got "
                       f"{self.similarity_threshold!r}")
    if not 0.0 < self.merge_fraction <= 1.0:
      raise ValueError(f"merging: merge_fraction must be in (0, 1], got {self.merge_fraction!r}")
    p = self.press
    if getattr(p, "shared_heads", False) or p.rerotates or p.keeps_every_token:
      raise ValueError(f"merging: {p} is not a plain scorer (kvpress's MergingPress takes a "
                       "ScorerPress)")

  def select(self, x: LayerInputs, scores, n_kept):
    return topk_per_head(scores, n_kept, x.context)

  def merge_values(self, x: LayerInputs, keep):
    keep = keep & x.context[:, None, :]
    dropped = x.context[:, None, :] & ~keep  # [B, K, T]
    k = x.k.astype(jnp.float32)
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), _MERGE_EPS)
    sim = jnp.einsum("bkdh,bksh->bkds", unit, unit)  # [B, K, T (dropped), T (survivor)]
    sim = jnp.where(keep[:, :, None, :], sim, -jnp.inf)
    target = jnp.argmax(sim, axis=-1)  # [B, K, T]
    best = jnp.max(sim, axis=-1)
    ok = dropped & (best >= self.similarity_threshold)
    if self.merge_fraction < 1.0:
      gated = jnp.where(ok, best, -jnp.inf)
      cut = _torch_quantile(gated, dropped, 1.0 - self.merge_fraction)
      ok = ok & (gated >= cut)
    v = x.v.astype(jnp.float32)
    norm = jnp.linalg.norm(v, axis=-1)  # [B, K, T]
    target_norm = jnp.take_along_axis(norm, target, axis=-1)
    w = jnp.where(ok, jnp.maximum(best, 0.0) * norm / (norm + target_norm + _MERGE_EPS), 0.0)
    fold = lambda t, a: jnp.zeros_like(a).at[t].add(a)  # scatter-add onto the survivors
    per_head = jax.vmap(jax.vmap(fold))
    added = per_head(target, w[..., None] * v)  # [B, K, T, H]
    weight = per_head(target, w)  # [B, K, T]
    merged = (v + added) / (1.0 + weight)[..., None]
    return jnp.where((keep & (weight > 0))[..., None], merged.astype(x.v.dtype), x.v)
