"""The kit catches broken caches: each deliberately broken kind fails `check_cache_kind` with the
right invariant named, and the same kinds without their bug pass.

The bugs are the ones caches really have: an off-by-one in a ring buffer's wrap-around, one row's
tokens leaking into another, one padding token written as if it were real (`t <= n_valid` for
`t < n_valid`: harmless until the ring wraps, so the kit must wrap it), the caller's array mutated,
positions reported wrong once tokens are evicted, jitted and eager code paths that disagree, the
caller's softmax `scale=` ignored, and `nbytes` under-reporting. The broken kinds are the full
cache and the test ring kind of tests/test_registry_kinds.py (with as many slots as the kit asks
for, 8 by default) with one thing changed each.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from kvjax.caches import base
from kvjax.caches.full import FullCache
from kvjax.testing import CacheKindError, check_cache_kind
from tests.test_registry_kinds import RingCache


@struct.dataclass
class BrokenFull(FullCache):
  """A full cache with one bug, named by the static field `bug`."""

  bug: str = struct.field(pytree_node=False, default="")

  def attend(self, layer, q, k, v, n_valid=None, *, rope=None, scale=None):
    if self.bug == "ignores-scale":
      scale = None  # always 1/sqrt(H)
    return super().attend(layer, q, k, v, n_valid, rope=rope, scale=scale)

  def write(self, layer, k, v, n_valid=None):
    if self.bug == "mutates-input" and isinstance(k, np.ndarray):
      k *= 1.001  # in place: the caller's array changes
    if self.bug == "jit-differs" and base.is_concrete(k):
      k = k + 1e-3  # the eager path stores something else than the traced one
    if self.bug == "row-leak" and self.batch > 1:
      slots = base.row_slots(self.lengths, k.shape[1])
      rows = jnp.arange(self.batch)[:, None]
      rows = jnp.where(rows == self.batch - 1, 0, rows)  # the last row writes over row 0
      return self.replace(k=self.k.at[layer, rows, :, slots, :].set(k.astype(self.k.dtype), mode="drop"),
                          v=self.v.at[layer, rows, :, slots, :].set(v.astype(self.v.dtype), mode="drop"))
    return super().write(layer, k, v, n_valid)

  def nbytes(self):
    out = super().nbytes()
    if self.bug == "nbytes":
      out["device"] //= 2
    return out


@struct.dataclass
class BrokenRing(RingCache):
  """The test ring kind with one bug, named by the static field `bug`."""

  bug: str = struct.field(pytree_node=False, default="")

  def _push(self, layer, k_t, v_t, pos_t, valid_t):
    if self.bug == "off-by-one":
      pos_t = pos_t + 1  # writes position p into the slot of p + 1
    return super()._push(layer, k_t, v_t, pos_t, valid_t)

  def write(self, layer, k, v, n_valid=None):
    if self.bug != "writes-padding":
      return super().write(layer, k, v, n_valid)
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1])
    cache = self
    for t in range(k.shape[1]):  # `<=`: the first padding token of a row is written too
      cache = cache._push(layer, k[:, t], v[:, t], self.lengths + t, t <= n_valid)
    return cache

  def supports(self, verb):
    if self.bug == "claims-crop" and verb == "crop":
      return True  # a wrapper that answers for its inner cache without asking it
    return super().supports(verb)

  def view(self):
    view = super().view()
    if self.bug == "positions":
      wrapped = (self.lengths > self.capacity)[None, :, None, None]
      view = view.replace(positions=jnp.where(wrapped & view.mask, view.positions + 1,
                                              view.positions))
    return view


def full_factory(bug, cls=None):
  def make(spec, config, *, batch, capacity, dtype):
    shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
    return (cls or BrokenFull)(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                      lengths=jnp.zeros((batch,), jnp.int32), block_size=capacity, bug=bug)
  make.__name__ = f"{'lossy-' if cls else ''}full[{bug or 'ok'}]"
  return make


def ring_factory(bug):
  def make(spec, config, *, batch, capacity, dtype):
    shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
    return BrokenRing(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                      lengths=jnp.zeros((batch,), jnp.int32), bug=bug)
  make.__name__ = f"ring[{bug or 'ok'}]"
  return make


BROKEN = [
    (ring_factory("off-by-one"), "contents"),
    (full_factory("row-leak"), "rows-independent"),
    (ring_factory("writes-padding"), "n_valid"),
    (full_factory("mutates-input"), "inputs-unchanged"),
    (ring_factory("positions"), "positions"),
    (full_factory("jit-differs"), "jit-equals-eager"),
    (full_factory("ignores-scale"), "attention"),
    (full_factory("nbytes"), "nbytes"),
    (ring_factory("claims-crop"), "protocol"),
]


def _assert_caught(factory, invariant, **kwargs):
  with pytest.raises(CacheKindError) as info:
    check_cache_kind(factory, max_examples=6, **kwargs)
  assert invariant in info.value.invariants, str(info.value)
  message = str(info.value)
  assert f"[{invariant}]" in message and "minimal failing example" in message
  return message


@pytest.mark.parametrize("factory,invariant", BROKEN, ids=lambda x: getattr(x, "__name__", x))
def test_each_bug_is_caught_by_its_invariant(factory, invariant):
  """The invariant meant for the bug, run alone, fails and names itself (fast)."""
  _assert_caught(factory, invariant, only=[invariant])


@pytest.mark.parametrize("factory,invariant", BROKEN, ids=lambda x: getattr(x, "__name__", x))
def test_each_bug_is_caught_and_named_by_the_whole_suite(factory, invariant, kvjax_kit):
  """The whole suite, as a user runs it, fails with the right invariant among those it names:
  the quick setting (one shape, 3 examples: the fast lane's) and the thorough one (slow lane)."""
  _assert_caught(factory, invariant, quick=kvjax_kit == "quick")


@pytest.mark.parametrize("factory", [full_factory(""), ring_factory("")], ids=lambda f: f.__name__)
def test_the_same_kinds_without_bugs_pass(factory):
  checked = check_cache_kind(factory, max_examples=4)
  assert {"contents", "positions", "n_valid", "rows-independent", "nbytes"} <= set(checked)


def test_a_kind_that_is_not_a_cache_is_refused():
  with pytest.raises(TypeError, match="not a kvjax cache"):
    check_cache_kind(lambda spec, config, **sizes: object())
  with pytest.raises(ValueError, match="unknown invariants"):
    check_cache_kind(full_factory(""), only=["no-such-invariant"])


@struct.dataclass
class LossyFull(BrokenFull):
  """The broken full cache declared lossy: the kit has no attention oracle for it."""

  exact = False


def test_a_lossy_kind_that_ignores_scale_is_caught():
  """Without an oracle the kit still checks `scale=`: attend(q, scale=s) must equal attend on
  q * s * sqrt(H) with the default scale."""
  message = _assert_caught(full_factory("ignores-scale", LossyFull), "attention",
                           only=["attention"], quick=True)
  assert "does not apply the caller's softmax scale" in message


@pytest.mark.slow
def test_the_one_padding_token_bug_is_caught_at_a_larger_capacity():
  """Streams grow with the capacity (WRAPS x capacity real tokens), so a ring of 16 slots wraps
  too: the quick setting catches the bug there as well."""
  _assert_caught(ring_factory("writes-padding"), "contents", quick=True, capacity=16,
                 only=["contents", "n_valid"])


def test_a_wrapper_claiming_a_verb_is_caught():
  """`caps.verbs` is checked against what the verbs do: a kind (a wrapper, typically) that claims
  `crop` while its crop raises NotImplementedError fails `protocol`, quick setting."""
  with pytest.raises(CacheKindError, match="claims 'crop'"):
    check_cache_kind(ring_factory("claims-crop"), quick=True, only=["protocol"])
