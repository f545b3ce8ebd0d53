"""Self-speculative decoding: draft tokens through a cheap cache of the same model, verify them
with one multi-token pass over the full cache (TriForce / MagicDec's idea).

One round, per row, inside one jitted `lax.while_loop`:

  1. draft: k steps of `model.step` on the draft cache (e.g. `sink:4+window:252`, `int4`,
     `snapkv:...`), sampling d_1..d_k from the draft's distributions q_1..q_k;
  2. verify: one `model.step` of the k + 1 tokens [last, d_1..d_k] on the main cache, giving the
     target distributions p_0..p_k;
  3. accept: the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): d_i is kept
     with probability min(1, p(d_i) / q(d_i)) while every earlier one was kept; at the first
     rejection the next token is drawn from norm(max(p - q, 0)), and when all k are kept a bonus
     token is drawn from p_k. The emitted tokens are distributed exactly as sampling from the
     main cache alone. Greedy: d_i is kept while it equals the argmax of p, and the next token is
     that argmax, so the output equals plain greedy decoding token for token;
  4. `crop` both caches back to what was accepted (the draft cache may lag one token when all k
     were kept; it is fed that token at the start of the next round).

`generate(..., draft=SPEC, draft_tokens=k)` runs this; `accept_drafts` is the rule on its own.
Rows advance at their own pace: each writes its accepted tokens at its own offset, and a row that
is finished feeds n_valid = 0 so its caches stay untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.sampling import Sampler


def accept_drafts(p, q, drafts, key, *, greedy: bool):
  """The acceptance rule of speculative sampling.

  Args:
    p: fp32 [B, k + 1, V] target distributions (the sampler's) after the last fed token and after
      each draft; greedy: anything whose argmax is the target token (e.g. logits).
    q: fp32 [B, k, V] draft distributions d_i was drawn from (unused when greedy).
    drafts: int32 [B, k].
    key: PRNG key (unused when greedy).

  Returns:
    (n_accepted int32 [B] in [0, k], next int32 [B]): the row emits drafts[:n] then `next`.
  """
  b, k = drafts.shape
  if greedy:
    target = jnp.argmax(p, axis=-1).astype(jnp.int32)  # [B, k + 1]
    ok = drafts == target[:, :k]
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    return n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
  k_accept, k_next = jax.random.split(key)
  pick = lambda dist: jnp.take_along_axis(dist, drafts[..., None], axis=-1)[..., 0]
  p_d, q_d = pick(p[:, :k]), pick(q)
  u = jax.random.uniform(k_accept, (b, k))
  ok = u * q_d < p_d  # u < p/q without dividing; q_d > 0 since d was drawn from q
  n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
  q_n = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1),
                            n[:, None, None], axis=1)[:, 0]  # zeros when n == k: the bonus token
  residual = jnp.maximum(p_n - q_n, 0.0)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  dist = jnp.where(total > 0, residual / jnp.maximum(total, 1e-30), p_n)
  nxt = jax.random.categorical(k_next, jnp.log(dist), axis=-1).astype(jnp.int32)
  return n, nxt


@struct.dataclass
class SpecState:
  """Carry of the speculative loop. cache/draft: the main and draft caches. out: int32 [B, O]
  emitted ids; n_generated [B]; last [B]: emitted, not yet fed to the main cache; lag [B]: the
  draft cache misses `lag_token` (all k drafts were accepted last round); done [B]: EOS seen;
  drafted / accepted [B]: draft tokens proposed and kept; key: PRNG key."""

  cache: Any
  draft: Any
  out: jax.Array
  n_generated: jax.Array
  last: jax.Array
  lag: jax.Array
  lag_token: jax.Array
  done: jax.Array
  drafted: jax.Array
  accepted: jax.Array
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("draft",))
def prefill_draft(params, tokens, lengths, draft, *, model):
  """The prompt into the draft cache (its logits are not needed)."""
  return model.step_last(params, tokens, draft, lengths)[1]


def start(state, draft) -> SpecState:
  """A `SpecState` from the plain prefill's `DecodeState` and a prefilled draft cache."""
  b = state.last.shape[0]
  zeros = lambda: jnp.zeros((b,), jnp.int32)  # separate buffers: the state is donated
  return SpecState(cache=state.cache, draft=draft, out=state.out, n_generated=state.n_generated,
                   last=state.last, lag=jnp.zeros((b,), bool), lag_token=zeros(), done=state.done,
                   drafted=zeros(), accepted=zeros(), key=state.key)


def _draft(params, s: SpecState, live, k_first, k_draft, *, model, sampler: Sampler, k: int):
  """Feeds [lag_token, last] (or [last]) then k - 1 single tokens to the draft cache. Returns
  drafts int32 [B, k], their probabilities [B, k, V] (None when greedy) and the draft cache."""
  first = jnp.stack([jnp.where(s.lag, s.lag_token, s.last), jnp.where(s.lag, s.last, 0)], axis=1)
  n_first = jnp.where(live, 1 + s.lag.astype(jnp.int32), 0)
  logits, draft = model.step(params, first, s.draft, n_first)
  logits = jnp.take_along_axis(logits, jnp.maximum(n_first - 1, 0)[:, None, None], axis=1)[:, 0]
  d1, q1 = sampler(logits, k_first), sampler.probs(logits)

  def draft_step(carry, sub):
    draft, token = carry
    logits, draft = model.step(params, token[:, None], draft, live.astype(jnp.int32))
    token = sampler(logits[:, 0], sub)
    return (draft, token), (token, None if sampler.greedy else sampler.probs(logits[:, 0]))

  drafts, q = d1[:, None], q1[:, None]  # [B, k], [B, k, V]
  if k > 1:
    (draft, _), (rest, q_rest) = jax.lax.scan(draft_step, (draft, d1), jnp.stack(k_draft))
    drafts = jnp.concatenate([drafts, rest.swapaxes(0, 1)], axis=1)
    q = None if sampler.greedy else jnp.concatenate([q, q_rest.swapaxes(0, 1)], axis=1)
  return drafts, q, draft


@functools.partial(jax.jit, static_argnames=("model", "sampler", "k"), donate_argnames=("state",))
def speculate(params, state: SpecState, stop_at, max_new, eos_id, *, model,
              sampler: Sampler, k: int):
  """Rounds until every row is done, has `max_new` tokens, or has `stop_at` (streaming)."""
  b = state.last.shape[0]
  rows = jnp.arange(b)
  width = state.out.shape[1]

  def active(s):
    return ~s.done & (s.n_generated < max_new)

  def cond(s):
    return (jnp.any(active(s) & (s.n_generated < stop_at)) & s.cache.has_room(k + 1)
            & s.draft.has_room(k + 1))

  def body(s: SpecState):
    live = active(s)
    key, k_first, k_accept, *k_draft = jax.random.split(s.key, k + 2)
    # 1. Draft k tokens on the draft cache.
    drafts, q, draft = _draft(params, s, live, k_first, k_draft[:k - 1], model=model,
                              sampler=sampler, k=k)
    # 2. Verify on the main cache.
    before = s.cache.lengths
    fed = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, k + 1]
    logits, cache = model.step(params, fed, s.cache, jnp.where(live, k + 1, 0))
    p = logits if sampler.greedy else sampler.probs(logits)
    n_acc, nxt = accept_drafts(p, q, drafts, k_accept, greedy=sampler.greedy)

    # 3. Keep what was accepted.
    keep = before + 1 + n_acc
    cache = cache.crop(jnp.where(live, keep, cache.lengths))
    draft = draft.crop(jnp.where(live, keep, draft.lengths))
    j = jnp.arange(k + 1)[None, :]
    emit = jnp.where(j == n_acc[:, None], nxt[:, None],
                     jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1))
    valid = (j <= n_acc[:, None]) & live[:, None]
    is_eos = valid & (emit == eos_id)
    first_eos = jnp.min(jnp.where(is_eos, j, k + 1), axis=1)
    valid &= j <= first_eos[:, None]
    at = jnp.where(valid, s.n_generated[:, None] + j, width)  # out of range: dropped
    out = s.out.at[rows[:, None], at].set(emit, mode="drop")
    return SpecState(cache=cache, draft=draft, out=out,
                     n_generated=s.n_generated + jnp.sum(valid, axis=1, dtype=jnp.int32),
                     last=jnp.where(live, nxt, s.last), lag=jnp.where(live, n_acc == k, s.lag),
                     lag_token=jnp.where(live, drafts[:, -1], s.lag_token),
                     done=s.done | jnp.any(is_eos & valid, axis=1),
                     drafted=s.drafted + jnp.where(live, k, 0),
                     accepted=s.accepted + jnp.where(live, n_acc, 0), key=key)

  return jax.lax.while_loop(cond, body, state)
