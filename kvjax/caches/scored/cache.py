"""The scored cache: keep the recent window plus the best-scored older tokens (H2O and kin).

`ScoredCache` (alias `H2OCache`) is the pytree; a `Scorer` (scorers.py) is the static strategy
that says where scores come from: H2O's accumulated attention (below), SnapKV's prompt
observation, or a kind's own (e.g. knorm's key norms). What follows describes H2O; other scorers
change only how a token's score starts (`admit`), grows (`gain`) and how a prompt chunk is
scored (`prompt_scores`).

Spec: `h2o:K+window:W` (optionally `sink:S`, and quantized storage `intN[+residual:R][+group:G]`,
e.g. `int4+residual:64+h2o:256+window:512`). Memory is fixed: S + W + K slots per row, layer and
kv head, allocated once; a row can be decoded for any number of tokens.

Policy. Every held token carries its accumulated attention score: the attention probability it
received, summed over the G query heads of its kv head and over every query since it arrived.
When a token arrives, the candidates are the held tokens plus the new one; the cache keeps, per
(row, layer, kv head):

  * the S first tokens of the row (attention sinks; none unless `sink:S`),
  * the W most recent tokens (the new one included),
  * among the other candidates, the K with the largest accumulated score,

and forgets the rest for good. One token at a time that is one scatter: the token takes the
weakest held slot's place if it outranks it (`admission.replace_weakest`; ties keep the lower
position), so a decode step writes one slot per (row, layer, kv head) and never copies the pool.
A whole chunk at once (SnapKV's prompt) goes through `evict_topk`, a `lax.top_k` over fixed
shapes (ties to the lower candidate index). Then the new token's query attends over exactly what is held (S + W + K
keys at most, itself included), and every held token's score grows by the attention it got.
Different kv heads and layers keep different tokens.

Chunks. `attend` with T > 1 new tokens runs this single-token step T times in a `lax.scan`, so
every query sees exactly what the cache holds when its token arrives: chunked prefill ==
token-by-token decode (tested). Padding tokens (t >= n_valid[b]) change nothing in row b: they
are never stored, never evict anything and add no score.

RoPE. Keys are stored rotated at their original positions and never re-indexed: a held token
keeps its true distance to later queries, even after the tokens between them were evicted. (So a
stream longer than the model's trained context reaches distances it never saw; the window kind's
re-indexing is the remedy there.)

Quantized storage (`intN`, or fp8 through a `kvjax.caches.codec.Codec`). Held tokens are stored
per token: bit-packed with one float16 scale (and zero point) per `group` channels (int8 symmetric,
narrower widths asymmetric), or fp8 codes with one scale per token; decoded inside attention.
Per-token storage suits slots that are evicted one by one.
With `residual:R` (R <= W) the R newest tokens live in a full-precision ring beside the quantized
pool and are quantized when they leave it; the pool then keeps the sinks, the W - R next most
recent tokens and the K heaviest. Without `residual`, a token is quantized on arrival (its own
query already sees the quantized key).

Invariants (tests/caches/test_h2o.py, against NumPy oracles):
  * after any sequence of chunks (ragged n_valid included), each (row, layer, kv head) holds
    exactly the tokens the policy above keeps when tokens are fed one by one, with their scores;
  * at most S + W + K tokens are held, positions are unique, the sinks and the W most recent
    tokens are always held; every array has a fixed shape; `limited = False` (nothing can
    overflow) and `has_room`/`fits` are always true;
  * a budget larger than the sequence gives the full cache's logits.

`write` (used by `kvjax.append`, which has no queries) admits tokens one by one with zero score.
`crop` marks tokens at positions >= length empty; tokens they had already evicted do not come
back, and the scores keep the attention of the cropped queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base
from kvjax.caches import codec as codec_lib
from kvjax.caches.codec import TokenStore
from kvjax.caches.registry import SpecError
from kvjax.caches.scored import admission, scorers
from kvjax.caches.scored.scorers import SNAP_KERNEL, SNAP_OBSERVE, SNAP_POOLING, Scorer


@struct.dataclass
class ScoredCache(base.Evicting):
  """Scored cache; see the module docstring.

  k, v: TokenStore, logical [L, B, K, P, H]: the pool (P = sink + window - residual + heavy slots),
    keys rotated, at the pool's precision (the cache dtype, or intN).
  ring_k, ring_v: [L, B, K, R, H] full-precision ring of the R = residual newest tokens
    (R may be 0).
  positions: int32 [L, B, K, P + R]: pool slots then ring slots, -1 where empty.
  scores: float32 [L, B, K, P + R]: each held token's score (H2O: its accumulated attention).
  lengths: int32 [B] tokens seen per row.
  heads: None, or with a pool shared by the kv heads of a layer (`adakv`): int32 [L, B, 1, P]
    the kv head each slot belongs to; the arrays above then have one "head" axis of size 1 and
    P = kv_heads x (sink + window + heavy) slots (no residual ring).
  scoring: the `Scorer` (static); `scorer` is its name.
  """

  k: TokenStore
  v: TokenStore
  ring_k: jax.Array
  ring_v: jax.Array
  positions: jax.Array
  scores: jax.Array
  lengths: jax.Array
  heads: jax.Array | None = None
  heavy: int = struct.field(pytree_node=False, default=1)
  window: int = struct.field(pytree_node=False, default=1)
  sink: int = struct.field(pytree_node=False, default=0)
  scoring: Scorer = struct.field(pytree_node=False, default=scorers.H2O())
  n_kv: int = struct.field(pytree_node=False, default=0)

  # Eviction makes room: kvjax.append must not raise capacity errors. Unless the scorer compresses
  # prompts, chunks are fed token by token inside `attend`, so chunked feeding is exact.

  @property
  def chunk_exact(self) -> bool:
    """h2o: yes. snapkv: no, a chunk is one prompt, attended in full and then compressed."""
    return not self.scoring.compresses_prompt

  @property
  def scorer(self) -> str:
    return self.scoring.name

  # SnapKV's settings, None for scorers without them.
  observe = property(lambda self: getattr(self.scoring, "observe", None))
  kernel = property(lambda self: getattr(self.scoring, "kernel", None))
  pooling = property(lambda self: getattr(self.scoring, "pooling", None))

  @property
  def exact(self) -> bool:
    """Held tokens are stored exactly unless the pool is quantized (intN or fp8)."""
    return self.k.codec.is_float

  @property
  def error_bound(self) -> float:
    return 0.0 if self.exact else self.k.codec.error_bound

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, heavy: int,
           window: int, sink: int = 0, bits: int | None = None, residual: int = 0,
           group: int = 32, dtype=jnp.float32, scorer: str | Scorer = "h2o",
           observe: int = SNAP_OBSERVE, kernel: int = SNAP_KERNEL,
           pooling: str = SNAP_POOLING, shared_heads: bool = False,
           codec: codec_lib.Codec | None = None) -> "ScoredCache":
    """The pool is stored through `codec` (default: intN from `bits` and `group`, or the cache
    dtype when bits is None); the residual ring is always at the cache dtype. `scorer`: a
    `Scorer`, or a built-in scorer's name ('h2o', or 'snapkv' with observe, kernel, pooling)."""
    if codec is None:
      codec = codec_lib.of_dtype(dtype) if bits is None else codec_lib.of_bits(bits, group)
    if shared_heads and residual:
      raise SpecError("adakv (a pool shared by the kv heads) does not take a residual ring yet; "
                      "drop residual:R")
    if isinstance(scorer, str):
      scorer = scorers.named(scorer, observe=observe, kernel=kernel, pooling=pooling)
    _check_sizes(heavy=heavy, window=window, sink=sink, residual=residual, codec=codec,
                 head_dim=head_dim)
    pool = sink + window - residual + heavy
    lead = (n_layers, batch, kv_heads)
    if shared_heads:
      pool, lead = kv_heads * pool, (n_layers, batch, 1)
    # Separate buffers everywhere: a donated cache must not hold one buffer twice.
    ring = lambda: jnp.zeros(lead + (residual, head_dim), dtype)
    slots = pool + residual
    return cls(k=codec.empty(lead + (pool, head_dim)), v=codec.empty(lead + (pool, head_dim)),
               ring_k=ring(), ring_v=ring(), positions=jnp.full(lead + (slots,), -1, jnp.int32),
               scores=jnp.zeros(lead + (slots,), jnp.float32),
               lengths=jnp.zeros((batch,), jnp.int32),
               heads=jnp.zeros(lead + (slots,), jnp.int32) if shared_heads else None,
               heavy=heavy, window=window, sink=sink, scoring=scorer.fit(window),
               n_kv=kv_heads if shared_heads else 0)

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.positions

  @property
  def shared_heads(self) -> bool:
    return self.heads is not None

  @property
  def kv_heads(self) -> int:
    return self.n_kv if self.shared_heads else self.positions.shape[2]

  @property
  def capacity(self) -> int:
    """Slots per row, layer and kv head (sink + window + heavy): what the cache holds at most,
    not a stream limit. With a shared pool (`adakv`) one head may hold up to the sinks, the
    window and every head's scored share: sink + window + kv_heads x heavy."""
    if self.shared_heads:
      return self.sink + self.window + self.n_kv * self.heavy
    return self.positions.shape[3]

  @property
  def lossless_tokens(self) -> int:
    """The longest stream every (layer, kv head) holds whole."""
    return self.sink + self.window + self.heavy

  @property
  def pool(self) -> int:
    return self.k.data.shape[3]

  @property
  def residual(self) -> int:
    return self.ring_k.shape[3]

  @property
  def bits(self) -> int | None:
    return self.k.bits

  @property
  def head_dim(self) -> int:
    return self.ring_k.shape[4]

  def filled(self) -> jax.Array:
    """int32 [B]: tokens each row holds (the most over its layers and kv heads, which may
    differ after a crop); `held()` gives the per-(layer, head) counts."""
    return jnp.max(self.held(), axis=(0, 2))

  def held(self) -> jax.Array:
    """int32 [L, B, K]: tokens held per layer, row and kv head."""
    if self.shared_heads:
      mine = (self.positions >= 0) & (self.heads == jnp.arange(self.n_kv)[:, None])  # [L,B,K,P]
      return jnp.sum(mine, axis=-1).astype(jnp.int32)
    return jnp.sum(self.positions >= 0, axis=-1).astype(jnp.int32)

  # ---- protocol -------------------------------------------------------------------------------
  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, T, N, H], k/v [B, T, K, H] un-rotated. Returns (out [B, T, N, H], cache).

    Token by token (a scan when T > 1): admit the token (evicting), then let its query attend
    over what is held and grow the held scores (`admission.step`). A scorer that compresses
    prompts takes a chunk of T > 1 tokens at once instead (`_attend_prompt`).
    """
    t = q.shape[1]
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.prepare_queries(attn.apply_rope(rope, q, positions), self.kv_heads, scale)
    k = attn.apply_rope(rope, k, positions)
    if self.scoring.compresses_prompt and t > 1:
      return self._attend_prompt(layer, q, k, v, n_valid, positions)
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]  # [B, T]
    final = self.lengths + n_valid

    def step(st, xs):
      q_t, k_t, v_t, pos_t, valid_t = xs
      now = jnp.where(valid_t, pos_t + 1, final)
      return admission.step(self, st, q_t, k_t, v_t, pos_t, valid_t, now)

    xs = (q, k, v, positions, valid)
    if t == 1 and not self.residual:  # decode: in place, no layer copy
      now = jnp.where(valid[:, 0], positions[:, 0] + 1, final)
      cache, out = admission.decode_step(self, layer, *(a[:, 0] for a in xs), now)
      return out[:, None], cache
    st = admission.take_layer(self, layer)
    if t == 1:
      st, out = step(st, jax.tree_util.tree_map(lambda a: a[:, 0], xs))
      out = out[:, None]
    else:
      st, out = jax.lax.scan(step, st, jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), xs))
      out = out.swapaxes(0, 1)
    return out, admission.put_layer(self, layer, st)

  def _attend_prompt(self, layer: int, q, k, v, n_valid, positions):
    """A chunk of T > 1 tokens (a prompt), attended exactly and then compressed once.

    q [B, T, K, G, H] rotated and scaled; k [B, T, K, H] rotated; v [B, T, K, H]; n_valid [B];
    positions int32 [B, T]. Every query attends over what the cache holds plus the chunk's
    tokens up to its own (causal), so a prompt fed in one chunk gets the full cache's outputs.
    Then the scorer scores every candidate (`prompt_scores`) and the cache keeps the sinks, the
    window's most recent tokens and the `heavy` best scored.
    """
    st = admission.take_layer(self, layer)
    ck, cv = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, H]
    held_k, held_v, held_mask = admission.held(self, st, q.dtype)  # [B,K,S,H], [B,K,1,S]
    out = admission.prompt_outputs(q, ck, cv, held_k, held_v, held_mask, n_valid)
    held_gain, chunk_score = self.scoring.prompt_scores(q, held_k, held_mask, ck, n_valid)
    st = admission.compress(self, st, ck, cv, held_gain, chunk_score, n_valid, positions)
    return out, admission.put_layer(self, layer, st)

  def write(self, layer: int, k, v, n_valid=None) -> "ScoredCache":
    """Admits k, v [B, T, K, H] (stored as given) of one layer token by token, each starting at
    the scorer's `admit` score (H2O: 0), evicting as it goes; lengths unchanged (`advance`
    moves them)."""
    t = k.shape[1]
    n_valid = base.normalize_n_valid(n_valid, self.batch, t, what="write")
    positions = base.row_slots(self.lengths, t)
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]
    final = self.lengths + n_valid

    def step(st, xs):
      k_t, v_t, pos_t, valid_t = xs
      now = jnp.where(valid_t, pos_t + 1, final)
      return admission.admit(self, st, k_t, v_t, pos_t, valid_t, now), None

    xs = jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), (k, v, positions, valid))
    st, _ = jax.lax.scan(step, admission.take_layer(self, layer), xs)
    return admission.put_layer(self, layer, st)

  def advance(self, n_valid) -> "ScoredCache":
    return self.replace(lengths=self.lengths + jnp.asarray(n_valid, jnp.int32))

  def view(self) -> base.CacheView:
    """Keys (rotated, dequantized), values [L, B, K, P + R, H]: pool slots then ring slots."""
    keys = jnp.concatenate([self.k.decode(), self.ring_k.astype(jnp.float32)], axis=3)
    values = jnp.concatenate([self.v.decode(), self.ring_v.astype(jnp.float32)], axis=3)
    if self.shared_heads:  # the shared row, shown once per head with that head's slots live
      mask = (self.positions >= 0) & (self.heads == jnp.arange(self.n_kv)[:, None])
      shape = mask.shape + keys.shape[-1:]
      return base.CacheView(keys=jnp.broadcast_to(keys, shape),
                            values=jnp.broadcast_to(values, shape), mask=mask,
                            positions=jnp.where(mask, self.positions, -1))
    return base.CacheView(keys=keys, values=values, mask=self.positions >= 0,
                          positions=self.positions)

  def reset(self) -> "ScoredCache":
    """Empty cache of the same shapes (stale buffers hidden by positions = -1)."""
    return self.replace(positions=jnp.full_like(self.positions, -1),
                        scores=jnp.zeros_like(self.scores), lengths=jnp.zeros_like(self.lengths))

  def crop(self, length) -> "ScoredCache":
    """Forgets every token at position >= length (scalar or per row [B]). Evicted tokens do not
    come back and scores keep the attention of the forgotten queries (see module docstring)."""
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), self.lengths.shape)
    gone = self.positions >= length[None, :, None, None]
    return self.replace(positions=jnp.where(gone, -1, self.positions),
                        scores=jnp.where(gone, 0.0, self.scores),
                        lengths=jnp.minimum(self.lengths, length))

  def reorder(self, indices) -> "ScoredCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    take = lambda a: jnp.take(a, indices, axis=1)
    return self.replace(k=self.k.map(take), v=self.v.map(take), ring_k=take(self.ring_k),
                        ring_v=take(self.ring_v), positions=take(self.positions),
                        scores=take(self.scores), lengths=jnp.take(self.lengths, indices, axis=0),
                        heads=None if self.heads is None else take(self.heads))


H2OCache = ScoredCache  # the name the library and its tests have always used


def _check_sizes(*, heavy, window, sink, residual, codec, head_dim) -> None:
  """The SpecErrors of `ScoredCache.init` for sizes that cannot make a cache."""
  for name, value, low in (("heavy", heavy, 1), ("window", window, 1), ("sink", sink, 0),
                           ("residual", residual, 0)):
    if not isinstance(value, int) or value < low:
      raise SpecError(f"ScoredCache: {name} must be an int >= {low}, got {value!r}")
  if residual > window:
    raise SpecError(f"residual:{residual} must not exceed window:{window} (the full-precision "
                    "tokens are the newest of the window)")
  if residual and codec.is_float:
    raise SpecError(f"residual:{residual} needs quantized storage (intN or fp8)")
  if codec.kind == "int" and head_dim % codec.group:
    raise SpecError(f"{codec.format} storage: head_dim {head_dim} is not a multiple of "
                    f"group:{codec.group}")
