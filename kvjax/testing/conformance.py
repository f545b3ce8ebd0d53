"""`check_cache_kind`: the conformance suite every cache kind must pass, kvjax's and yours.

  from kvjax.testing import check_cache_kind

  check_cache_kind("sink:2+window:6")               # any spec string, built by kvjax.make_cache

  def make(spec, config, *, batch, capacity, dtype):  # kvjax.register_kind's factory signature
    return MyCache.init(...)                        # an empty cache of your kind

  def test_my_kind():
    check_cache_kind(make)                          # raises AssertionError naming what broke

The kind is a spec string (a registered kind's name or spec works too: "mykind", "mykind:64") or a
factory with `kvjax.register_kind`'s signature; the kit calls it with a small `LlamaConfig`
(`n_layers`, `n_kv_heads`, `head_dim`, and `n_heads` = 2 x `n_kv_heads`), the parsed `spec=` it
was given (None without one) and `options=` as keyword arguments. The six-argument factory
`factory(n_layers, batch, kv_heads, head_dim, capacity, dtype)` of earlier releases still works,
with a DeprecationWarning, for one release.

Each invariant is a hypothesis property over ragged append streams (padding filled with large
garbage so a leak shows), random shapes from a small fixed set, and random queries; a violation is
shrunk to a minimal example. Streams give every row at least `WRAPS` (3) x the cache's capacity
real tokens, in steps of 1, 2 or 5 tokens (longer streams, not new shapes): an evicting kind evicts
and wraps around several times whatever capacity it was built with, a limited kind fills up and
overflows. The kind's declared capabilities decide which invariants apply:

  protocol          the members of `kvjax.KVCache` exist, sizes match what was asked, a new cache
                    is empty, `lossless_tokens` (if declared) is an int in [1, capacity]
  contents          every held token is what was appended at its position (exact kinds), or within
                    the kind's `error_bound` (lossy kinds; relative to the largest |value| of its
                    (layer, row, kv head) stream); kinds whose view is not what was appended
                    (`share:G`) declare `error_bound = None` and skip this
  positions         mask == (positions >= 0); held positions unique and below `lengths`; `lengths`
                    counts the real tokens; `filled()` counts what is held; a limited kind holds
                    exactly positions [0, min(lengths, capacity)), an evicting kind its newest token
  n_valid           padding (t >= n_valid[b]) changes nothing, whatever its values, in `append`
                    and in `attend`
  rows-independent  a row's contents do not depend on what the other rows were given
  inputs-unchanged  `append` / `attend` leave the arrays they were given, and the old cache, intact
  jit-equals-eager  jitted `append` / `attend` equal eager ones
  chunk-exact       (kinds declaring `chunk_exact`) T tokens in one `attend` give every query what
                    one-by-one feeding would, and leave the same cache
  attention         `attend(..., scale=s)` with a softmax scale s other than the default: exact
                    kinds return softmax attention with scale s over exactly what the cache then
                    holds (GQA, rope=None), and limited exact kinds, with RoPE, full causal
                    attention; other kinds return what the default scale gives for queries
                    multiplied by s * sqrt(H), so `scale=` is never ignored
  reset             `reset()` empties the cache; what follows equals a fresh cache
  crop / reorder    (kinds that support them) as documented in `kvjax.caches.base`
  overflow          limited kinds: outside jit `kvjax.append` raises `CapacityError`; inside jit the
                    extra tokens are dropped (never clamped onto a slot), `lengths` keeps counting
                    and `overflowed()` flags exactly those rows. Evicting kinds never overflow.
  budget            an evicting kind never holds more than its capacity
  nbytes            `nbytes()` adds up to the bytes of the cache's arrays
  model-forward     (exact kinds) a small Llama decoded through the kind (MHA, GQA, MQA) gives the
                    logits of the plain NumPy forward over the first `lossless_tokens` tokens (at
                    most 10). `lossless_tokens` is the number of tokens a row can hold before its
                    view stops being exactly the whole context; default: `capacity`. A kind that
                    drops a token earlier (a sparse policy, per-layer budgets) must declare it.

A `HybridCache` (`kvjax.caches.hybrid`: groups of layers of different kinds, as Gemma 3's window
rings beside full global layers) is judged layer by layer where limited and evicting differ: each
layer by its own group's `limited` and capacity in `positions`, `budget`, `overflow` (an evicting
group goes on evicting while a limited one overflows) and the RoPE full-attention check (limited
layers only); streams stop, and `overflowed()` is expected, at the smallest capacity of its
limited groups.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn
from kvjax.caches import api, base
from kvjax.testing import oracle
from kvjax.testing import strategies as kst

try:
  from hypothesis import HealthCheck, Phase, given, settings
  from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised only without the test extra
  raise ImportError("kvjax.testing needs hypothesis: pip install 'kvjax[test]'") from e

INVARIANTS = ("protocol", "contents", "positions", "n_valid", "rows-independent",
              "inputs-unchanged", "jit-equals-eager", "chunk-exact", "attention", "reset", "crop",
              "reorder", "overflow", "budget", "nbytes", "model-forward")
GROUP = 2  # query heads per kv head in the attention checks (GQA)
WRAPS = 3  # streams give every row at least WRAPS x capacity real tokens
SCALE = 0.5  # the attention checks' softmax scale is SCALE / sqrt(H), not the default 1 / sqrt(H)
# Steps of this many tokens go through `attend` in `n_valid` and the lossy `attention` check: the
# shape `jit-equals-eager` compiles attend for anyway, so they add no compiled program of it.
ATTEND_TOKENS = 2
# Invariants whose examples are costly and vary little: a few suffice.
_EXAMPLE_CAPS = {"protocol": 2, "model-forward": 2, "inputs-unchanged": 3, "jit-equals-eager": 4}


class CacheKindError(AssertionError):
  """A kind violated invariants; `violations` lists (invariant, message with a minimal example)."""

  def __init__(self, kind: str, violations: list[tuple[str, str]]):
    self.kind = kind
    self.violations = violations
    lines = [f"cache kind {kind} violates {len(violations)} invariant(s): "
             + ", ".join(name for name, _ in violations)]
    for name, message in violations:
      lines.append(f"\n[{name}] {message}")
    super().__init__("\n".join(lines))

  @property
  def invariants(self) -> list[str]:
    return [name for name, _ in self.violations]


class _Violation(AssertionError):
  def __init__(self, invariant: str, message: str):
    super().__init__(f"[{invariant}] {message}")
    self.invariant = invariant


def _require(condition, invariant: str, message: str):
  if not condition:
    raise _Violation(invariant, message)


# ---------------------------------------------------------------------------------------------
# What was appended, and what the cache shows
# ---------------------------------------------------------------------------------------------
class TokenLog:
  """The real tokens appended to each row, in order: the truth a cache's view is checked against."""

  def __init__(self, batch: int):
    self.rows: list[list] = [[] for _ in range(batch)]

  def append(self, k: np.ndarray, v: np.ndarray, n_valid):
    """k, v [L, B, K, T, H]."""
    for b, n in enumerate(n_valid):
      for t in range(int(n)):
        self.rows[b].append((k[:, b, :, t], v[:, b, :, t]))

  def crop(self, length: int):
    self.rows = [row[:length] for row in self.rows]

  def lengths(self) -> np.ndarray:
    return np.array([len(r) for r in self.rows])

  def scale(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """max |k|, max |v| per (layer, kv head) of row b's stream: [L, K] each."""
    ks = np.stack([k for k, _ in self.rows[b]]) if self.rows[b] else np.zeros((1, 1, 1))
    vs = np.stack([v for _, v in self.rows[b]]) if self.rows[b] else np.zeros((1, 1, 1))
    return np.abs(ks).max(axis=(0, 3)), np.abs(vs).max(axis=(0, 3))


@jax.jit
def _jit_view(cache) -> base.CacheView:
  return api.view(cache)  # one program per kind and shape, not a dispatch per op at every step


def _numpy_view(cache) -> dict:
  view = _jit_view(cache)
  return {"keys": np.asarray(view.keys, np.float32), "values": np.asarray(view.values, np.float32),
          "mask": np.asarray(view.mask), "positions": np.asarray(view.positions)}


def _held(view: dict, l: int, b: int, h: int) -> tuple[np.ndarray, np.ndarray]:
  """(slots, positions) that (layer, row, kv head) holds."""
  slots = np.flatnonzero(view["mask"][l, b, h])
  return slots, view["positions"][l, b, h, slots]


def _stored(x: np.ndarray, dtype) -> np.ndarray:
  """x as a cache of `dtype` would store it (exact kinds store a cast)."""
  return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))


def _layer_caps(cache) -> list[tuple[bool, int]]:
  """(limited, capacity) per layer. A `HybridCache`'s layers are judged by their own group (a
  window ring beside a full group evicts while the full group fills up); every other kind's layers
  by the cache as a whole."""
  from kvjax.caches.hybrid import HybridCache

  if isinstance(cache, HybridCache):
    return [(bool(cache.groups[g].caps.limited), int(cache.groups[g].capacity))
            for g, _ in cache.where]
  return [(bool(cache.limited), int(cache.capacity))] * cache.n_layers


def _limit(cache) -> int:
  """The tokens a row of a limited kind holds before it overflows: the capacity, or for a hybrid
  the smallest capacity of its limited groups (its evicting groups never overflow)."""
  limits = [cap for limited, cap in _layer_caps(cache) if limited]
  return min(limits) if limits else int(cache.capacity)


def _check_positions(cache, view, log: TokenLog, invariant: str = "positions",
                     limited_only: bool = False):
  lengths = np.asarray(cache.lengths)
  _require(np.array_equal(lengths, log.lengths()), invariant,
           f"lengths {lengths.tolist()} but the rows were given {log.lengths().tolist()} real tokens")
  _require(np.array_equal(view["mask"], view["positions"] >= 0), invariant,
           "view().mask differs from view().positions >= 0")
  n_layers, batch, kv_heads = view["mask"].shape[:3]
  filled = np.asarray(cache.filled())
  _require(filled.shape == (batch,), invariant, f"filled() has shape {filled.shape}, not [B]")
  caps = _layer_caps(cache)
  for b in range(batch):
    most = 0
    for l in range(n_layers):
      limited, capacity = caps[l]
      for h in range(kv_heads):
        _, pos = _held(view, l, b, h)
        most = max(most, pos.size)
        if limited_only and not limited:
          continue
        where = f"(layer {l}, row {b}, kv head {h})"
        _require(np.unique(pos).size == pos.size, invariant, f"{where} holds position(s) twice: {sorted(pos.tolist())}")
        _require(pos.size == 0 or (pos.min() >= 0 and pos.max() < lengths[b]), invariant,
                 f"{where} holds positions {sorted(pos.tolist())} but only {lengths[b]} tokens were given")
        if limited:
          want = np.arange(min(lengths[b], capacity))
          _require(np.array_equal(np.sort(pos), want), invariant,
                   f"{where} of a limited kind holds {sorted(pos.tolist())}; it must hold exactly "
                   f"[0, {want.size}) (every token up to the capacity {capacity})")
        elif lengths[b]:
          _require(lengths[b] - 1 in pos, invariant,
                   f"{where} does not hold its newest token (position {lengths[b] - 1}); held: "
                   f"{sorted(pos.tolist())}")
    _require(filled[b] == most, invariant, f"filled()[{b}] = {filled[b]} but row {b} holds {most} tokens")


def _check_budget(cache, view):
  held = view["mask"].sum(axis=-1)  # [L, B, K]
  for l, (limited, capacity) in enumerate(_layer_caps(cache)):
    if limited:
      continue
    _require(held[l].max(initial=0) <= capacity, "budget",
             f"an evicting kind holds {held[l].max()} tokens in one (layer, row, kv head) (layer "
             f"{l}); its capacity is {capacity}")


def _check_contents(cache, view, log: TokenLog, dtype, layers=None):
  """layers: the layers to check (default: all)."""
  bound = cache.caps.error_bound
  if bound is None:
    return
  n_layers, batch, kv_heads = view["mask"].shape[:3]
  for b in range(batch):
    if not log.rows[b]:
      continue
    k_scale, v_scale = log.scale(b)
    for l in (range(n_layers) if layers is None else layers):
      for h in range(kv_heads):
        slots, pos = _held(view, l, b, h)
        if not slots.size:
          continue
        want_k = np.stack([log.rows[b][p][0][l, h] for p in pos])
        want_v = np.stack([log.rows[b][p][1][l, h] for p in pos])
        got_k, got_v = view["keys"][l, b, h, slots], view["values"][l, b, h, slots]
        where = f"(layer {l}, row {b}, kv head {h})"
        for what, got, want, scale in (("keys", got_k, want_k, k_scale[l, h]),
                                       ("values", got_v, want_v, v_scale[l, h])):
          if bound == 0:
            want = _stored(want, dtype)
            bad = np.argwhere(got != want)
          else:
            bad = np.argwhere(np.abs(got - want) > bound * scale + 1e-5)
          if bad.size:
            i = bad[0][0]
            raise _Violation("contents",
                             f"{where}: slot {slots[i]} claims position {pos[i]} but its {what} "
                             f"{np.round(got[i][:4], 4).tolist()}... differ from what was appended "
                             f"there {np.round(want[i][:4], 4).tolist()}..."
                             + ("" if bound == 0 else f" by more than the kind's error bound {bound}"))


# ---------------------------------------------------------------------------------------------
# Running a kind
# ---------------------------------------------------------------------------------------------
_jit_append = jax.jit(api.append)


@functools.partial(jax.jit, static_argnames=("rope", "scale"))
def _jit_attend_all(cache, q, k, v, n_valid, rope=None, scale=None):
  return _attend_all(cache, q, k, v, n_valid, rope, scale)


def _attend_all(cache, q, k, v, n_valid, rope=None, scale=None):
  """What a model's forward does: attend every layer in order, then advance.

  q [L, B, T, N, H], k/v [L, B, T, K, H]; returns (out [L, B, T, N, H], cache)."""
  outs = []
  for layer in range(cache.n_layers):
    out, cache = cache.attend(layer, q[layer], k[layer], v[layer], n_valid, rope=rope, scale=scale)
    outs.append(out)
  return jnp.stack(outs), cache.advance(n_valid)


def _kit_scale(head_dim: int) -> float:
  """The softmax scale the attention checks pass to `attend`: not the default 1 / sqrt(H)."""
  return SCALE / math.sqrt(head_dim)


def _random_qkv(rng, shape: kst.CacheShape, step: kst.AppendStep):
  """q [L, B, T, N, H], k, v [L, B, T, K, H] with garbage in the padding."""
  k, v = kst.random_tokens(rng, shape, step)  # [L, B, K, T, H]
  q = rng.standard_normal((shape.n_layers, shape.batch, step.tokens, shape.kv_heads * GROUP,
                           shape.head_dim)).astype(np.float32)
  return q, k.transpose(0, 1, 3, 2, 4), v.transpose(0, 1, 3, 2, 4)


@dataclasses.dataclass
class _Kit:
  build: Callable  # build(config, batch, capacity) -> an empty cache of the kind
  dtype: object
  shapes: object
  examples: int
  name: str
  capacities: dict = dataclasses.field(default_factory=dict)
  verbs_ok: bool = False  # the claimed verbs were checked once (they belong to the kind, not a shape)

  def new(self, shape: kst.CacheShape):
    return self.build(shape.config(GROUP), shape.batch, shape.capacity)

  def min_tokens(self, shape: kst.CacheShape) -> int:
    """Real tokens every row of a stream gets: WRAPS x the capacity of the cache `shape` builds."""
    if shape not in self.capacities:
      self.capacities[shape] = int(self.new(shape).capacity)
    return WRAPS * self.capacities[shape]

  def run(self, invariant: str, strategy, body) -> str | None:
    """Runs `body(*drawn)` as a hypothesis property; returns the violation message or None."""
    examples = min(self.examples, _EXAMPLE_CAPS.get(invariant, self.examples))
    config = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), print_blob=False,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink])

    @config
    @given(strategy)
    def prop(drawn):
      body(*drawn)

    try:
      prop()
    except Exception as e:  # a violation, or the kind crashing on valid input: both are reported
      notes = [n for n in getattr(e, "__notes__", []) if "Falsifying" in n or "drawn=" in n]
      message = str(e) if isinstance(e, _Violation) else f"raised {type(e).__name__}: {e}"
      prefix = f"[{invariant}] "
      message = message[len(prefix):] if message.startswith(prefix) else message
      detail = "\n".join(notes) or "(no example recorded)"
      return f"{message}\n  minimal failing example: {detail}"
    return None


def _stream(kit: _Kit, batch=None, tokens=(1, 2, 5), max_steps=None):
  """(shape, steps, seed): a long stream (every row gets `kit.min_tokens(shape)` real tokens),
  or, with `max_steps`, 1 to max_steps steps (for the costly eager invariants)."""
  shapes = kit.shapes if batch is None else kit.shapes.map(
      lambda s: dataclasses.replace(s, batch=batch))
  if max_steps is not None:
    steps = lambda s: kst.append_steps(s.batch, 1, max_steps, tokens)
  else:
    steps = lambda s: kst.append_stream(s.batch, kit.min_tokens(s), tokens)
  return shapes.flatmap(lambda s: st.tuples(st.just(s), steps(s), st.integers(0, 2**16)))


# ---- the invariants --------------------------------------------------------------------------------
def _check_verbs(cache, caps) -> None:
  """A verb the kind does not claim must say so (NotImplementedError), and one it claims must not:
  a wrapper claims only what the caches it wraps allow."""
  calls = {"crop": lambda: cache.crop(jnp.zeros((cache.batch,), jnp.int32)),
           "reorder": lambda: cache.reorder(jnp.arange(cache.batch)),
           "grow": lambda: cache.grow(2 * cache.capacity)}
  for verb, call in calls.items():
    claimed = verb in caps.verbs
    try:
      call()
      works = True
    except NotImplementedError:
      works = False
    except Exception:  # the verb exists but refuses these arguments (a full cache's grow, ...)
      works = True
    _require(works == claimed, "protocol",
             f"caps.verbs {'claims' if claimed else 'omits'} {verb!r} but {verb}() "
             f"{'raises NotImplementedError' if not works else 'works'}"
             " (a wrapper must claim only what the caches it wraps allow)")


def _protocol(kit: _Kit, shape: kst.CacheShape, *_):
  cache = kit.new(shape)
  missing = base.missing_members(cache)
  _require(not missing, "protocol", f"{type(cache).__name__} lacks {missing}")
  caps = cache.caps
  _require(isinstance(caps, base.Capabilities), "protocol",
           f"caps must be a kvjax.caches.base.Capabilities, got {type(caps).__name__}")
  for flag in ("limited", "exact", "chunk_exact", "growable"):
    _require(isinstance(getattr(caps, flag), bool), "protocol", f"caps.{flag} must be a bool")
  if not kit.verbs_ok:  # stays False on failure, so hypothesis sees the same failure on replay
    _check_verbs(cache, caps)
    kit.verbs_ok = True
  sizes = (cache.n_layers, cache.batch, cache.kv_heads, cache.head_dim)
  want = (shape.n_layers, shape.batch, shape.kv_heads, shape.head_dim)
  _require(sizes == want, "protocol", f"(n_layers, batch, kv_heads, head_dim) = {sizes}, asked {want}")
  _require(tuple(dataclasses.astuple(cache.sizes)) == sizes + (cache.capacity,), "protocol",
           f"sizes = {cache.sizes} disagrees with the n_layers, batch, ... members")
  view = _numpy_view(cache)
  _require(view["keys"].shape[:3] == want[:3] and view["keys"].shape[-1] == shape.head_dim,
           "protocol", f"view().keys has shape {view['keys'].shape}, not [L, B, K, S, H]")
  _require(not view["mask"].any() and not np.asarray(cache.lengths).any()
           and not np.asarray(cache.filled()).any(), "protocol", "a new cache is not empty")
  lossless = caps.lossless_tokens
  _require(isinstance(lossless, (int, np.integer)) and 1 <= lossless <= cache.capacity, "protocol",
           f"lossless_tokens = {lossless!r}; it must be an int in [1, capacity = {cache.capacity}] "
           "(the tokens a row holds before its view stops being the whole context)")


def _feed(kit: _Kit, shape, steps, seed, on_step):
  rng = np.random.default_rng(seed)
  cache, log = kit.new(shape), TokenLog(shape.batch)
  for step in steps:
    k, v = kst.random_tokens(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    if cache.limited and (log.lengths() + n_valid > _limit(cache)).any():
      break  # overflow has its own invariant
    cache = _jit_append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid))
    log.append(k, v, n_valid)
    on_step(cache, log)
  return cache, log


def _contents(kit, shape, steps, seed):
  _feed(kit, shape, steps, seed, lambda c, log: _check_contents(c, _numpy_view(c), log, kit.dtype))


def _positions(kit, shape, steps, seed):
  _feed(kit, shape, steps, seed, lambda c, log: _check_positions(c, _numpy_view(c), log))


def _budget(kit, shape, steps, seed):
  _feed(kit, shape, steps, seed, lambda c, log: _check_budget(c, _numpy_view(c)))


def _same_held(a: dict, b: dict, invariant: str, what: str, rows=None):
  rows = range(a["mask"].shape[1]) if rows is None else rows
  for r in rows:
    _require(np.array_equal(a["mask"][:, r], b["mask"][:, r])
             and np.array_equal(a["positions"][:, r], b["positions"][:, r]), invariant,
             f"row {r} holds other positions {what}")
    held = a["mask"][:, r]
    for key in ("keys", "values"):
      _require(np.array_equal(a[key][:, r][held], b[key][:, r][held]), invariant,
               f"row {r} holds other {key} {what}")


def _n_valid(kit, shape, steps, seed):
  """The same real tokens with two different paddings: identical caches and real outputs.
  Steps of ATTEND_TOKENS tokens go through `attend`, the others through `append`."""
  rng = np.random.default_rng(seed)
  one, two = kit.new(shape), kit.new(shape)
  for i, step in enumerate(steps):
    use_attend = step.tokens == ATTEND_TOKENS
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    if one.limited and (np.asarray(one.lengths) + n_valid > _limit(one)).any():
      break
    k2, v2, q2 = k.copy(), v.copy(), q.copy()
    for b, n in enumerate(step.n_valid):
      k2[:, b, n:], v2[:, b, n:], q2[:, b, n:] = -3e3, 7e3, 5e2
    if use_attend:
      out1, one = _jit_attend_all(one, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid))
      out2, two = _jit_attend_all(two, jnp.asarray(q2), jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(n_valid))
      for b, n in enumerate(step.n_valid):
        _require(np.allclose(np.asarray(out1)[:, b, :n], np.asarray(out2)[:, b, :n], atol=1e-5),
                 "n_valid", f"attend step {i}: row {b}'s real queries changed with the padding's values")
    else:
      t = lambda x: jnp.asarray(x.transpose(0, 1, 3, 2, 4))
      one = _jit_append(one, t(k), t(v), jnp.asarray(n_valid))
      two = _jit_append(two, t(k2), t(v2), jnp.asarray(n_valid))
    real = np.sum([s.n_valid for s in steps[:i + 1]], axis=0)
    for cache in (one, two):
      _require(np.array_equal(np.asarray(cache.lengths), real), "n_valid",
               f"after step {i}, lengths {np.asarray(cache.lengths).tolist()} do not count the real "
               f"tokens only ({real.tolist()})")
    _same_held(_numpy_view(one), _numpy_view(two), "n_valid",
               f"after step {i} ({'attend' if use_attend else 'append'} of {step.tokens} tokens, "
               f"n_valid {list(step.n_valid)}) when only the padding's values differ")


def _rows_independent(kit, shape, steps, seed):
  """Row 0 holds the same whatever rows 1.. were given."""
  rng = np.random.default_rng(seed)
  one, two = kit.new(shape), kit.new(shape)
  for i, step in enumerate(steps):
    k, v = kst.random_tokens(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    other = kst.AppendStep(step.tokens, (step.n_valid[0],) + tuple(
        int(x) for x in rng.integers(0, step.tokens + 1, shape.batch - 1)))
    k2, v2 = kst.random_tokens(rng, shape, other)
    k2[:, 0], v2[:, 0] = k[:, 0], v[:, 0]
    n2 = np.array(other.n_valid, np.int32)
    if one.limited and max((np.asarray(one.lengths) + n_valid).max(),
                           (np.asarray(two.lengths) + n2).max()) > _limit(one):
      break
    one = _jit_append(one, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid))
    two = _jit_append(two, jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(n2))
    _same_held(_numpy_view(one), _numpy_view(two), "rows-independent",
               f"after step {i} when the other rows were given other tokens", rows=[0])


def _snapshot(*trees):
  return [np.array(x, copy=True) for t in trees for x in jax.tree_util.tree_leaves(t)]


def _inputs_unchanged(kit, shape, steps, seed):
  rng = np.random.default_rng(seed)
  cache = kit.new(shape)
  for i, step in enumerate(steps):
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    if cache.limited and (np.asarray(cache.lengths) + n_valid > _limit(cache)).any():
      break
    k5, v5 = k.transpose(0, 1, 3, 2, 4).copy(), v.transpose(0, 1, 3, 2, 4).copy()
    before = _snapshot(cache, k5, v5, n_valid)
    appended = api.append(cache, k5, v5, n_valid)
    after = _snapshot(cache, k5, v5, n_valid)
    _require(all(np.array_equal(x, y) for x, y in zip(before, after)), "inputs-unchanged",
             f"append (step {i}) changed its input arrays or the cache it was given")
    before = _snapshot(cache, q[0], k[0], v[0], n_valid)
    cache.attend(0, q[0], k[0], v[0], n_valid, rope=None)
    after = _snapshot(cache, q[0], k[0], v[0], n_valid)
    _require(all(np.array_equal(x, y) for x, y in zip(before, after)), "inputs-unchanged",
             f"attend (step {i}) changed its input arrays or the cache it was given")
    cache = appended


def _close_trees(a, b, atol) -> bool:
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
      return False
    if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
      if not np.allclose(x.astype(np.float32), y.astype(np.float32), atol=atol, rtol=1e-5):
        return False
    elif not np.array_equal(x, y):
      return False
  return True


def _jit_equals_eager(kit, shape, steps, seed):
  rng = np.random.default_rng(seed)
  eager = jitted = kit.new(shape)
  bound = jitted.caps.error_bound or 0.0
  for i, step in enumerate(steps):
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = jnp.asarray(step.n_valid, jnp.int32)
    if eager.limited and (np.asarray(eager.lengths) + np.asarray(n_valid) > _limit(eager)).any():
      break
    if i % 2 == 0:
      t = lambda x: jnp.asarray(x.transpose(0, 1, 3, 2, 4))
      eager = api.append(eager, t(k), t(v), n_valid)
      jitted = _jit_append(jitted, t(k), t(v), n_valid)
      what = "append"
    else:
      out_e, eager = _attend_all(eager, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), n_valid)
      out_j, jitted = _jit_attend_all(jitted, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), n_valid)
      what = "attend"
      real = np.arange(step.tokens)[None, :] < np.asarray(n_valid)[:, None]  # [B, T]
      _require(np.allclose(np.asarray(out_e)[:, real], np.asarray(out_j)[:, real],
                           atol=1e-4 + 20 * bound), "jit-equals-eager",
               f"step {i}: jitted attend's output differs from eager")
    view_e, view_j = _numpy_view(eager), _numpy_view(jitted)
    scale = max(np.abs(view_e["keys"]).max(initial=0), np.abs(view_e["values"]).max(initial=0), 1.0)
    _require(_close_trees(view_e, view_j, 1e-5 + 2 * bound * scale), "jit-equals-eager",
             f"step {i}: the cache after jitted {what} differs from eager {what}")


def _chunk_exact(kit, shape, steps, seed):
  """Each row's tokens in the chunks of `steps` vs the same tokens one at a time."""
  rng = np.random.default_rng(seed)
  rope, scale = attn.RoPE(shape.head_dim, 10000.0), _kit_scale(shape.head_dim)
  chunked = stepwise = kit.new(shape)
  bound = chunked.caps.error_bound or 0.0
  for i, step in enumerate(steps):
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    if chunked.limited and (np.asarray(chunked.lengths) + n_valid > _limit(chunked)).any():
      break
    out_c, chunked = _jit_attend_all(chunked, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.asarray(n_valid), rope=rope, scale=scale)
    out_c = np.asarray(out_c)
    for t in range(step.tokens):
      nv = (n_valid > t).astype(np.int32)
      sl = lambda x: jnp.asarray(x[:, :, t:t + 1])
      out_s, stepwise = _jit_attend_all(stepwise, sl(q), sl(k), sl(v), jnp.asarray(nv), rope=rope,
                                        scale=scale)
      out_s = np.asarray(out_s)
      for b in np.flatnonzero(nv):
        _require(np.allclose(out_c[:, b, t], out_s[:, b, 0], atol=1e-4 + 4 * bound), "chunk-exact",
                 f"step {i} ({step.tokens} tokens, n_valid {list(step.n_valid)}): row {b}, token {t}"
                 f" sees something else in the chunk than fed alone (max diff "
                 f"{np.abs(out_c[:, b, t] - out_s[:, b, 0]).max():.2e})")
  view_c, view_s = _numpy_view(chunked), _numpy_view(stepwise)
  _require(np.array_equal(view_c["positions"], view_s["positions"]), "chunk-exact",
           "chunked feeding leaves other positions held than token-by-token feeding")
  scale = max(np.abs(view_s["keys"]).max(initial=0), 1.0)
  held = view_c["mask"]
  for key in ("keys", "values"):
    _require(np.allclose(view_c[key][held], view_s[key][held], atol=1e-5 + 4 * bound * scale),
             "chunk-exact", f"chunked feeding leaves other {key} than token-by-token feeding")


def _scaled(q: np.ndarray, scale: float) -> np.ndarray:
  """q such that the oracle's default scale 1/sqrt(H) applied to it is `scale` applied to q."""
  return q * (scale * math.sqrt(q.shape[-1]))


def _held_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray):
  """Oracle attention of one row's query q [N, H] over what it holds: keys, values [S, K, H],
  mask [K, S]; each kv head's group of GROUP query heads reads its own held slots. -> [N, H]."""
  return np.concatenate([oracle.attention(
      q[h * GROUP:(h + 1) * GROUP][None], keys[:, h:h + 1], values[:, h:h + 1], mask[h][None])[0]
      for h in range(keys.shape[1])])


def _scale_hint(got, want_default, atol) -> str:
  """A note for the attention message when the output is what the default scale would give."""
  return (" (it equals attention with the default scale 1/sqrt(H): `scale=` is ignored)"
          if np.allclose(got, want_default, atol=atol) else "")


def _attention(kit, shape, steps, seed):
  """Token by token: each output is oracle attention, with the kit's softmax scale, over what the
  cache holds after the call."""
  rng = np.random.default_rng(seed)
  scale = _kit_scale(shape.head_dim)
  cache = kit.new(shape)
  for i, step in enumerate(steps):
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    for t in range(step.tokens):
      nv = (n_valid > t).astype(np.int32)
      if cache.limited and (np.asarray(cache.lengths) + nv > _limit(cache)).any():
        return
      sl = lambda x: jnp.asarray(x[:, :, t:t + 1])
      out, cache = _jit_attend_all(cache, sl(q), sl(k), sl(v), jnp.asarray(nv), scale=scale)
      out, view = np.asarray(out), _numpy_view(cache)
      for l in range(shape.n_layers):
        for b in np.flatnonzero(nv):
          mask = view["mask"][l, b]  # [K, S]
          keys = view["keys"][l, b].transpose(1, 0, 2)  # [S, K, H]
          values = view["values"][l, b].transpose(1, 0, 2)
          got = out[l, b, 0]
          want = _held_attention(_scaled(q[l, b, t], scale), keys, values, mask)
          if not np.allclose(got, want, atol=1e-4):
            raise _Violation(
                "attention", f"step {i}, token {t}: layer {l} row {b} attends to something other "
                f"than what the cache holds after the call, with softmax scale {scale:.4g} (max "
                f"diff {np.abs(got - want).max():.2e})"
                + _scale_hint(got, _held_attention(q[l, b, t], keys, values, mask), 1e-4))


def _attention_scale(kit, shape, steps, seed):
  """Kinds without an oracle (lossy): attend(q, scale=s) equals attend(q * s * sqrt(H)) with the
  default scale, on two caches given the same tokens (steps of ATTEND_TOKENS tokens)."""
  rng = np.random.default_rng(seed)
  scale = _kit_scale(shape.head_dim)
  one = two = kit.new(shape)
  for i, step in enumerate(steps):
    q, k, v = (jnp.asarray(x) for x in _random_qkv(rng, shape, step))
    n_valid = np.array(step.n_valid, np.int32)
    if one.limited and (np.asarray(one.lengths) + n_valid > _limit(one)).any():
      return
    out1, one = _jit_attend_all(one, q, k, v, jnp.asarray(n_valid), scale=scale)
    out2, two = _jit_attend_all(two, jnp.asarray(_scaled(np.asarray(q), scale)), k, v,
                                jnp.asarray(n_valid))
    real = np.arange(step.tokens)[None, :] < n_valid[:, None]  # [B, T]
    got, want = np.asarray(out1)[:, real], np.asarray(out2)[:, real]
    if not np.allclose(got, want, atol=1e-4):
      raise _Violation(
          "attention", f"step {i}: attend(q, scale={scale:.4g}) differs from "
          f"attend(q * {scale * math.sqrt(shape.head_dim):.4g}) with the default scale (max diff "
          f"{np.abs(got - want).max():.2e}): the kind does not apply the caller's softmax scale")


def _attention_rope_full(kit, shape, steps, seed):
  """Limited exact kinds: with RoPE, outputs equal full causal attention over all tokens."""
  rng = np.random.default_rng(seed)
  theta = 10000.0
  rope, scale = attn.RoPE(shape.head_dim, theta), _kit_scale(shape.head_dim)
  cache = kit.new(shape)
  seen_q, seen_k, seen_v = [[] for _ in range(shape.batch)], [[] for _ in range(shape.batch)], \
      [[] for _ in range(shape.batch)]
  for i, step in enumerate(steps):
    q, k, v = _random_qkv(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    if (np.asarray(cache.lengths) + n_valid > _limit(cache)).any():
      return
    out, cache = _jit_attend_all(cache, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                 jnp.asarray(n_valid), rope=rope, scale=scale)
    out, caps = np.asarray(out), _layer_caps(cache)
    for b, n in enumerate(step.n_valid):
      for t in range(n):
        seen_q[b].append(q[:, b, t]), seen_k[b].append(k[:, b, t]), seen_v[b].append(v[:, b, t])
      for l in range(shape.n_layers):
        total = len(seen_q[b])
        if not n or not caps[l][0]:  # a hybrid's evicting layers hold a window, not every token
          continue
        pos = np.arange(total)
        qs = _scaled(oracle.rope(np.stack([x[l] for x in seen_q[b]]), pos, theta), scale)
        ks = oracle.rope(np.stack([x[l] for x in seen_k[b]]), pos, theta)
        vs = np.stack([x[l] for x in seen_v[b]])
        want = oracle.attention(qs, ks, vs, pos[:, None] >= pos[None, :])[total - n:]
        _require(np.allclose(out[l, b, :n], want, atol=1e-4), "attention",
                 f"step {i}: layer {l} row {b} with RoPE and softmax scale {scale:.4g} differs "
                 f"from full causal attention over every token (max diff "
                 f"{np.abs(out[l, b, :n] - want).max():.2e})")


def _reset(kit, shape, steps, seed):
  cache, _ = _feed(kit, shape, steps, seed, lambda *_: None)
  empty = cache.reset()
  view = _numpy_view(empty)
  _require(not view["mask"].any() and not np.asarray(empty.lengths).any()
           and not np.asarray(empty.filled()).any(), "reset", "reset() left tokens in the cache")
  again, _ = _feed(kit, shape, steps, seed + 1, lambda *_: None)
  fresh_feed = _feed(dataclasses.replace(kit, build=lambda *a: empty), shape, steps, seed + 1,
                     lambda *_: None)[0]
  _same_held(_numpy_view(again), _numpy_view(fresh_feed), "reset",
             "after reset() and the same appends as a fresh cache")


def _crop(kit, shape, steps, seed):
  cache, log = _feed(kit, shape, steps, seed, lambda *_: None)
  most = int(np.asarray(cache.lengths).max(initial=0))
  length = np.random.default_rng(seed).integers(0, most + 2)
  cropped = cache.crop(int(length))
  log.crop(int(length))
  view = _numpy_view(cropped)
  want = np.minimum(np.asarray(cache.lengths), length)
  _require(np.array_equal(np.asarray(cropped.lengths), want), "crop",
           f"crop({length}) left lengths {np.asarray(cropped.lengths).tolist()}, not {want.tolist()}")
  _require(not (view["positions"] >= length).any(), "crop",
           f"crop({length}) still holds positions >= {length}")
  if cache.limited:
    _check_positions(cropped, view, log, invariant="crop", limited_only=True)
  _check_contents(cropped, view, log, kit.dtype)


def _reorder(kit, shape, steps, seed):
  cache, _ = _feed(kit, shape, steps, seed, lambda *_: None)
  rng = np.random.default_rng(seed)
  index = rng.integers(0, shape.batch, shape.batch)
  moved = cache.reorder(jnp.asarray(index, jnp.int32))
  old, new = _numpy_view(cache), _numpy_view(moved)
  _require(np.array_equal(np.asarray(moved.lengths), np.asarray(cache.lengths)[index]), "reorder",
           f"reorder({index.tolist()}) did not move lengths with the rows")
  for key in old:
    _require(np.array_equal(new[key], old[key][:, index]), "reorder",
             f"reorder({index.tolist()}): row b does not hold what row index[b] held ({key})")


def _overflow(kit, shape, steps, seed):
  rng = np.random.default_rng(seed)
  cache = kit.new(shape)
  log = TokenLog(shape.batch)
  eager = cache
  for i, step in enumerate(steps):
    k, v = kst.random_tokens(rng, shape, step)
    n_valid = np.array(step.n_valid, np.int32)
    cache = _jit_append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid))
    log.append(k, v, n_valid)
    lengths = log.lengths()
    _require(np.array_equal(np.asarray(cache.lengths), lengths), "overflow",
             f"step {i}: lengths {np.asarray(cache.lengths).tolist()} stopped counting at the "
             f"capacity ({lengths.tolist()} tokens given)")
    over = np.asarray(cache.overflowed())
    if cache.limited:
      limit = _limit(cache)
      _require(np.array_equal(over, lengths > limit), "overflow",
               f"step {i}: overflowed() = {over.tolist()} with lengths {lengths.tolist()} and "
               f"capacity {limit}")
      log_capped = TokenLog(shape.batch)
      log_capped.rows = [row[:limit] for row in log.rows]
      view = _numpy_view(cache)
      held = view["mask"].sum(-1)
      caps = _layer_caps(cache)
      limited_layers = [l for l, (limited, _) in enumerate(caps) if limited]
      for l, (_, capacity) in enumerate(caps):
        _require(held[l].max(initial=0) <= capacity, "overflow", "holds more than its capacity")
      # limited layers hold tokens [0, limit) only; evicting layers of a hybrid go on evicting
      _check_contents(cache, view, log_capped, kit.dtype, limited_layers)
      if len(limited_layers) < len(caps):
        _check_contents(cache, view, log, kit.dtype,
                        [l for l in range(len(caps)) if l not in limited_layers])
      if eager is not None:
        try:
          eager = api.append(eager, k, v, n_valid)
        except base.CapacityError:
          _require((lengths > limit).any(), "overflow",
                   f"step {i}: CapacityError although every row fits")
          eager = None
        else:
          _require(not (lengths > limit).any(), "overflow",
                   f"step {i}: kvjax.append outside jit let rows past the capacity "
                   f"{limit} ({lengths.tolist()}) without a CapacityError")
      _require(cache.fits(limit) and not cache.fits(limit + 1), "overflow",
               "fits(n) does not say whether n tokens fit the capacity")
    else:
      _require(not over.any(), "overflow", f"step {i}: an evicting kind reports overflowed()")
      _require(bool(cache.has_room(10**6)) and cache.fits(10**9), "overflow",
               "an evicting kind reports no room (it should evict instead)")


def _nbytes(kit, shape, steps, seed):
  cache, _ = _feed(kit, shape, steps, seed, lambda *_: None)
  reported = sum(cache.nbytes().values())
  actual = sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
  _require(reported == actual, "nbytes", f"nbytes() reports {reported} bytes; the arrays hold {actual}")


@dataclasses.dataclass(frozen=True)
class _TinyConfig:
  vocab_size: int = 48
  dim: int = 32
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 16
  ffn_dim: int = 48
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position: int = 512
  name: str = "kit"


@functools.lru_cache(maxsize=4)
def _tiny_llama(kv_heads: int):
  """(config, abstract param tree, jitted step) of a 2-layer Llama with 4 query heads over
  `kv_heads` kv heads: MHA (4), GQA (2), MQA (1). Nothing is compiled until the step runs."""
  from kvjax.models import config as config_lib
  from kvjax.models import llama

  cfg = config_lib.LlamaConfig(**dataclasses.asdict(_TinyConfig(n_kv_heads=kv_heads)))
  shapes = jax.eval_shape(lambda: llama.Llama(cfg, jnp.float32).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return cfg, shapes, jax.jit(llama.LlamaDecoder(cfg, jnp.float32).step)


def _tiny_params(shapes, seed: int):
  """Weights drawn with NumPy (normal 0.1; norm scales near 1), float32."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape) if len(s.shape) > 1
                            else 1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)


def _model_forward(kit, shape, steps, seed):
  """A 2-layer Llama, MHA, GQA and MQA, decoded one token at a time through the kind, against
  the float64 NumPy forward (chunked feeding is `chunk-exact`'s business)."""
  for kv_heads in (4, 2, 1):
    cfg, shapes, step = _tiny_llama(kv_heads)
    params = _tiny_params(shapes, seed)
    cache = kit.build(cfg, 1, max(shape.capacity, 8))
    # The longest stream a row holds whole (sparse kinds and per-layer budgets declare it).
    lossless = cache.caps.lossless_tokens
    declared_here = getattr(type(cache), "lossless_tokens", None) is not base.CacheBase.lossless_tokens
    n = min(lossless, 10)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, n)
    want = oracle.llama_forward(cfg, params, tokens)
    got = []
    for t in range(n):
      logits, cache = step(params, jnp.asarray(tokens[None, t:t + 1]), cache, jnp.array([1], jnp.int32))
      got.append(np.asarray(logits[0]))
    got = np.concatenate(got)
    scale = np.abs(want).max()
    bad = np.flatnonzero(~np.isclose(got, want, atol=1e-4 * scale).all(axis=-1))
    if bad.size:
      declared = (f"lossless_tokens = {lossless}" if declared_here else
                  f"no lossless_tokens, so the capacity {cache.capacity}")
      raise _Violation(
          "model-forward", f"a Llama with {kv_heads} kv heads for 4 query heads, decoded token by "
          f"token through the kind, differs from the plain forward from token {bad[0]} of {n} on "
          f"(max diff {np.abs(got - want).max():.2e}, logits up to {scale:.2f}). The kit decodes "
          f"as many tokens as the kind says a row holds whole ({declared}, at most 10): if its "
          f"view stops being the whole context earlier (a sparse policy, per-layer budgets), "
          f"declare `lossless_tokens`, the tokens a row can hold before that happens")


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def applicable(cache) -> list[str]:
  """The invariants that apply to a kind, from its declared capabilities."""
  names = ["protocol", "contents", "positions", "n_valid", "rows-independent", "inputs-unchanged",
           "jit-equals-eager"]
  if cache.chunk_exact:
    names.append("chunk-exact")
  names += ["attention", "reset"]
  if base.supports(cache, "crop"):
    names.append("crop")
  if base.supports(cache, "reorder"):
    names.append("reorder")
  names += ["overflow", "budget", "nbytes"]
  if cache.exact:
    names.append("model-forward")
  return names


QUICK_EXAMPLES = 3  # examples per invariant with quick=True
_NEW_FORM = "factory(spec, config, *, batch, capacity, dtype)"
_OLD_FORM = "factory(n_layers, batch, kv_heads, head_dim, capacity, dtype)"


def is_legacy_factory(factory) -> bool:
  """True for the deprecated six-argument kind factory `factory(n_layers, batch, kv_heads,
  head_dim, capacity, dtype)`: six or more positional parameters without defaults (or *args), no
  keyword-only `batch` and no parameter named `config`, where `kvjax.register_kind`'s form is
  `factory(spec, config, *, batch, capacity, dtype)`."""
  try:
    params = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):  # a builtin or C callable: assume the current form
    return False
  if any(p.name == "config" or (p.name == "batch" and p.kind == p.KEYWORD_ONLY) for p in params):
    return False
  required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
  return len(required) >= 6 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _options_for(options) -> Callable:
  """options (None, a dict, or a callable config -> dict) as a callable config -> dict."""
  if options is None:
    return lambda config: {}
  if callable(options):
    return options
  if isinstance(options, dict):
    return lambda config: dict(options)
  raise TypeError(f"check_cache_kind: options must be a dict or a callable config -> dict, got "
                  f"{type(options).__name__}")


def _builder(kind, spec, options, dtype) -> tuple[Callable, str]:
  """(build(config, batch, capacity) -> empty cache, the kind's name) for what the caller gave."""
  from kvjax import spec as spec_lib

  extra = _options_for(options)
  legacy_spec = getattr(kind, "_kvjax_spec", None)  # a (deprecated) `spec_factory` factory
  if legacy_spec is not None:
    kind, extra = legacy_spec
  if isinstance(kind, (str, spec_lib.CacheSpec)):
    if spec is not None:
      raise TypeError("check_cache_kind: spec= is for a factory; the kind is already a spec "
                      f"({str(kind)!r})")
    parsed = spec_lib.parse_spec(kind)

    def build(config, batch, capacity):  # a bounded kind gets at least its budget
      return spec_lib.make_cache(parsed, config, batch, max(capacity, parsed.budget or 0), dtype,
                                 **extra(config))

    return build, str(parsed)
  if not callable(kind):
    raise TypeError(f"check_cache_kind: the kind must be a spec string or a factory "
                    f"{_NEW_FORM}, got {type(kind).__name__}")
  name = getattr(kind, "__name__", "kind")
  if is_legacy_factory(kind):
    if spec is not None or options is not None:
      raise TypeError(f"check_cache_kind: spec= and options= need a factory of the form "
                      f"{_NEW_FORM}")
    warnings.warn(
        f"check_cache_kind({name}): the six-argument {_OLD_FORM} is deprecated and goes away in "
        f"the next release. Write it as kvjax.register_kind's {_NEW_FORM}, reading n_layers, "
        f"n_kv_heads and head_dim from config, or pass a spec string: "
        f"check_cache_kind('sink:2+window:6')", DeprecationWarning, stacklevel=3)
    return (lambda config, batch, capacity: kind(config.n_layers, batch, config.n_kv_heads,
                                                 config.head_dim, capacity, dtype)), name
  parsed = None if spec is None else spec_lib.parse_spec(spec)
  return (lambda config, batch, capacity: kind(parsed, config, batch=batch, capacity=capacity,
                                               dtype=dtype, **extra(config))), name


def check_cache_kind(kind, *, spec=None, options=None, name: str | None = None,
                     dtype=jnp.float32, head_dim: int = 16, capacity: int = 8, shapes=None,
                     max_examples: int = 6, only=None, skip=(), quick: bool = False) -> list[str]:
  """Runs the conformance suite on one cache kind; returns the names of the invariants checked.

  kind: a spec string ("sink:2+window:6", or a registered kind's "mykind:64"), built with
    `kvjax.make_cache`, or a factory with `kvjax.register_kind`'s signature
    `factory(spec, config, *, batch, capacity, dtype, **options) -> an empty cache`. `config` is a
    small `LlamaConfig` (`strategies.CacheShape.config`: n_layers, n_kv_heads, head_dim, n_heads);
    `spec` the parsed `spec=` argument (None without one). The six-argument
    `factory(n_layers, batch, kv_heads, head_dim, capacity, dtype)` is deprecated (a
    DeprecationWarning) and still works for one release.
  options: make_cache's / the factory's keyword extras: a dict, or a callable config -> dict for
    extras that depend on the sizes (calibration maps).
  head_dim, capacity: what the kind is asked for (a quantized kind needs a head dim its group
    divides; a bounded spec gets at least its budget; an evicting kind may size itself from its
    budget instead). Streams give each row WRAPS x the built cache's capacity real tokens, so a
    larger capacity means longer streams, never other shapes. shapes: a strategy of
    `strategies.CacheShape` to draw from instead (default: 2 layers, batch 1 or 3, 1 or 2 kv heads).
  max_examples: hypothesis examples per invariant. only / skip: names from `INVARIANTS`.
  quick: a cheap run for a development loop: one shape (2 layers, batch 3, 2 kv heads) and at
    most `QUICK_EXAMPLES` examples per invariant, so a kind compiles a few executables, not one
    set per shape. Every invariant still runs; the thorough default searches wider.

  Raises `CacheKindError` (an AssertionError) naming every violated invariant, each with its
  message and the minimal failing example hypothesis shrank it to.
  """
  unknown = (set(only or ()) | set(skip)) - set(INVARIANTS)
  if unknown:
    raise ValueError(f"check_cache_kind: unknown invariants {sorted(unknown)}; known: {INVARIANTS}")
  build, kind_name = _builder(kind, spec, options, jnp.dtype(dtype))
  if shapes is None:
    shapes = kst.cache_shapes(n_layers=(2,), head_dims=(head_dim,), capacities=(capacity,),
                              **({"batch": (3,), "kv_heads": (2,)} if quick else {}))
  if quick:
    max_examples = min(max_examples, QUICK_EXAMPLES)
  kit = _Kit(build, dtype, shapes, max_examples, name or kind_name)
  probe = kit.new(kst.CacheShape(2, 1, 1, head_dim, capacity))
  base.check_cache(probe, "check_cache_kind")
  names = [n for n in applicable(probe) if (only is None or n in only) and n not in skip]
  bodies = _invariant_bodies(kit, probe)
  violations = []
  for invariant in names:
    strategy, body = bodies[invariant]
    message = kit.run(invariant, strategy, body)
    if message is not None:
      violations.append((invariant, message))
  if violations:
    raise CacheKindError(kit.name, violations)
  return names


def _invariant_bodies(kit: _Kit, probe) -> dict:
  """invariant name -> (strategy of examples, the check run on each), for the kind of `probe`."""
  long = _stream(kit)
  return {
      "protocol": (kit.shapes.map(lambda s: (s,)), lambda s: _protocol(kit, s)),
      "contents": (long, functools.partial(_contents, kit)),
      "positions": (long, functools.partial(_positions, kit)),
      "n_valid": (long, functools.partial(_n_valid, kit)),
      "rows-independent": (_stream(kit, batch=3), functools.partial(_rows_independent, kit)),
      # eager calls compile op by op and run slowly: few shapes, few steps
      "inputs-unchanged": (_stream(kit, max_steps=2, tokens=(2,)),
                           functools.partial(_inputs_unchanged, kit)),
      "jit-equals-eager": (_stream(kit, max_steps=3, tokens=(2,)),
                           functools.partial(_jit_equals_eager, kit)),
      "chunk-exact": (_stream(kit, tokens=(1, 3)), functools.partial(_chunk_exact, kit)),
      "attention": (_stream(kit, tokens=(1, 2, 3) if probe.exact else (ATTEND_TOKENS,)),
                    (functools.partial(_attention_scale, kit) if not probe.exact else
                     functools.partial(_attention, kit) if not probe.limited else
                     lambda *a: (_attention(kit, *a), _attention_rope_full(kit, *a)))),
      "reset": (long, functools.partial(_reset, kit)),
      "crop": (long, functools.partial(_crop, kit)),
      "reorder": (long, functools.partial(_reorder, kit)),
      "overflow": (_stream(kit, tokens=(5,)), functools.partial(_overflow, kit)),
      "budget": (_stream(kit, tokens=(5,)), functools.partial(_budget, kit)),
      "nbytes": (long, functools.partial(_nbytes, kit)),
      "model-forward": (st.tuples(kit.shapes, st.just([]), st.integers(0, 3)),
                        functools.partial(_model_forward, kit)),
  }
