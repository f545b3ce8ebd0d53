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

`generate` is a façade: its keywords become one validated `GenerateOptions`, the cache comes
from `kvjax.runtime.resolve` (the kind's capacity, the fits checks, a paged pool sized from the
rows, mesh padding and placement, as for every entry point), `_start` runs the prefill, and one
of three loops decodes: plain (`_generate_cached`), self-speculative (`_generate_speculative`)
or uncached (`_generate_uncached`).

`cache="none"` is the uncached baseline: every step feeds the whole prefix, padded to a multiple
of 32 tokens, through the model into a fresh full cache, so its cost grows with the prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import prompts as prompts_lib
from kvjax import kernels, layouts, runtime, sharding, speculative
from kvjax.caches import base
from kvjax.caches.base import CapacityError  # noqa: F401  (decode.CapacityError, kept public)
from kvjax.models.protocol import check_model, static_step
from kvjax.sampling import GREEDY, Sampler


# ---------------------------------------------------------------------------------------------
# Compile accounting
# ---------------------------------------------------------------------------------------------
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


def memory_maps() -> int | None:
  """How many memory regions this process maps (Linux; None elsewhere). Every XLA:CPU executable
  maps about 9, and the kernel allows 65530 (vm.max_map_count): past that, LLVM fails mid-compile
  with "Cannot allocate memory" whatever RAM is free."""
  try:
    with open(f"/proc/{os.getpid()}/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def clear_caches(*, maps_above: int | None = None) -> bool:
  """Drops every compiled executable (JAX's caches) and collects the garbage that still holds
  them, so their memory maps are returned now; the next call compiles again. Long sweeps in one
  process (many specs, meshes or test modules) call this between cases: every XLA:CPU executable
  keeps memory maps, and a process that runs out of them aborts inside LLVM.

  maps_above: clear only when the process maps more than this many regions (`memory_maps`), so a
  sweep can call it after every case and rebuild only when it must. Returns whether it cleared."""
  if maps_above is not None:
    maps = memory_maps()
    if maps is not None and maps <= maps_above:
      return False
  jax.clear_caches()
  gc.collect()
  return True


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


@functools.partial(jax.jit, static_argnames=("model", "sampler"))
def _uncached_step(params, tokens, lengths, key, fresh, *, model, sampler):
  """The whole prefix tokens [B, W] through the model into `fresh`, an empty full cache of W
  slots per layer (sliding layers masked to their window: the model's own attention)."""
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
  cache_plan: Any = None  # the `kvjax.runtime.CachePlan` the cache was resolved by

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


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """`generate`'s keywords, validated in one place (`build`).

  eos: the id that ends a row (-1: none); pad: the id written after a row's end.
  draft: the parsed draft spec (None: plain decoding). The rest are `generate`'s keywords.
  """

  max_new_tokens: int
  sampler: Sampler
  eos: int
  pad: int
  capacity: int | None = None
  cache_options: dict | None = None
  mesh: Any = None
  rules: Any = None
  on_tokens: Callable[[np.ndarray], None] | None = None
  stream_chunk: int = 1
  draft: Any = None  # a CacheSpec or a `kvjax.layouts.Layout`
  draft_tokens: int = 4
  draft_options: dict | None = None

  @property
  def extra(self) -> int:
    """Cache slots a row takes after its prompt: the last sampled token is never fed back, and a
    verification pass writes draft_tokens + 1 tokens before cropping."""
    return self.max_new_tokens - 1 + (self.draft_tokens + 1 if self.draft is not None else 0)

  @classmethod
  def build(cls, model, spec, *, max_new_tokens, sampler, eos_id, pad_id, stop_at_eos, draft,
            draft_tokens, mesh, capacity, **rest) -> "GenerateOptions":
    """The options of one call; raises for a bad keyword (`spec`: the parsed cache spec, None
    for a cache object)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(sampler, Sampler):
      raise TypeError(f"sampler must be a kvjax.Sampler, got {type(sampler).__name__}")
    runtime.check_capacity(capacity)
    tokenizer = getattr(model, "tokenizer", None)
    if eos_id is None and stop_at_eos and tokenizer is not None:
      eos_id = tokenizer.eos_id
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    if draft is not None:
      draft = _check_draft(spec, layouts.parse_request(draft), draft_tokens, mesh)
    if spec is not None and not spec.uses_cache and mesh is not None:
      raise ValueError("cache='none' (the uncached baseline) runs on one device; drop mesh=")
    return cls(max_new_tokens=int(max_new_tokens), sampler=sampler, pad=int(pad),
               eos=-1 if eos_id is None else int(eos_id), draft=draft, draft_tokens=draft_tokens,
               mesh=mesh, capacity=capacity, **rest)


def _check_draft(spec, draft, draft_tokens, mesh):
  if not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 1:
    raise ValueError(f"draft_tokens must be a positive int, got {draft_tokens!r}")
  if not draft.uses_cache or (spec is not None and not spec.uses_cache):
    raise ValueError("draft= needs a cache on both sides: neither cache nor draft may be 'none'")
  if mesh is not None:
    raise ValueError("draft= (self-speculative decoding) runs on one device; drop mesh=")
  return draft


@dataclasses.dataclass(frozen=True)
class _Run:
  """One `generate` call after its prefill: what the decode paths share.

  ids / lengths: the caller's prompts [B, P] / [B]; tokens / lengths_in: what the prefill was fed
  ([B'] rows with the mesh's padding rows, prompts padded to a bucket), placed on the devices.
  """

  handle: Any
  params: Any
  state: DecodeState
  plan: runtime.CachePlan
  ids: np.ndarray
  lengths: np.ndarray
  tokens: jax.Array
  lengths_in: jax.Array
  draft_cache: Any
  prefill_s: float
  before: dict


def generate(model, prompts, *, max_new_tokens: int, cache="full", capacity: int | None = None,
             sampler: Sampler = GREEDY, seed: int | jax.Array = 0, eos_id: int | None = None,
             pad_id: int | None = None, prompt_lengths=None, padding: str = "right",
             stop_at_eos: bool = True, on_tokens: Callable[[np.ndarray], None] | None = None,
             stream_chunk: int = 1, cache_options: dict | None = None, mesh=None,
             rules=None, draft=None, draft_tokens: int = 4,
             draft_options: dict | None = None, kernel: str = "auto") -> GenerateResult:
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
      distribution. `GenerateResult.draft_acceptance` = accepted / drafted tokens. A layout
      (`"int8@global"`, `"window:8@all"`) is a draft too. The main cache's window rings (sliding
      layers) keep draft_tokens + 1 slack slots so cropping rejected drafts loses nothing.
      draft_options: keyword arguments for the draft's `make_cache`.
    kernel: the main cache's decode attention kernel (`kvjax.kernels`): "auto" (the platform's
      choice; jnp on CPU; a given cache keeps its own setting), "jnp", or "pallas" (JAX's Pallas
      kernels where they apply; interpret mode on CPU, slow: for checking).

  The cache is built and placed by `kvjax.runtime.resolve`; `GenerateResult.cache_plan` says how.
  """
  check_model(model, "generate")
  given = runtime.is_cache(cache)
  if given:
    base.check_cache(cache, "generate")  # before the prompts: a wrong object is the first error
  spec = None if given else layouts.parse_request(cache)
  if kernels.check_kernel(kernel) != "auto":
    cache_options = {**(cache_options or {}), "kernel": kernel}
  opts = GenerateOptions.build(
      model, spec, max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id,
      stop_at_eos=stop_at_eos, draft=draft, draft_tokens=draft_tokens, mesh=mesh,
      capacity=capacity, rules=rules, cache_options=cache_options, on_tokens=on_tokens,
      stream_chunk=stream_chunk, draft_options=draft_options)
  ids, lengths = normalize_prompts(prompts, getattr(model, "tokenizer", None), prompt_lengths,
                                   padding)
  prompts_lib.check_vocab(ids, model.config.vocab_size)
  key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
  before = compile_stats()
  if spec is not None and not spec.uses_cache:
    return _generate_uncached(model, ids, lengths, key, opts, spec, before)
  run = _start(model, ids, lengths, cache, key, opts, before)
  if run.draft_cache is not None:
    return _generate_speculative(run, opts)
  return _generate_cached(run, opts)


def _start(model, ids, lengths, cache, key, opts: GenerateOptions, before) -> _Run:
  """Resolves the cache (and the draft's), places the inputs and runs the jitted prefill."""
  n_rows, width, longest = ids.shape[0], ids.shape[1], int(lengths.max())
  options = opts.cache_options
  if opts.draft is not None:
    # A verification pass writes draft_tokens + 1 tokens, then crops the rejected ones: a window
    # ring (a sliding layer's default cache) keeps that many more slots so the crop loses nothing.
    options = {"slack": opts.draft_tokens + 1, **(options or {})}
  kv, plan = runtime.resolve(
      model, cache, lengths=lengths, extra=opts.extra, capacity=opts.capacity, mesh=opts.mesh,
      rules=opts.rules, options=options, check="fixed", what="generate",
      demand=f"max_new_tokens={opts.max_new_tokens} with a {longest}-token prompt")
  draft_cache = None if opts.draft is None else _draft_cache(model, kv, lengths, plan, opts)
  # Padding tokens past the capacity are dropped by the cache's write, so the bucket may exceed it.
  tokens = np.zeros((plan.padded_batch, runtime.bucket(width)), np.int32)
  tokens[:, :width] = plan.pad_rows(ids)
  tokens, lengths_in = plan.rows(tokens), plan.rows(plan.pad_rows(lengths, 1))
  params, handle = plan.params(model.params), static_step(model)
  with Stopwatch() as clock:
    state = _prefill(params, tokens, lengths_in, kv, plan.replicate(key), np.int32(opts.eos),
                     model=handle, sampler=opts.sampler,
                     out_size=runtime.bucket(opts.max_new_tokens))
    if plan.padded_batch > n_rows:  # padding rows are finished from the start
      state = state.replace(done=state.done | plan.rows(np.arange(plan.padded_batch) >= n_rows))
    jax.block_until_ready(state)
  if opts.on_tokens is not None:
    opts.on_tokens(sharding.fetch(state.out)[:n_rows, :1])
  return _Run(handle=handle, params=params, state=state, plan=plan, ids=ids, lengths=lengths,
              tokens=tokens, lengths_in=lengths_in, draft_cache=draft_cache,
              prefill_s=clock.seconds, before=before)


def _generate_cached(run: _Run, opts: GenerateOptions) -> GenerateResult:
  """The plain decode loop: jitted `_decode` runs (to the end, or `stream_chunk` tokens at a time
  when streaming), a growable cache doubled between them when it fills."""
  state, clock, emitted, out_of_room = run.state, Stopwatch(), 1, False
  n_rows, max_new = run.plan.batch, opts.max_new_tokens
  while True:
    step = int(state.step)
    if step >= max_new or bool(jnp.all(state.done)):
      break
    if not bool(state.cache.has_room(1)):
      if not run.plan.growable:
        out_of_room = True
        break
      state = state.replace(cache=state.cache.grow(state.cache.capacity * 2))
    stop_at = max_new if opts.on_tokens is None else min(max_new, step + opts.stream_chunk)
    with clock:
      state = _decode(run.params, state, np.int32(stop_at), np.int32(opts.eos), np.int32(opts.pad),
                      model=run.handle, sampler=opts.sampler)
      jax.block_until_ready(state)
    if opts.on_tokens is not None:
      new_step = int(state.step)
      opts.on_tokens(sharding.fetch(state.out)[:n_rows, emitted:new_step])
      emitted = new_step
  n_gen = sharding.fetch(state.n_generated)[:n_rows]
  overflowed = sharding.fetch(state.cache.overflowed()).astype(bool)[:n_rows]
  if out_of_room:
    overflowed = overflowed | (~sharding.fetch(state.done)[:n_rows] & (n_gen < max_new))
  return _result(run, opts, sharding.fetch(state.out)[:n_rows], n_gen, state.cache, overflowed,
                 clock.seconds, sharding=run.plan.describe())


def _compiles_since(before: dict) -> dict:
  after = compile_stats()
  return dict(compile_s=after["compile_s"] - before["compile_s"],
              n_compiles=after["n_compiles"] - before["n_compiles"])


def _result(run: _Run, opts: GenerateOptions, out, n_gen, cache, overflowed, decode_s,
            **extra) -> GenerateResult:
  """The `GenerateResult` of a decode loop: out [B, >= max_new] ids, padded past n_gen."""
  max_new = opts.max_new_tokens
  out = out[:, :max_new]  # sliced in NumPy: no per-length compile
  out = np.where(np.arange(max_new)[None, :] < n_gen[:, None], out, opts.pad).astype(np.int32)
  return GenerateResult(tokens=out, n_generated=n_gen, prompt_ids=run.ids,
                        prompt_lengths=run.lengths, cache=cache, prefill_s=run.prefill_s,
                        decode_s=decode_s, spec=run.plan.label, overflowed=overflowed,
                        eos_id=None if opts.eos < 0 else opts.eos, cache_plan=run.plan,
                        **_compiles_since(run.before), **extra)


def _draft_cache(model, kv_cache, lengths, plan: runtime.CachePlan, opts: GenerateOptions):
  """The draft's empty cache (resolved for the main cache's need), after checking that both
  caches can be cropped."""
  if plan.growable:
    raise ValueError("draft=: a dynamic (growable) main cache is not supported; use 'full'")
  draft_cache, _ = runtime.resolve(model, opts.draft, lengths=lengths,
                                   extra=plan.needed - plan.prompt, options=opts.draft_options,
                                   check="prompt", what=f"draft={str(opts.draft)!r}")
  for what, cache in (("cache", kv_cache), ("draft", draft_cache)):
    if not base.supports(cache, "crop"):
      raise ValueError(f"draft=: the {what} kind {type(cache).__name__} cannot crop, which "
                       "speculative decoding needs to drop rejected tokens")
  return draft_cache


def _generate_speculative(run: _Run, opts: GenerateOptions) -> GenerateResult:
  """The decode loop of `generate(..., draft=...)`; see `kvjax.speculative`."""
  with Stopwatch() as clock:
    draft_cache = speculative.prefill_draft(run.params, run.tokens, run.lengths_in,
                                            run.draft_cache, model=run.handle)
    jax.block_until_ready(draft_cache)
  run = dataclasses.replace(run, prefill_s=run.prefill_s + clock.seconds)
  s = speculative.start(run.state, draft_cache)  # writes past max_new are dropped, never needed
  s, decode_s, emitted = _speculate(run, opts, s)
  max_new = opts.max_new_tokens
  n_gen = np.minimum(np.asarray(s.n_generated), max_new)
  if opts.on_tokens is not None and int(n_gen.max()) > emitted:
    opts.on_tokens(np.asarray(s.out)[:, emitted:int(n_gen.max())])
  overflowed = np.asarray(s.cache.overflowed()).astype(bool)
  overflowed |= ~np.asarray(s.done) & (n_gen < max_new)
  drafted = int(np.asarray(s.drafted).sum())
  return _result(run, opts, np.asarray(s.out), n_gen, s.cache, overflowed, decode_s,
                 draft_acceptance=int(np.asarray(s.accepted).sum()) / drafted if drafted else None,
                 draft_spec=str(opts.draft))


def _speculate(run: _Run, opts: GenerateOptions, s):
  """Runs verification rounds until every row is done or a cache is out of room; returns
  (state, decode seconds, columns streamed so far)."""
  clock, emitted, k, max_new = Stopwatch(), 1, opts.draft_tokens, opts.max_new_tokens
  while True:
    n_gen, done = np.asarray(s.n_generated), np.asarray(s.done)
    running = ~done & (n_gen < max_new)
    if not running.any():
      break
    if not (bool(s.cache.has_room(k + 1)) and bool(s.draft.has_room(k + 1))):
      break
    # Streaming: run until every running row has `stream_chunk` more tokens.
    stop_at = (max_new if opts.on_tokens is None
               else min(max_new, int(n_gen[running].min()) + opts.stream_chunk))
    with clock:
      s = speculative.speculate(run.params, s, np.int32(stop_at), np.int32(max_new),
                                np.int32(opts.eos), model=run.handle, sampler=opts.sampler, k=k)
      jax.block_until_ready(s)
    if opts.on_tokens is not None:  # columns every row has filled (or finished)
      n_gen, done = np.asarray(s.n_generated), np.asarray(s.done)
      ready = min(int(np.where(done, max_new, n_gen).min()), max_new)
      if ready > emitted:
        opts.on_tokens(np.asarray(s.out)[:, emitted:ready])
        emitted = ready
  return s, clock.seconds, emitted


def _generate_uncached(model, ids, lengths, key, opts: GenerateOptions, spec,
                       before) -> GenerateResult:
  """cache='none': every step feeds the whole prefix (padded to a multiple of 32) through the
  model into a fresh full cache."""
  batch, max_new = ids.shape[0], opts.max_new_tokens
  buf = np.zeros((batch, int(lengths.max()) + max_new + 32), np.int32)
  buf[:, :ids.shape[1]] = ids
  cur, out = lengths.copy(), np.full((batch, max_new), opts.pad, np.int32)
  done, n_gen = np.zeros(batch, bool), np.zeros(batch, np.int32)
  prefill_clock, decode_clock, handle = Stopwatch(), Stopwatch(), static_step(model)
  for step in range(max_new):
    width = -(-int(cur.max()) // 32) * 32
    with prefill_clock if step == 0 else decode_clock:
      fresh = runtime.make_cache("full@all", model, batch, width)
      token, key = _uncached_step(model.params, jnp.asarray(buf[:, :width]), jnp.asarray(cur), key,
                                  fresh, model=handle, sampler=opts.sampler)
      token = np.asarray(token)
    token = np.where(done, opts.pad, token)
    out[:, step] = token
    n_gen += ~done
    done |= token == opts.eos
    buf[np.arange(batch), cur] = token
    cur = cur + 1
    if opts.on_tokens is not None:
      opts.on_tokens(token[:, None])
    if done.all():
      break
  return GenerateResult(tokens=out, n_generated=n_gen, prompt_ids=ids, prompt_lengths=lengths,
                        cache=None, prefill_s=prefill_clock.seconds, decode_s=decode_clock.seconds,
                        spec=str(spec), overflowed=np.zeros(batch, bool),
                        eos_id=None if opts.eos < 0 else opts.eos, **_compiles_since(before))
