"""kvjax.beam: beam search over any cache kind that can reorder its rows.

(Its paged-cache checks, one beam = greedy and pages shared between beams, live beside the
Engine's in tests/test_engine.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
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
