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


def test_research_page_runs():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) >= 4
  namespace: dict = {}
  try:
    for i, block in enumerate(blocks):
      exec(compile(block, f"docs/research.md block {i}", "exec"), namespace)
  finally:
    kvjax.unregister_kind("halfprec")
  mine, out = namespace["mine"], namespace["out"]
  np.testing.assert_array_equal(out.tokens, np.asarray(mine))
  assert np.isfinite(namespace["full"].ppl) and np.isfinite(namespace["windowed"].ppl)
  # 100 tokens through a 32-slot sink+window cache: eviction changes the score.
  assert namespace["full"].ppl != namespace["windowed"].ppl
