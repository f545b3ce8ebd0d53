"""Generation: one jitted prefill of the whole prompt, then a jitted `lax.while_loop` decode.

The loop knows the model only through its step function (`kvjax.models.protocol`) and the cache
only through its protocol (`kvjax.caches.base`). Its carry (`DecodeState`) has fixed shapes; each
step writes one token per row into the cache (in place: the state is donated) and into a
preallocated output buffer.

Compilation is `jax.jit`'s own: `_prefill` and `_decode` are jitted once at import with the step
function, the sampler and the output size as static arguments, so JAX's cache (bounded, LRU) holds
one executable per (step function, batch, prompt bucket, cache type and shapes, output bucket,
sampler) and a second `generate` with the same shapes compiles nothing. Prompt lengths are padded
up to a bucket (powers of two to 256, then multiples of 256); `max_new_tokens` is a run-time
value bounded by the output bucket. `compile_stats()` counts XLA compilations in this process
(through `jax.monitoring`), whoever asked for them.

`cache="none"` is the uncached baseline: every step feeds the whole prefix, padded to a multiple
of 32 tokens, through the model into a fresh full cache, so its cost grows with the prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import prompts as prompts_lib
from kvjax import sharding, speculative
from kvjax import spec as spec_lib
from kvjax.caches import base, paged, registry
from kvjax.caches.base import CapacityError
from kvjax.caches.full import FullCache
from kvjax.models.protocol import check_model, model_dtype, static_step
from kvjax.sampling import GREEDY, Sampler


# ---------------------------------------------------------------------------------------------
# Buckets and compile accounting
# ---------------------------------------------------------------------------------------------
prompt_bucket = registry.bucket
capacity_for = registry.bucket


def output_bucket(n: int) -> int:
  """Size of the generated-token buffer: a power of two >= n (at least 16)."""
  return max(16, 1 << (max(n, 1) - 1).bit_length())


_COMPILES = {"n_compiles": 0, "compile_s": 0.0}
_COMPILED_FUNCTIONS: dict[str, int] = {}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _on_compile_event(event: str, duration: float, fun_name: str = "?", **_):
  if event in _COMPILE_EVENTS:
    _COMPILES["compile_s"] += duration
    if event == _COMPILE_EVENTS[-1]:
      _COMPILES["n_compiles"] += 1
      _COMPILED_FUNCTIONS[fun_name] = _COMPILED_FUNCTIONS.get(fun_name, 0) + 1


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def compile_stats() -> dict:
  """{'n_compiles': XLA executables built so far in this process, 'compile_s': seconds spent
  tracing, lowering and compiling them, 'by_function': {'jit(_decode)': count, ...}} (eager
  jax.numpy operations count too: each new shape of one is a small executable)."""
  return dict(_COMPILES, by_function=dict(_COMPILED_FUNCTIONS))


class Stopwatch:
  """Wall seconds of the timed blocks minus the compiling done inside them (`compile_stats`), so
  a first call reports the speed of the compiled code, as a second call would."""

  def __init__(self):
    self.seconds = 0.0

  def __enter__(self):
    self._start, self._compiling = time.perf_counter(), _COMPILES["compile_s"]
    return self

  def __exit__(self, *exc):
    compiling = _COMPILES["compile_s"] - self._compiling
    self.seconds += max(time.perf_counter() - self._start - compiling, 0.0)


def clear_caches() -> None:
  """Drops every compiled executable (JAX's caches) and collects the garbage that still holds
  them, so their memory maps are returned now; the next call compiles again. Long sweeps in one
  process (many specs, meshes or test modules) call this between cases: every XLA:CPU executable
  keeps memory maps, and a process that runs out of them aborts inside LLVM."""
  jax.clear_caches()
  gc.collect()


# ---------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class DecodeState:
  """Carry of the decode loop.

  cache: the cache pytree.  out: int32 [B, O] generated ids (pad after a row's EOS).
  last: int32 [B] the token to feed next.  step: int32 [] tokens generated so far.
  done: bool [B] rows that produced EOS.  n_generated: int32 [B].  key: PRNG key.
  """

  cache: Any
  out: jax.Array
  last: jax.Array
  step: jax.Array
  done: jax.Array
  n_generated: jax.Array
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "sampler", "out_size"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, prompt_lengths, cache, key, eos_id, *, model, sampler, out_size):
  logits, cache = model.step_last(params, tokens, cache, prompt_lengths)
  key, sub = jax.random.split(key)
  first = sampler(logits, sub)
  batch = tokens.shape[0]
  out = jnp.zeros((batch, out_size), jnp.int32).at[:, 0].set(first)
  return DecodeState(cache=cache, out=out, last=first, step=jnp.int32(1), done=first == eos_id,
                     n_generated=jnp.ones((batch,), jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("model", "sampler"), donate_argnames=("state",))
def _decode(params, state: DecodeState, stop_at, eos_id, pad_id, *, model, sampler):
  batch = state.last.shape[0]
  ones = jnp.ones((batch,), jnp.int32)

  def cond(s: DecodeState):
    return (s.step < stop_at) & ~jnp.all(s.done) & s.cache.has_room(1)

  def body(s: DecodeState):
    logits, cache = model.step(params, s.last[:, None], s.cache, ones)
    key, sub = jax.random.split(s.key)
    token = sampler(logits[:, 0], sub)
    token = jnp.where(s.done, pad_id, token)
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    return DecodeState(cache=cache, out=out, last=token, step=s.step + 1,
                       done=s.done | (token == eos_id), n_generated=s.n_generated + (~s.done),
                       key=key)

  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "layout"))
def _uncached_step(params, tokens, lengths, key, *, model, sampler, layout):
  """The whole prefix tokens [B, W] through the model into a fresh full cache of W slots."""
  n_layers, kv_heads, head_dim, dtype = layout
  fresh = FullCache.init(n_layers=n_layers, batch=tokens.shape[0], kv_heads=kv_heads,
                         head_dim=head_dim, capacity=tokens.shape[1], dtype=dtype)
  logits, _ = model.step_last(params, tokens, fresh, lengths)
  key, sub = jax.random.split(key)
  return sampler(logits, sub), key


# ---------------------------------------------------------------------------------------------
# Prompt handling
# ---------------------------------------------------------------------------------------------
def normalize_prompts(prompts, tokenizer=None, prompt_lengths=None, padding: str = "right"):
  """Returns (ids int32 [B, P] right-padded with 0, lengths int32 [B]).

  Accepts what `kvjax.prompts` does: a string or list of strings (needs `tokenizer`), a list of
  ints (one row), a list of lists of ints (ragged rows), or a 2-D integer array with optional
  `prompt_lengths` and `padding` ('right': real tokens first, 'left': real tokens last).
  """
  rows, _ = prompts_lib.token_rows(prompts, tokenizer, prompt_lengths=prompt_lengths,
                                   padding=padding)
  return prompts_lib.pad_rows(rows)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerateResult:
  """What `generate` returns. tokens: int32 [B, max_new_tokens], pad_id after a row's EOS.

  overflowed: bool [B], rows whose cache dropped tokens past its capacity or that stopped before
  max_new_tokens because their cache had no room left (always False for evicting kinds).
  sharding: with a mesh, what was split over which devices and the fallbacks taken; else None.
  prefill_s / decode_s: seconds running the prefill / the decode loop, compiling excluded, so a
  first call reports the speed a second one has (`decode_tok_per_s`).
  compile_s / n_compiles: compilation during this call (0 when every executable was cached).
  """

  tokens: np.ndarray
  n_generated: np.ndarray
  prompt_ids: np.ndarray
  prompt_lengths: np.ndarray
  cache: Any
  prefill_s: float
  decode_s: float
  compile_s: float
  n_compiles: int
  spec: str
  overflowed: np.ndarray | None = None
  sharding: str | None = None
  draft_acceptance: float | None = None
  draft_spec: str | None = None
  eos_id: int | None = None

  def rows(self, keep_eos: bool = False) -> list[np.ndarray]:
    """Each row's generated ids without the padding after it (and without its final EOS unless
    `keep_eos`): what to decode into text. `tokens` keeps the fixed [B, max_new_tokens] shape."""
    out = []
    for row, n in zip(self.tokens, self.n_generated):
      row = row[:int(n)]
      if not keep_eos and self.eos_id is not None and row.size and row[-1] == self.eos_id:
        row = row[:-1]
      out.append(row)
    return out

  def texts(self, tokenizer) -> list[str]:
    """`tokenizer.decode` of each of `rows()` (e.g. `out.texts(model.tokenizer)`)."""
    return [tokenizer.decode(row) for row in self.rows()]

  @property
  def decode_tok_per_s(self) -> float:
    """Tokens produced by the decode loop (all rows, after the prefill's first) per second."""
    produced = int(np.sum(np.maximum(self.n_generated - 1, 0)))
    return produced / self.decode_s if self.decode_s > 0 else float("nan")

  @property
  def cache_bytes(self) -> dict:
    return {} if self.cache is None else self.cache.nbytes()


def _is_cache_object(cache) -> bool:
  return not isinstance(cache, (str, spec_lib.CacheSpec)) and hasattr(cache, "attend")


def generate(model, prompts, *, max_new_tokens: int, cache="full", capacity: int | None = None,
             sampler: Sampler = GREEDY, seed: int | jax.Array = 0, eos_id: int | None = None,
             pad_id: int | None = None, prompt_lengths=None, padding: str = "right",
             stop_at_eos: bool = True, on_tokens: Callable[[np.ndarray], None] | None = None,
             stream_chunk: int = 1, cache_options: dict | None = None, mesh=None,
             rules=None, draft=None, draft_tokens: int = 4,
             draft_options: dict | None = None) -> GenerateResult:
  """Generates up to `max_new_tokens` per row.

  Args:
    model: any model of `kvjax.models.protocol` (`params`, `config`, `step`; `tokenizer` for text
      prompts), e.g. the result of `kvjax.load`.
    prompts: see `normalize_prompts`; ragged rows are fine.
    cache: spec string or `CacheSpec` ("full", "dynamic", "none", a registered kind, ...), or a
      cache object whose rows may already hold tokens (a prefilled prompt prefix, see
      `kvjax.prefix`): each prompt then continues its row at `cache.lengths[b]`. The object is
      consumed (its buffers are donated).
    capacity: cache slots per row; default: the kind's own choice (for kinds that keep every token:
      the prompt plus max_new_tokens, bucketed).
    sampler: `Sampler` (greedy by default); seed: int or PRNG key.
    eos_id: stop a row when it emits this id (default: the tokenizer's EOS if `stop_at_eos`).
    on_tokens: called with each new block of tokens [B, n] as they are produced (streaming).
    cache_options: keyword arguments for `make_cache` (e.g. `maps=` for share:G:cal, `pages=` for
      paged:P, whose pool otherwise holds exactly the pages the rows will fill: each row's prompt
      plus max_new_tokens, rounded up to pages).
    mesh: a `jax.sharding.Mesh` to run on (several devices or processes); rules: `AxisRules`
      mapping the cache's and weights' logical axes to its axes (default: batch over `data`, kv
      heads and tensor parallelism over `model`, with the fallbacks of `kvjax.sharding`).
      `GenerateResult.sharding` says what was split.
    draft: a cache spec for self-speculative decoding (`kvjax.speculative`): `draft_tokens`
      tokens per round are drafted by the same model over this cheaper cache and verified in one
      pass over `cache`; greedy output equals plain decoding, sampled output has the same
      distribution. `GenerateResult.draft_acceptance` = accepted / drafted tokens.
      draft_options: keyword arguments for the draft's `make_cache`.
  """
  check_model(model, "generate")
  cfg = model.config
  params = model.params
  handle = static_step(model)
  tokenizer = getattr(model, "tokenizer", None)
  prebuilt = cache if _is_cache_object(cache) else None
  if prebuilt is not None:
    base.check_cache(prebuilt, "generate")
  spec = None if prebuilt is not None else spec_lib.parse_spec(cache)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not isinstance(sampler, Sampler):
    raise TypeError(f"sampler must be a kvjax.Sampler, got {type(sampler).__name__}")
  ids, lengths = normalize_prompts(prompts, tokenizer, prompt_lengths, padding)
  prompts_lib.check_vocab(ids, cfg.vocab_size)
  if eos_id is None and stop_at_eos and tokenizer is not None:
    eos_id = tokenizer.eos_id
  eos = -1 if eos_id is None else int(eos_id)
  pad = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
  key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
  dtype = model_dtype(model)
  before = compile_stats()

  if draft is not None:
    draft = spec_lib.parse_spec(draft)
    if not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 1:
      raise ValueError(f"draft_tokens must be a positive int, got {draft_tokens!r}")
    if not draft.uses_cache or (spec is not None and not spec.uses_cache):
      raise ValueError("draft= needs a cache on both sides: neither cache nor draft may be 'none'")
    if mesh is not None:
      raise ValueError("draft= (self-speculative decoding) runs on one device; drop mesh=")
  if spec is not None and not spec.uses_cache:
    if mesh is not None:
      raise ValueError("cache='none' (the uncached baseline) runs on one device; drop mesh=")
    return _generate_uncached(model, handle, ids, lengths, max_new_tokens, key, eos, pad, sampler,
                              spec, on_tokens, before)

  n_rows = ids.shape[0]  # the caller's rows; a mesh may add padding rows after them
  if mesh is not None and prebuilt is None:
    padded = sharding.padded_batch(mesh, n_rows, rules)
    ids = np.pad(ids, ((0, padded - n_rows), (0, 0)))
    lengths = np.pad(lengths, (0, padded - n_rows), constant_values=1)
  batch, p_max = ids.shape
  longest = int(lengths.max())
  needed = longest + max_new_tokens - 1  # the last sampled token is never fed back
  if draft is not None:
    needed += draft_tokens + 1  # a verification pass writes k + 1 tokens before cropping
  if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
    raise ValueError(f"capacity must be a positive int, got {capacity!r}")
  if prebuilt is not None:
    if prebuilt.batch != batch:
      raise ValueError(f"the given cache has {prebuilt.batch} rows but there are {batch} prompts")
    lost = np.flatnonzero(np.asarray(prebuilt.overflowed()))
    if lost.size:
      raise CapacityError(f"rows {lost.tolist()} of the given cache already dropped tokens past its "
                          f"capacity {prebuilt.capacity} (cache.overflowed()); continuing them would "
                          "condition on a truncated context")
    kv_cache = prebuilt
    needed += int(jnp.max(prebuilt.lengths))
  else:
    info = registry.lookup(spec.kind)
    cap = int(capacity or info.default_capacity(spec, needed=needed, prompt=longest))
    options = dict(cache_options or {})
    if spec.paged and "pages" not in options:  # a pool for what the rows will hold, not B x cap
      options["pages"] = paged.pages_for(lengths + (needed - longest), spec.paged)
    kv_cache = spec_lib.make_cache(spec, cfg, batch, cap, dtype, **options)
    if not kv_cache.fits(longest):
      raise CapacityError(f"prompt of {longest} tokens does not fit a cache of capacity {cap}")
  growable = bool(getattr(kv_cache, "growable", False))
  draft_cache = None
  if draft is not None:
    draft_cache = _draft_cache(draft, kv_cache, cfg, batch, needed, longest, dtype, draft_options)
  if not growable and not kv_cache.fits(needed):
    raise CapacityError(
        f"max_new_tokens={max_new_tokens} with a {longest}-token prompt needs {needed} cache slots, "
        f"but the cache capacity is {kv_cache.capacity}; raise capacity or lower max_new_tokens")

  # Padding tokens past the capacity are dropped by the cache's write, so the bucket may exceed it.
  tokens = np.zeros((batch, prompt_bucket(p_max)), np.int32)
  tokens[:, :p_max] = ids
  tokens, lengths_in, plan = jnp.asarray(tokens), jnp.asarray(lengths), None
  if mesh is not None:
    plan = sharding.plan(mesh, cfg, batch=batch, capacity=kv_cache.capacity, rules=rules,
                         slot_sharding_ok=sharding.supports_slot_sharding(kv_cache))
    if growable and plan.rules.slots:
      raise ValueError("a dynamic (growable) cache cannot split its slots over devices")
    kv_cache = sharding.shard_cache(kv_cache, plan)
    params = sharding.shard_params(params, plan)
    tokens, lengths_in = sharding.shard_rows(np.asarray(tokens), plan), sharding.shard_rows(lengths, plan)
    key = sharding.replicate(np.asarray(key), plan)
    if batch > n_rows:
      plan = sharding.with_note(plan, f"batch {n_rows} padded to {batch} rows to split it (rows "
                                f"{n_rows}..{batch - 1} of the returned cache are padding)")
  with Stopwatch() as prefill_clock:
    state = _prefill(params, tokens, lengths_in, kv_cache, key, np.int32(eos),
                     model=handle, sampler=sampler, out_size=output_bucket(max_new_tokens))
    if batch > n_rows:  # padding rows are finished from the start
      state = state.replace(done=state.done | sharding.shard_rows(np.arange(batch) >= n_rows, plan))
    jax.block_until_ready(state)
  prefill_s = prefill_clock.seconds
  if on_tokens is not None:
    on_tokens(sharding.fetch(state.out)[:n_rows, :1])
  if draft_cache is not None:
    return _generate_speculative(params, state, draft_cache, tokens, lengths_in, handle, sampler,
                                 max_new_tokens, eos, pad, draft, draft_tokens, on_tokens,
                                 stream_chunk, spec, prebuilt, ids, lengths, prefill_s, before)

  decode_clock = Stopwatch()
  emitted = 1
  out_of_room = False
  while True:
    step = int(state.step)
    if step >= max_new_tokens or bool(jnp.all(state.done)):
      break
    if not bool(state.cache.has_room(1)):
      if not growable:
        out_of_room = True
        break
      state = state.replace(cache=state.cache.grow(state.cache.capacity * 2))
    stop_at = max_new_tokens if on_tokens is None else min(max_new_tokens, step + stream_chunk)
    with decode_clock:
      state = _decode(params, state, np.int32(stop_at), np.int32(eos), np.int32(pad),
                      model=handle, sampler=sampler)
      jax.block_until_ready(state)
    if on_tokens is not None:
      new_step = int(state.step)
      on_tokens(sharding.fetch(state.out)[:n_rows, emitted:new_step])
      emitted = new_step

  n_gen = sharding.fetch(state.n_generated)[:n_rows]
  overflowed = sharding.fetch(state.cache.overflowed()).astype(bool)[:n_rows]
  if out_of_room:
    overflowed = overflowed | (~sharding.fetch(state.done)[:n_rows] & (n_gen < max_new_tokens))
  return _result(sharding.fetch(state.out)[:n_rows], n_gen, max_new_tokens, pad, state.cache,
                 overflowed, ids[:n_rows], lengths[:n_rows], prefill_s, decode_clock.seconds, before,
                 str(spec) if prebuilt is None else type(prebuilt).__name__, eos,
                 sharding=None if plan is None else plan.describe())


def _result(out, n_gen, max_new, pad, cache, overflowed, ids, lengths, prefill_s, decode_s,
            before, spec: str, eos_id: int = -1, **extra) -> GenerateResult:
  """The `GenerateResult` of a decode loop: out [B, >= max_new] ids, padded past n_gen."""
  eos_id = None if eos_id < 0 else int(eos_id)
  out = out[:, :max_new]  # sliced in NumPy: no per-length compile
  out = np.where(np.arange(max_new)[None, :] < n_gen[:, None], out, pad).astype(np.int32)
  after = compile_stats()
  return GenerateResult(tokens=out, n_generated=n_gen, prompt_ids=ids, prompt_lengths=lengths,
                        cache=cache, prefill_s=prefill_s, decode_s=decode_s, eos_id=eos_id,
                        compile_s=after["compile_s"] - before["compile_s"],
                        n_compiles=after["n_compiles"] - before["n_compiles"], spec=spec,
                        overflowed=overflowed, **extra)


def _draft_cache(draft, kv_cache, cfg, batch, needed, longest, dtype, options):
  """The draft's empty cache, after checking that both caches can be cropped."""
  if getattr(kv_cache, "growable", False):
    raise ValueError("draft=: a dynamic (growable) main cache is not supported; use 'full'")
  info = registry.lookup(draft.kind)
  cap = int(info.default_capacity(draft, needed=needed, prompt=longest))
  draft_cache = spec_lib.make_cache(draft, cfg, batch, cap, dtype, **(options or {}))
  for what, cache in (("cache", kv_cache), ("draft", draft_cache)):
    if not base.supports(cache, "crop"):
      raise ValueError(f"draft=: the {what} kind {type(cache).__name__} cannot crop, which "
                       "speculative decoding needs to drop rejected tokens")
  if not draft_cache.fits(longest):
    raise CapacityError(f"draft={str(draft)!r}: the {longest}-token prompt does not fit its "
                        f"capacity {draft_cache.capacity}")
  return draft_cache


def _generate_speculative(params, state, draft_cache, tokens, lengths_in, handle, sampler,
                          max_new, eos, pad, draft, k, on_tokens, stream_chunk, spec, prebuilt,
                          ids, lengths, prefill_s, before):
  """The decode loop of `generate(..., draft=...)`; see `kvjax.speculative`."""
  with Stopwatch() as clock:
    draft_cache = speculative.prefill_draft(params, tokens, lengths_in, draft_cache, model=handle)
    jax.block_until_ready(draft_cache)
  prefill_s += clock.seconds
  s = speculative.start(state, draft_cache)  # writes past max_new are dropped, never needed
  decode_clock, emitted = Stopwatch(), 1
  while True:
    n_gen, done = np.asarray(s.n_generated), np.asarray(s.done)
    running = ~done & (n_gen < max_new)
    if not running.any():
      break
    if not (bool(s.cache.has_room(k + 1)) and bool(s.draft.has_room(k + 1))):
      break
    # Streaming: run until every running row has `stream_chunk` more tokens.
    stop_at = max_new if on_tokens is None else min(max_new, int(n_gen[running].min()) + stream_chunk)
    with decode_clock:
      s = speculative.speculate(params, s, np.int32(stop_at), np.int32(max_new), np.int32(eos),
                                model=handle, sampler=sampler, k=k)
      jax.block_until_ready(s)
    if on_tokens is not None:  # columns every row has filled (or finished)
      n_gen, done = np.asarray(s.n_generated), np.asarray(s.done)
      ready = min(int(np.where(done, max_new, n_gen).min()), max_new)
      if ready > emitted:
        on_tokens(np.asarray(s.out)[:, emitted:ready])
        emitted = ready
  n_gen = np.minimum(np.asarray(s.n_generated), max_new)
  if on_tokens is not None and int(n_gen.max()) > emitted:
    on_tokens(np.asarray(s.out)[:, emitted:int(n_gen.max())])
  overflowed = np.asarray(s.cache.overflowed()).astype(bool)
  overflowed |= ~np.asarray(s.done) & (n_gen < max_new)
  drafted = int(np.asarray(s.drafted).sum())
  return _result(np.asarray(s.out), n_gen, max_new, pad, s.cache, overflowed, ids, lengths,
                 prefill_s, decode_clock.seconds, before,
                 str(spec) if prebuilt is None else type(prebuilt).__name__, eos,
                 draft_acceptance=int(np.asarray(s.accepted).sum()) / drafted if drafted else None,
                 draft_spec=str(draft))


def _generate_uncached(model, handle, ids, lengths, max_new, key, eos, pad, sampler, spec,
                       on_tokens, before):
  batch = ids.shape[0]
  total = int(lengths.max()) + max_new
  buf = np.zeros((batch, total + 32), np.int32)
  buf[:, :ids.shape[1]] = ids
  cur = lengths.copy()
  out = np.full((batch, max_new), pad, np.int32)
  done = np.zeros(batch, bool)
  n_gen = np.zeros(batch, np.int32)
  cfg = model.config
  layout = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, model_dtype(model))
  prefill_clock, decode_clock = Stopwatch(), Stopwatch()
  for step in range(max_new):
    width = -(-int(cur.max()) // 32) * 32
    with prefill_clock if step == 0 else decode_clock:
      token, key = _uncached_step(model.params, jnp.asarray(buf[:, :width]), jnp.asarray(cur), key,
                                  model=handle, sampler=sampler, layout=layout)
      token = np.asarray(token)
    token = np.where(done, pad, token)
    out[:, step] = token
    n_gen += ~done
    done |= token == eos
    buf[np.arange(batch), cur] = token
    cur = cur + 1
    if on_tokens is not None:
      on_tokens(token[:, None])
    if done.all():
      break
  after = compile_stats()
  return GenerateResult(tokens=out, n_generated=n_gen, prompt_ids=ids, prompt_lengths=lengths,
                        cache=None, prefill_s=prefill_clock.seconds, decode_s=decode_clock.seconds,
                        compile_s=after["compile_s"] - before["compile_s"],
                        n_compiles=after["n_compiles"] - before["n_compiles"], spec=str(spec),
                        overflowed=np.zeros(batch, bool), eos_id=None if eos < 0 else eos)
