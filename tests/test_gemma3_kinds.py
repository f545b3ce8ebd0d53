"""Every built-in cache kind runs on Gemma 3 end to end (`kvjax.generate` on tiny-gemma3: 6 layers,
layers 0-4 sliding with a 16-token window, layer 5 global, one kv head).

A plain spec on Gemma 3 applies to the global layer; the sliding layers get window:16 rings. For
each spec the kit uses (`kvjax.testing.strategies.BUILTIN_SPECS`), a ragged batch of prompts
longer than the window generates without error or overflow, and where the global layer's kind
keeps every token exactly (`caps.exact` and limited: it holds every token up to its capacity) the
tokens are those of `full@all` (every layer a full cache, sliding layers masked to the window). A
spec a sliding layer cannot serve fails with a SpecError naming the layer.

Cost: every spec is its own compile (prefill and decode of a 6-layer model, about 10 s on a
loaded 2-core CPU) and loading the random model about as much, so the fast lane runs one layout,
int8 on the global layer (the default layout's exactness is tests/test_gemma3.py's), and the
SpecError; every other kind, and `full@all` for the exact ones, runs in the slow lane.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.caches.hybrid import HybridCache
from kvjax.caches.terms import SpecError
from kvjax.testing.strategies import BUILTIN_SPECS

PROMPT_LENGTHS = (22, 18)  # both past the 16-token window, ragged
NEW_TOKENS = 3
FAST = ("int8+group:16",)  # a quantized global layer beside the window rings


@pytest.fixture(scope="module")
def gemma():
  return kvjax.load("tiny-gemma3", dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 250, n).tolist() for n in PROMPT_LENGTHS]


def _generate(model, prompts, spec):
  return kvjax.generate(model, prompts, max_new_tokens=NEW_TOKENS, cache=spec, stop_at_eos=False)


@pytest.fixture(scope="module")
def reference(gemma, prompts):
  """Greedy tokens with every layer full (sliding layers masked to their window)."""
  return np.asarray(_generate(gemma, prompts, "full@all").tokens)


def _keeps_every_token(cache, layer: int) -> bool:
  """The kind of `layer` stores exactly and holds every token up to its capacity."""
  group = cache.groups[cache.where[layer][0]]
  return group.caps.exact and group.caps.limited


@pytest.mark.parametrize("spec", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow)
                                  for s in BUILTIN_SPECS])
def test_every_builtin_kind_generates_on_tiny_gemma3(request, gemma, prompts, spec):
  result = _generate(gemma, prompts, spec)
  cache, tokens = result.cache, np.asarray(result.tokens)
  assert tokens.shape == (len(prompts), NEW_TOKENS)
  assert ((tokens >= 0) & (tokens < gemma.config.vocab_size)).all()
  assert result.overflowed is None or not np.asarray(result.overflowed).any()
  assert isinstance(cache, HybridCache)
  types = gemma.config.layer_types
  sliding = [l for l, t in enumerate(types) if t == "sliding"]
  assert {type(cache.groups[cache.where[l][0]]).__name__ for l in sliding} == {"WindowCache"}
  # the last new token is emitted, not fed back
  assert np.asarray(cache.lengths).tolist() == [n + NEW_TOKENS - 1 for n in PROMPT_LENGTHS]
  if all(_keeps_every_token(cache, l) for l, t in enumerate(types) if t == "global"):
    reference = request.getfixturevalue("reference")  # compiled only for the exact kinds
    np.testing.assert_array_equal(tokens, reference, err_msg=f"{spec} vs full@all")


def test_a_kind_a_sliding_layer_cannot_serve_is_a_spec_error(gemma, prompts):
  with pytest.raises(SpecError, match=r"layer 0 slides over 16 tokens; 'snapkv:8\+window:4' "
                                      r"cannot serve it"):
    _generate(gemma, prompts, "snapkv:8+window:4@sliding")


# ---- the real Gemma 3 270M (slow lane) ------------------------------------------------------------
REAL_PROMPT_TOKENS = 600  # past the 512-token window of its sliding layers
REAL_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gemma_270m(gemma3_270m):
  return gemma3_270m


@pytest.fixture(scope="module")
def shakespeare_ids(gemma_270m):
  from tests.helpers import DATA

  if not DATA.exists():
    pytest.skip(f"{DATA} not found")
  ids = gemma_270m.tokenizer.encode(DATA.read_text(encoding="utf-8")[:6000])
  assert len(ids) >= REAL_PROMPT_TOKENS
  return [ids[:REAL_PROMPT_TOKENS]]


@pytest.fixture(scope="module")
def default_tokens(gemma_270m, shakespeare_ids):
  """Greedy tokens with Gemma 3's default layout (window:512 rings, full global layers)."""
  return np.asarray(kvjax.generate(gemma_270m, shakespeare_ids, max_new_tokens=REAL_NEW_TOKENS,
                                   cache="full", stop_at_eos=False).tokens)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_every_builtin_kind_generates_on_gemma3_270m(gemma_270m, shakespeare_ids, default_tokens,
                                                     spec):
  """A 600-token Shakespeare prompt, 8 greedy tokens: every kind runs; kinds that keep every
  token exactly on the global layers (5, 11, 17) give the default layout's tokens (full,
  dynamic, offload). All 17 kinds: 15 min cold on a loaded 2-core CPU (20-90 s a kind)."""
  result = kvjax.generate(gemma_270m, shakespeare_ids, max_new_tokens=REAL_NEW_TOKENS, cache=spec,
                          stop_at_eos=False)
  cache, tokens = result.cache, np.asarray(result.tokens)
  assert tokens.shape == (1, REAL_NEW_TOKENS)
  assert result.overflowed is None or not np.asarray(result.overflowed).any()
  types = gemma_270m.config.layer_types
  if all(_keeps_every_token(cache, l) for l, t in enumerate(types) if t == "global"):
    np.testing.assert_array_equal(tokens, default_tokens, err_msg=f"{spec} vs the default layout")
