"""Samplers: greedy, temperature, top-k and top-p, from an explicit PRNG key.

Invariants checked:
  * temperature 0 is argmax; the same key gives the same ids, and jit changes nothing;
  * top_k=1 and a tiny top_p are greedy whatever the temperature;
  * top-k samples only among the k largest logits; top-p only within the smallest prefix of the
    sorted distribution whose mass reaches p (the top token always stays);
  * sample frequencies follow softmax(logits / temperature), renormalized over what is kept;
  * invalid settings raise ValueError naming the field; Sampler is hashable (a static jit arg).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvjax.sampling import GREEDY, Sampler
from tests.helpers import examples

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]], jnp.float32))


def frequencies(sampler, logits, n=20000, seed=0):
  """Empirical distribution [V] of n draws for the single row of `logits` [1, V]."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  ids = jax.jit(jax.vmap(lambda k: sampler(logits, k)[0]))(keys)
  return np.bincount(np.asarray(ids), minlength=logits.shape[-1]) / n


_GREEDY_LIKE = [jax.jit(s) for s in (GREEDY, Sampler(temperature=2.0, top_k=1),
                                      Sampler(temperature=0.7, top_p=1e-6))]


@given(seed=st.integers(0, 2**16))
@examples(10)
def test_greedy_is_argmax(seed):
  logits = jax.random.normal(jax.random.PRNGKey(seed), (4, 50))
  want = np.argmax(np.asarray(logits), -1)
  for sample in _GREEDY_LIKE:  # greedy, top_k=1 at temperature 2, top_p=1e-6
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.PRNGKey(seed))), want)


def test_same_key_same_ids_and_jit():
  logits = jax.random.normal(jax.random.PRNGKey(3), (8, 100))
  s = Sampler(temperature=1.0, top_k=20, top_p=0.9)
  key = jax.random.PRNGKey(7)
  sample = jax.jit(s)
  a, b = sample(logits, key), sample(logits, key)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(s(logits, key)), np.asarray(a))  # no jit: the same ids
  assert a.dtype == jnp.int32 and a.shape == (8,)
  other = sample(logits, jax.random.PRNGKey(8))
  assert (np.asarray(other) != np.asarray(a)).any()


def test_temperature_frequencies():
  for temp in (1.0, 2.0):
    got = frequencies(Sampler(temperature=temp), LOGITS)
    want = np.asarray(jax.nn.softmax(LOGITS[0] / temp))
    np.testing.assert_allclose(got, want, atol=0.015)


def test_top_k_support_and_renormalization():
  got = frequencies(Sampler(temperature=1.0, top_k=2), LOGITS)
  assert got[2:].sum() == 0
  np.testing.assert_allclose(got[:2], [2 / 3, 1 / 3], atol=0.015)
  # top_k larger than the vocabulary keeps everything.
  np.testing.assert_allclose(frequencies(Sampler(temperature=1.0, top_k=99), LOGITS),
                             [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.7, 2), (0.8, 3), (0.95, 4)])
def test_top_p_support(top_p, kept):
  got = frequencies(Sampler(temperature=1.0, top_p=top_p), LOGITS, n=4000)
  assert got[kept:].sum() == 0, got
  assert (got[:kept] > 0).all(), got
  probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])[:kept]
  np.testing.assert_allclose(got[:kept], probs / probs.sum(), atol=0.04)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
])
def test_invalid_settings(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    Sampler(**kwargs)


def test_hashable_and_greedy_flag():
  assert Sampler() == GREEDY and hash(Sampler()) == hash(GREEDY) and GREEDY.greedy
  assert not Sampler(temperature=0.5).greedy
  assert len({Sampler(temperature=1.0, top_k=5), Sampler(temperature=1.0, top_k=5)}) == 1
