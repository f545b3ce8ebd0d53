"""docs/research.md runs: its python blocks, top to bottom, in one namespace.

The page writes a GPT-2-style model from scratch (learned positions, MHA, no RoPE), decodes it with
its own `lax.scan` loop over kvjax caches, and runs it through `kvjax.generate`,
`kvjax.perplexity` and a kind registered on the page; its own asserts check that the library's
loop equals the user's. Checked here besides: the numbers it prints are what they claim.
"""

import pathlib
import re

import numpy as np

import kvjax

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "research.md"


def run_page() -> dict:
  """Every python block of the page, top to bottom, in one namespace (returned)."""
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) >= 4
  namespace: dict = {}
  try:
    for i, block in enumerate(blocks):
      exec(compile(block, f"docs/research.md block {i}", "exec"), namespace)
  finally:
    kvjax.unregister_kind("halfprec")
  return namespace


def test_research_page_runs():
  namespace = run_page()
  mine, out = namespace["mine"], namespace["out"]
  np.testing.assert_array_equal(out.tokens, np.asarray(mine))
  assert np.isfinite(namespace["full"].ppl) and np.isfinite(namespace["windowed"].ppl)
  # 100 tokens through a 32-slot sink+window cache: eviction changes the score.
  assert namespace["full"].ppl != namespace["windowed"].ppl


def test_a_press_compresses_the_pages_own_model():
  """kvjax.compress takes the page's GPT-2-style model as it is (no RoPE, MHA, its own step): a
  budget above the prompt decodes exactly as the full cache, and a Prefilled replays the same."""
  model = run_page()["model"]
  rows = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 12)).tolist()
  rest = [[5], [7]]
  want = kvjax.generate(model, [r + s for r, s in zip(rows, rest)], max_new_tokens=4,
                        cache="full", stop_at_eos=False).tokens
  for press in ("snapkv", "knorm"):
    cache = kvjax.compress(model, rows, press, budget=64, room=16)
    got = kvjax.generate(model, rest, cache=cache, max_new_tokens=4, stop_at_eos=False).tokens
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  pre = kvjax.presses.prefill(model, rows)
  a = kvjax.presses.score_prompt(model, rows, "snapkv", ratio=0.5)
  b = kvjax.presses.score_prompt(model, pre, "snapkv", ratio=0.5)
  np.testing.assert_array_equal(np.asarray(a.kept), np.asarray(b.kept))
