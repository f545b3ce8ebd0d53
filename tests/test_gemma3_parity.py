"""kvjax's Gemma 3 270M against HF Transformers' Gemma3ForCausalLM (fp32, the same GGUF).

Fixtures: tests/fixtures/gemma3_parity.json and gemma3_parity_logits.npz, written by
scripts/make_gemma3_fixtures.py from the ids in gemma3_prompt_ids.json (kvjax's tokenizer, which
tests/test_tokenizer_spm.py checks against llama.cpp's). Full lane: needs the real model.
"""

import json
import math
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LOGIT_ATOL = 2e-3  # observed max |kvjax - HF| ~1e-4 (fp32 CPU); a real bug moves logits by > 0.1
PPL_RTOL = 1e-4
TIE_GAP = 2e-3  # greedy steps whose top-2 logits are closer than this may flip


def _fixture():
  return json.loads((FIXTURES / "gemma3_parity.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gemma(gemma3_270m):
  return gemma3_270m


@pytest.fixture(scope="module")
def forward_logits(gemma):
  """One forward (no cache) over each prompt + HF's greedy continuation."""
  import jax.numpy as jnp

  from kvjax import loading

  out = []
  for case in _fixture()["cases"]:
    seq = case["prompt_ids"] + case["greedy_ids"]
    logits = loading.forward(gemma.config, gemma.params, jnp.asarray([seq], jnp.int32))
    out.append(np.asarray(logits[0], np.float64))
  return out


def test_prompt_ids_are_kvjax_tokenizers(gemma):
  for case in _fixture()["cases"]:
    assert gemma.tokenizer.encode(case["text"]) == case["prompt_ids"]


def test_logits_match_transformers(forward_logits):
  cases = _fixture()["cases"]
  stored = np.load(FIXTURES / "gemma3_parity_logits.npz")
  columns = stored["columns"]
  for i, (case, logits) in enumerate(zip(cases, forward_logits)):
    n = len(case["prompt_ids"])
    rows = logits[n - 1:n + 2]
    np.testing.assert_allclose(np.take_along_axis(rows, stored[f"p{i}_top_ids"], -1),
                               stored[f"p{i}_top_values"], atol=LOGIT_ATOL)
    np.testing.assert_allclose(rows[:, columns], stored[f"p{i}_columns"], atol=LOGIT_ATOL)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(lse, case["logsumexp"], atol=LOGIT_ATOL)
    agree = np.argmax(logits, -1) == np.asarray(case["argmax"])
    assert agree.mean() > 0.99, f"prompt {i}: argmax agrees at {agree.mean():.3f} of positions"


@pytest.mark.parametrize("cache", ["full", "full@all"])
def test_greedy_continuations_match_transformers(gemma, cache):
  import kvjax

  for case in _fixture()["cases"]:
    out = kvjax.generate(gemma, [case["prompt_ids"]], max_new_tokens=len(case["greedy_ids"]),
                         cache=cache, stop_at_eos=False)
    got = [int(t) for t in out.tokens[0]]
    for step, (a, b) in enumerate(zip(got, case["greedy_ids"])):
      if a != b:
        assert case["gaps"][step] < TIE_GAP, (case["text"], step, got, case["greedy_ids"])
        break


def test_capital_of_france_continues_sensibly(gemma):
  import kvjax

  out = kvjax.generate(gemma, "The capital of France is", max_new_tokens=8)
  assert "France" in gemma.tokenizer.decode(out.tokens[0]) or "Paris" in gemma.tokenizer.decode(
      out.tokens[0])


@pytest.mark.parametrize("tokens", [1024, 2048])
@pytest.mark.parametrize("cache", ["full", "full@all"])
def test_perplexity_matches_transformers(gemma, tokens, cache):
  """Past the 512-token window: the default layout (window rings on sliding layers) and the
  all-full one (sliding layers masked) both give Transformers' perplexity."""
  import kvjax

  ids = json.loads((FIXTURES / "gemma3_prompt_ids.json").read_text())["text_ids"][:tokens]
  want = _fixture()["perplexity"][str(tokens)]["ppl"]
  got = kvjax.perplexity(gemma, np.asarray(ids, np.int32), cache=cache).ppl
  assert math.isclose(got, want, rel_tol=PPL_RTOL), (got, want)
