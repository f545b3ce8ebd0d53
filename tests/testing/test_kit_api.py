"""How a kind reaches the kit, and what the kit promises about its streams and its messages.

* One factory signature: the kit takes a spec string (built with `kvjax.make_cache`) or a factory
  with `kvjax.register_kind`'s signature `factory(spec, config, *, batch, capacity, dtype)`; the
  six-argument factory of earlier releases (and `spec_factory`) still work, with a
  DeprecationWarning that shows the new form.
* Streams drive every kind past its capacity: each row gets `WRAPS` x capacity real tokens,
  whatever capacity the kind was given, in steps of the same few sizes.
* `lossless_tokens`: a sparse exact kind that does not declare it fails `model-forward` with a
  message that names it, and passes once it does; the docs say what it means.

Each check runs one or two invariants on the quick shape: cheap enough for the fast lane.
"""

from __future__ import annotations

import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax.testing import CacheKindError, check_cache_kind, conformance, spec_factory
from kvjax.testing import strategies as kst
from tests.test_registry_kinds import RingCache

ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_ring(spec, config, *, batch, capacity, dtype, slots=None):
  """A ring of `slots` (default: the capacity asked for) in the register_kind form."""
  slots = slots or (int(spec.arg) if spec is not None and spec.arg else capacity)
  shape = (config.n_layers, batch, config.n_kv_heads, slots, config.head_dim)
  return RingCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def old_ring(n_layers, batch, kv_heads, head_dim, capacity, dtype):
  """The deprecated six-argument form of the same factory."""
  shape = (n_layers, batch, kv_heads, capacity, head_dim)
  return RingCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


CHEAP = {"quick": True, "only": ["protocol", "contents"]}


# ---- one factory signature -----------------------------------------------------------------------
def test_a_spec_string_is_built_with_make_cache():
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    assert check_cache_kind("window:6", **CHEAP) == ["protocol", "contents"]
    # a registered kind, by its spec (tests/test_registry_kinds.py registers `ring`)
    assert check_cache_kind("ring:6", **CHEAP) == ["protocol", "contents"]


def test_a_register_kind_factory_gets_spec_config_and_options():
  seen = []

  def make(spec, config, *, batch, capacity, dtype, slots):
    seen.append((spec, config, batch, capacity, dtype, slots))
    return make_ring(spec, config, batch=batch, capacity=capacity, dtype=dtype, slots=slots)

  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    check_cache_kind(make, spec="ring:6", options=lambda config: {"slots": config.head_dim // 2},
                     **CHEAP)
  spec, config, batch, capacity, dtype, slots = seen[-1]
  assert spec == kvjax.parse_spec("ring:6") and spec.arg == "6"
  assert (config.n_layers, config.head_dim, config.n_heads) == (2, 16, 2 * config.n_kv_heads)
  assert batch in (1, 3) and (capacity, dtype, slots) == (8, jnp.float32, 8)
  # without spec=, the factory gets None; a dict of options is passed as is
  seen.clear()
  check_cache_kind(make, options={"slots": 5}, quick=True, only=["protocol"])
  assert seen[0][0] is None and seen[0][-1] == 5


def test_the_six_argument_factory_still_works_with_a_deprecation_warning():
  new_form = r"factory\(spec, config, \*, batch, capacity, dtype\)"
  with pytest.warns(DeprecationWarning, match=new_form):
    assert check_cache_kind(old_ring, **CHEAP) == ["protocol", "contents"]
  with pytest.warns(DeprecationWarning, match="check_cache_kind"):
    made = spec_factory("window:6")
  with warnings.catch_warnings():  # the kit builds what spec_factory names without a 2nd warning
    warnings.simplefilter("error", DeprecationWarning)
    check_cache_kind(made, quick=True, only=["protocol"])


def test_legacy_factories_are_told_apart_by_their_signature():
  assert conformance.is_legacy_factory(old_ring)
  assert conformance.is_legacy_factory(lambda *args: None)
  assert not conformance.is_legacy_factory(make_ring)
  assert not conformance.is_legacy_factory(lambda spec, config, **sizes: None)
  assert not conformance.is_legacy_factory(lambda spec, config, batch, capacity, dtype: None)
  assert not conformance.is_legacy_factory(
      lambda spec, config, batch, capacity, dtype, maps=None: None)
  with pytest.raises(TypeError, match="spec string or a factory"):
    check_cache_kind(42)
  with pytest.raises(TypeError, match="spec= is for a factory"):
    check_cache_kind("window:6", spec="window:6")


# ---- streams past the capacity -------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(batch=st.sampled_from([1, 3]), min_tokens=st.sampled_from([0, 6, 24]),
       data=st.data())
def test_append_stream_gives_every_row_its_tokens(batch, min_tokens, data):
  steps = data.draw(kst.append_stream(batch, min_tokens, (1, 2, 5)))
  given_ = np.sum([s.n_valid for s in steps], axis=0)
  assert steps and (given_ >= min_tokens).all()
  assert all(s.tokens in (1, 2, 5) and len(s.n_valid) == batch for s in steps)
  assert all(0 <= n <= s.tokens for s in steps for n in s.n_valid)


@pytest.mark.parametrize("capacity", [8, pytest.param(12, marks=pytest.mark.slow)])
def test_streams_wrap_every_kind_several_times(monkeypatch, capacity):
  """Every stream of an eviction invariant gives each row WRAPS x capacity real tokens."""
  longest = []
  check = conformance._check_positions

  def spy(cache, view, log, invariant="positions"):
    if not cache.limited:
      longest.append(int(np.asarray(cache.lengths).min()))
    return check(cache, view, log, invariant)

  monkeypatch.setattr(conformance, "_check_positions", spy)
  check_cache_kind(make_ring, quick=True, capacity=capacity, only=["positions"])
  assert max(longest) >= conformance.WRAPS * capacity >= 3 * capacity


# ---- lossless_tokens -----------------------------------------------------------------------------
@struct.dataclass
class EvenRing(RingCache):
  """A sparse exact kind: of the ring's tokens it keeps the even positions and the newest one.
  Its view is the whole context for 2 tokens only."""

  def held_positions(self, lengths):
    pos = super().held_positions(lengths)
    keep = (pos % 2 == 0) | (pos == lengths[:, None] - 1)
    return jnp.where((pos >= 0) & keep, pos, -1)

  def filled(self):
    return (self.held_positions(self.lengths) >= 0).sum(-1).astype(jnp.int32)


@struct.dataclass
class DeclaredEvenRing(EvenRing):
  lossless_tokens = 2  # position 1 is dropped when position 2 comes


def even_ring(cls):
  def make(spec, config, *, batch, capacity, dtype):
    shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))
  make.__name__ = cls.__name__
  return make


def test_a_sparse_kind_is_told_to_declare_lossless_tokens():
  with pytest.raises(CacheKindError) as info:
    check_cache_kind(even_ring(EvenRing), quick=True, only=["model-forward"])
  assert info.value.invariants == ["model-forward"]
  message = str(info.value)
  assert "lossless_tokens" in message and "capacity 8" in message, message


@pytest.mark.slow
def test_a_sparse_kind_that_declares_lossless_tokens_passes():
  checked = check_cache_kind(even_ring(DeclaredEvenRing), quick=True)
  assert {"model-forward", "contents", "positions", "attention"} <= set(checked)


def test_lossless_tokens_is_documented():
  """The kit's docstring and docs/testing.md say what `lossless_tokens` means and its default."""
  for text in (conformance.__doc__, (ROOT / "docs" / "testing.md").read_text()):
    flat = " ".join(text.split())
    assert "`lossless_tokens`" in flat and "default: `capacity`" in flat
