"""The kit catches broken caches: each deliberately broken kind fails `check_cache_kind` with the
right invariant named, and the same kinds without their bug pass.

The bugs are the ones caches really have: an off-by-one in a ring buffer's wrap-around, one row's
tokens leaking into another, padding written as if it were real (n_valid ignored), the caller's
array mutated, positions reported wrong once tokens are evicted, jitted and eager code paths that
disagree, and `nbytes` under-reporting. The broken kinds are the full cache and the test ring kind
of tests/test_registry_kinds.py with one thing changed each.
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
    if self.bug == "writes-padding":
      valid_t = jnp.ones_like(valid_t)  # padding tokens overwrite held ones
    return super()._push(layer, k_t, v_t, pos_t, valid_t)

  def view(self):
    view = super().view()
    if self.bug == "positions":
      wrapped = (self.lengths > self.capacity)[None, :, None, None]
      view = view.replace(positions=jnp.where(wrapped & view.mask, view.positions + 1,
                                              view.positions))
    return view


def full_factory(bug):
  def make(n_layers, batch, kv_heads, head_dim, capacity, dtype):
    shape = (n_layers, batch, kv_heads, capacity, head_dim)
    return BrokenFull(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                      lengths=jnp.zeros((batch,), jnp.int32), block_size=capacity, bug=bug)
  make.__name__ = f"full[{bug or 'ok'}]"
  return make


def ring_factory(bug):
  def make(n_layers, batch, kv_heads, head_dim, capacity, dtype):
    shape = (n_layers, batch, kv_heads, 6, head_dim)
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
    (full_factory("nbytes"), "nbytes"),
]


def _assert_caught(factory, invariant, **kwargs):
  with pytest.raises(CacheKindError) as info:
    check_cache_kind(factory, max_examples=6, **kwargs)
  assert invariant in info.value.invariants, str(info.value)
  message = str(info.value)
  assert f"[{invariant}]" in message and "minimal failing example" in message


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
    check_cache_kind(lambda *args: object())
  with pytest.raises(ValueError, match="unknown invariants"):
    check_cache_kind(full_factory(""), only=["no-such-invariant"])
