"""kvjax's presses against kvpress 0.5.5 on SmolLM2-135M, token for token (full lane).

For each fixture press (tests/fixtures/kvpress, scripts/make_kvpress_fixtures.py) and each of its
3 prompts: kvjax's scores of every (layer, kv head) equal kvpress's within fp32 tolerance, and at
ratios 0.25/0.5/0.75 the kept sets are equal up to exact ties (tests/presses/oracle.py). The three
prompts run as one ragged batch of 3 rows, so this also checks that padding a row changes nothing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvjax import presses
from tests.presses import oracle

pytestmark = pytest.mark.slow

SCORE_RTOL = 1e-4  # relative to each layer's largest score magnitude


@pytest.mark.parametrize("name", sorted(oracle.SPECS))
def test_matches_kvpress(name, smollm2):
  spec = oracle.SPECS[name]
  missing = set(re.findall(r"\b([a-z][a-z0-9_]*)\b(?!\s*=)", spec)) - set(presses.press_names())
  if missing:
    pytest.skip(f"{spec}: {', '.join(sorted(missing))} not implemented")
  fixture = oracle.load(name)
  rows = oracle.prompts(fixture)
  selection = oracle.SELECTION.get(name, "per_head")
  report = []
  for ratio in oracle.RATIOS:
    info = presses.score_prompt(smollm2, rows, spec, ratio=ratio, compat="kvpress")
    for i, ids in enumerate(rows):
      t = len(ids)
      got_scores = np.asarray(info.scores[:, i, :, :t])
      got = np.asarray(info.kept[:, i, :, :t])
      ref = oracle.scores(fixture, i, ratio)
      if ref is not None:
        # float32's max marks forced keeps (criticalkv's first stage): equal where kvpress's is,
        # and the rest within SCORE_RTOL of the largest other score
        forced = ref >= np.finfo(np.float32).max
        assert np.array_equal(got_scores >= np.finfo(np.float32).max, forced), \
            f"{name} p{i} r{ratio}: forced keeps differ from kvpress"
        rest = np.where(forced, 0.0, ref)
        scale = np.maximum(np.abs(rest).max(axis=(1, 2), keepdims=True), 1e-30)
        assert np.all(np.abs(np.where(forced, 0.0, got_scores) - rest) <= SCORE_RTOL * scale), \
            f"{name} p{i} r{ratio}: scores differ from kvpress"
      want = oracle.kept(fixture, i, ratio)
      if selection == "exact":
        untied, tied = oracle.exact_mismatches(want, got)
      elif selection == "chunks":
        length = presses.make_press(spec).chunk_length
        untied, tied = oracle.untied_mismatches(*oracle.chunk_view(ref, want, got, length))
      else:
        untied, tied = oracle.untied_mismatches(ref if ref is not None else got_scores, want, got,
                                                pooled_heads=selection == "pooled_heads")
      assert untied == 0, f"{name} p{i} r{ratio}: {untied} kept sets differ beyond ties"
      report.append(tied)
  print(f"{name}: kept sets equal up to {sum(report)} tied positions")
