"""kvjax.beam: beam search over any cache kind that can reorder its rows.

One beam is greedy decoding; on paged:P the beams share their prompt's pages and find what the
full cache's beams find; the capacity is the kind's own choice; prompts are read as everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from kvjax.beam import beam_search
from tests.helpers import lively


@pytest.fixture(scope="module")
def model(tiny):
  return lively(tiny)


def test_capacity_is_the_kinds_own_choice(model):
  """A window:512 spec gets the window's 512 slots (as in `generate`), not the bucket of the
  prompt plus the new tokens, and so searches exactly as the full cache does."""
  ids = np.random.default_rng(3).integers(0, 250, 21)
  window = kvjax.beam_search(model, ids, beams=2, max_new_tokens=5, cache="window:512")
  full = kvjax.beam_search(model, ids, beams=2, max_new_tokens=5, cache="full")
  assert window.cache.capacity == 512
  np.testing.assert_array_equal(window.tokens, full.tokens)


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "empty"),
    ([1.0, 2.0], TypeError, "integer token ids"),
    ([[1, 2]], TypeError, "integer token ids"),
])
def test_prompt_errors(model, bad, error, match):
  with pytest.raises(error, match=match):
    kvjax.beam_search(model, bad, beams=2, max_new_tokens=3, cache="full")


def prompt(seed, n):
  return list(np.random.default_rng(seed).integers(0, 250, n))


def greedy(model, ids, n):
  out = kvjax.generate(model, [ids], max_new_tokens=n, cache="full", stop_at_eos=False)
  return [int(t) for t in np.asarray(out.tokens[0][:n])]


def test_one_beam_is_greedy(model):
  ids = prompt(9, 37)
  one = beam_search(model, ids, beams=1, max_new_tokens=10, cache="paged:8")
  assert one.tokens[0].tolist() == greedy(model, ids, 10)


def test_beam_search_shares_pages_and_matches_full(model):
  ids = prompt(9, 37)
  paged = beam_search(model, ids, beams=4, max_new_tokens=10, cache="paged:8")
  full = beam_search(model, ids, beams=4, max_new_tokens=10, cache="full")
  np.testing.assert_array_equal(paged.tokens, full.tokens)
  np.testing.assert_allclose(paged.scores, full.scores, rtol=1e-5)
  assert int(paged.cache.pages_in_use()) < 4 * 6, "beams share their common prefix's pages"
  assert (np.diff(paged.scores) <= 0).all()


@pytest.mark.slow  # ~18 s: two searches compile
def test_sliding_layers_default_equals_full_everywhere(tiny_gemma3):
  """tiny-gemma3: the default cache (paged:16 on the global layer, window:16 rings on the sliding
  ones) reorders group by group and scores exactly like full@all (sliding layers masked)."""
  ids = prompt(9, 37)
  hybrid = beam_search(tiny_gemma3, ids, beams=3, max_new_tokens=8)
  full = beam_search(tiny_gemma3, ids, beams=3, max_new_tokens=8, cache="full@all")
  np.testing.assert_array_equal(hybrid.tokens, full.tokens)
  np.testing.assert_allclose(hybrid.scores, full.scores, rtol=1e-5)

