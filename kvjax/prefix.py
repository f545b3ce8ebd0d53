"""Prefix caching: a prompt prefix shared by many requests is prefilled once and reused.

  store = kvjax.prefix.PrefixStore(max_bytes=256 << 20)
  out = generate_with_prefix(model, system_ids, [q1_ids, q2_ids, q3_ids], max_new_tokens=32,
                             store=store)

How (fixed shapes throughout, so each step is one jitted executable per bucket):
  1. `prefill_prefix`: the prefix goes through the model once, at batch 1, into an empty cache of
     the requested spec (`extend`, a jitted `Llama.apply` on an existing cache).
  2. `broadcast`: the batch-1 cache becomes B identical rows (`cache.reorder(zeros(B))`, a gather
     along the batch axis of every cache array; works for every kind that implements `reorder`).
     On pages (a `PagedStorage` cache, i.e. `paged:P`, over a `page_table.PageTable`) nothing
     is copied: the store keeps only the prefix's pages (`PagedCache.compact`, over
     `page_table.compact`) and
     the B rows point at them (`PagedCache.widen`, over `page_table.widen`); a row copies a
     shared page only when it writes into it (`page_table.reserve`'s copy-on-write).
  3. each row's suffix is prefilled on top, ragged (right-padded, `n_valid` = suffix lengths),
     by decode's own prefill, and decode's `while_loop` generates from there.

`PrefixStore` keeps prefilled batch-1 caches keyed by (step function, weights fingerprint, dtype,
spec, prefix token tuple), least recently used first out, within a byte budget measured by `cache.nbytes()`; a hit
skips step 1. A stored cache is never donated or modified (broadcasting copies it).

Invariants (tests/test_prefix.py): for any prefix and ragged suffixes, the tokens equal
`kvjax.generate` on prefix + suffix (greedy) and the cache holds the same tokens; a store hit gives
the same tokens as a miss; the store's bytes never exceed its budget and evict least recently used
first; stored caches and inputs are left unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import decode, layouts, prompts, runtime
from kvjax.caches import base, hybrid
from kvjax import spec as spec_lib
from kvjax.caches.base import supports
from kvjax.models.protocol import check_model, model_dtype, static_step
from kvjax.sampling import GREEDY, Sampler


@functools.partial(jax.jit, static_argnames=("model",))
def _extend(params, tokens, n_valid, cache, *, model):
  """Feeds tokens [B, T] (n_valid [B] real) through the model on top of `cache`; returns the cache."""
  _, cache = model.step_last(params, tokens, cache, n_valid)
  return cache


@jax.jit
def _checksums(leaves):
  """Three moments of every leaf (sum, sum of squares, position-weighted sum), in float32."""
  def moments(x):
    x = x.astype(jnp.float32).reshape(-1)
    weight = (jax.lax.iota(jnp.int32, x.size) % 251 + 1).astype(jnp.float32)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * weight)])
  return [moments(x) for x in leaves]


_FINGERPRINTS: dict = {}


def params_fingerprint(params) -> tuple:
  """A key that tells weights apart: the tree structure, every leaf's shape and dtype, and a
  checksum of its contents. Computed once per params object (remembered while its arrays live),
  so the same weights loaded twice share prefilled prefixes and different weights never do."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  ids = tuple(id(x) for x in leaves)
  entry = _FINGERPRINTS.get(ids)
  if entry is not None and all(ref() is not None for ref in entry[0]):
    return entry[1]
  for key in [k for k, (refs, _) in _FINGERPRINTS.items() if any(r() is None for r in refs)]:
    del _FINGERPRINTS[key]
  sums = np.asarray(jnp.stack(_checksums([jnp.asarray(x) for x in leaves])))
  fingerprint = (str(treedef), tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves),
                 sums.tobytes())
  try:
    _FINGERPRINTS[ids] = ([weakref.ref(x) for x in leaves], fingerprint)
  except TypeError:  # leaves that cannot be weakly referenced (NumPy arrays): not remembered
    pass
  return fingerprint


def extend(model, cache, tokens, n_valid=None):
  """Runs the model over tokens [B, T] on top of `cache` (a new cache; `cache` is not modified).

  The prompt is padded to decode's prompt bucket so repeated calls share executables.
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  batch, t = tokens.shape
  n_valid = np.full(batch, t, np.int32) if n_valid is None else np.asarray(n_valid, np.int32)
  padded = np.zeros((batch, runtime.bucket(t)), np.int32)
  padded[:, :t] = tokens
  return _extend(model.params, jnp.asarray(padded), jnp.asarray(n_valid), cache,
                 model=static_step(model))


def prefill_prefix(model, prefix_ids, *, cache="full", capacity: int, **cache_options):
  """A batch-1 cache of the given spec holding the prefix tokens (1-D ids)."""
  return _prefill(model, prefix_ids, cache, capacity, capacity, cache_options)


def _prefill(model, prefix_ids, cache, capacity, needed: int, cache_options,
             what: str = "prefill_prefix"):
  """The prefix through the model into a batch-1 cache resolved for a row of `needed` tokens
  (the kind's default capacity for that when `capacity` is None; a paged pool of its pages)."""
  prefix_ids = prompts.token_row(prefix_ids, getattr(model, "tokenizer", None),
                                 what="prefill_prefix: the prefix")
  prompts.check_vocab(prefix_ids, model.config.vocab_size)
  empty, _ = runtime.resolve(model, cache, lengths=[prefix_ids.size],
                             extra=max(needed - prefix_ids.size, 0), capacity=capacity,
                             options=cache_options, check="prompt", what=what, row="prefix")
  return extend(model, empty, prefix_ids[None])


def _room_for(prefilled, needed: int, hit: bool, demand: str):
  """The prefilled cache with room for rows of `needed` tokens: a stored (or growable) one too
  small is grown outside jit when its kind can grow (the stored copy is then replaced)."""
  if (not prefilled.fits(needed) and (hit or prefilled.caps.growable)
      and supports(prefilled, "grow")):
    prefilled = prefilled.grow(runtime.bucket(needed))
  if not prefilled.fits(needed):
    raise decode.CapacityError(f"{demand} need {needed} slots; the cache holds "
                               f"{prefilled.capacity}")
  return prefilled


def broadcast(cache, batch: int, room: int = 0):
  """B copies of the single row of a batch-1 cache (fixed shapes: a gather along the batch axis).

  A paged cache instead gives B rows that point at the same pages (nothing is copied), in a pool
  with `room` more tokens' worth of pages per row."""
  if cache.batch != 1:
    raise ValueError(f"broadcast: expected a batch-1 cache, got batch {cache.batch}")
  if isinstance(cache, hybrid.HybridCache):  # each group of layers on its own (paged ones widen)
    return _per_group(cache, lambda c: broadcast(c, batch, room))
  if isinstance(cache, base.PagedStorage):
    return cache.widen(batch, room)
  return cache.reorder(jnp.zeros((batch,), jnp.int32))


def _per_group(cache, fn):
  """fn over each group of a `HybridCache` (a layout's cache), or over the cache itself."""
  if isinstance(cache, hybrid.HybridCache):
    return cache.replace(groups=tuple(fn(c) for c in cache.groups))
  return fn(cache)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------
class PrefixStore:
  """LRU store of prefilled batch-1 caches within `max_bytes` (sum of their `nbytes()`).

  A cache bigger than the whole budget is not stored. `hits` / `misses` count lookups.
  """

  def __init__(self, max_bytes: int):
    if not isinstance(max_bytes, int) or max_bytes <= 0:
      raise ValueError(f"PrefixStore: max_bytes must be a positive int, got {max_bytes!r}")
    self.max_bytes = max_bytes
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self.hits = 0
    self.misses = 0

  @staticmethod
  def key(model, spec, prefix_ids) -> tuple:
    """(step function, weights fingerprint, dtype, spec, prefix ids): a hit needs the same
    computation on the same weights at the same dtype, not merely the same config."""
    return (static_step(model), params_fingerprint(model.params), str(model_dtype(model)),
            str(layouts.parse_request(spec)), tuple(int(i) for i in np.asarray(prefix_ids).reshape(-1)))

  @staticmethod
  def _size(cache) -> int:
    return int(sum(cache.nbytes().values()))

  @property
  def nbytes(self) -> int:
    return sum(size for _, size in self._entries.values())

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key) -> bool:
    return key in self._entries

  def get(self, key):
    """The stored cache (marked most recently used) or None."""
    entry = self._entries.get(key)
    if entry is None:
      self.misses += 1
      return None
    self.hits += 1
    self._entries.move_to_end(key)
    return entry[0]

  def put(self, key, cache) -> bool:
    """Stores `cache` under `key`, evicting least recently used entries to fit. False if too big."""
    size = self._size(cache)
    self._entries.pop(key, None)
    if size > self.max_bytes:
      return False
    while self._entries and self.nbytes + size > self.max_bytes:
      self._entries.popitem(last=False)
    self._entries[key] = (cache, size)
    return True

  def clear(self):
    self._entries.clear()


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrefixResult(decode.GenerateResult):
  """`GenerateResult` (prompt_ids / prompt_lengths: the suffixes) plus: prefix_hit (the prefilled prefix came from the store), prefix_s (its
  prefill, 0 on a hit), suffix_s (broadcast + suffix prefill). prefill_s = time to first token."""

  prefix_hit: bool = False
  prefix_s: float = 0.0
  suffix_s: float = 0.0


def generate_with_prefix(model, prefix_ids, suffixes, *, max_new_tokens: int, cache="full",
                         capacity: int | None = None, store: PrefixStore | None = None,
                         sampler: Sampler = GREEDY, seed: int | jax.Array = 0,
                         eos_id: int | None = None, pad_id: int | None = None,
                         stop_at_eos: bool = True, **cache_options) -> PrefixResult:
  """Generates for B requests prefix + suffixes[b], prefilling the prefix once (or not at all on a
  store hit). Same tokens as `kvjax.generate(model, [prefix + s for s in suffixes], ...)`.

  prefix_ids: 1-D token ids; suffixes: see `decode.normalize_prompts` (strings need a tokenizer,
  every suffix needs at least one token). capacity: slots per row of a newly prefilled prefix
  (default: enough for the prefix, the longest suffix and max_new_tokens, bucketed); a stored cache
  with too few slots is grown when its kind can grow, a larger one is used as is.
  """
  check_model(model, "generate_with_prefix")
  cfg = model.config
  tokenizer = getattr(model, "tokenizer", None)
  spec = layouts.parse_request(cache)  # a spec or a layout (`kvjax.layouts`)
  if not spec.uses_cache:
    raise spec_lib.SpecError("prefix caching needs a cache; 'none' keeps nothing to reuse")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  prefix_ids = np.asarray(prefix_ids, np.int32).reshape(-1)
  ids, lengths = decode.normalize_prompts(suffixes, tokenizer)
  prompts.check_vocab(ids, cfg.vocab_size)
  batch = ids.shape[0]
  needed = prefix_ids.size + int(lengths.max()) + max_new_tokens - 1

  start = time.perf_counter()
  store_key = PrefixStore.key(model, spec, prefix_ids) if store is not None else None
  prefilled = store.get(store_key) if store is not None else None
  hit = prefilled is not None
  if not hit:
    prefilled = _prefill(model, prefix_ids, spec, capacity, needed, cache_options,
                         what="generate_with_prefix")
    prefilled = _per_group(prefilled, lambda c: c.compact() if isinstance(c, base.PagedStorage)
                           else c)  # keep the prefix's pages only
    jax.block_until_ready(prefilled)
  prefix_s = time.perf_counter() - start
  prefilled = _room_for(prefilled, needed, hit, f"prefix of {prefix_ids.size} tokens, suffixes up "
                        f"to {int(lengths.max())} and max_new_tokens={max_new_tokens}")
  if store is not None:
    store.put(store_key, prefilled)

  t0 = time.perf_counter()
  rows = jax.block_until_ready(broadcast(prefilled, batch, room=needed - prefix_ids.size))
  broadcast_s = time.perf_counter() - t0
  result = decode.generate(model, ids, prompt_lengths=lengths, max_new_tokens=max_new_tokens,
                           cache=rows, sampler=sampler, seed=seed, eos_id=eos_id, pad_id=pad_id,
                           stop_at_eos=stop_at_eos)
  suffix_s = broadcast_s + result.prefill_s
  fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(decode.GenerateResult)}
  fields.update(prefill_s=prefix_s + suffix_s, spec=str(spec))
  return PrefixResult(**fields, prefix_hit=hit, prefix_s=prefix_s, suffix_s=suffix_s)
