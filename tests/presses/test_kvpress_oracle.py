"""kvjax's presses against kvpress 0.5.5 on SmolLM2-135M, token for token (full lane).

For each fixture press (tests/fixtures/kvpress, scripts/make_kvpress_fixtures.py) and each of its
3 prompts: kvjax's scores of every (layer, kv head) equal kvpress's within fp32 tolerance, and at
ratios 0.25/0.5/0.75 the kept sets are equal up to exact ties (tests/presses/oracle.py). The three
prompts run as one ragged batch of 3 rows, so this also checks that padding a row changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvjax import presses
from tests.presses import oracle

pytestmark = pytest.mark.slow

SCORE_RTOL = 1e-4  # relative to each layer's largest score magnitude


@pytest.mark.parametrize("name", sorted(oracle.SPECS))
def test_matches_kvpress(name, smollm2):
  spec = oracle.SPECS[name]
  if spec.split("(")[0] not in presses.press_names():
    pytest.skip(f"{spec} is not implemented")
  fixture = oracle.load(name)
  rows = oracle.prompts(fixture)
  pooled = name == "adakv"
  ranked = oracle.RANKED.get(name)
  if ranked:  # kvpress's scores are ranks: compare them up to ties of the ranked values
    values = np.asarray(presses.score_prompt(smollm2, rows, ranked, ratio=0.5,
                                             compat="kvpress").scores)
  report = []
  for ratio in oracle.RATIOS:
    info = presses.score_prompt(smollm2, rows, spec, ratio=ratio, compat="kvpress")
    for i, ids in enumerate(rows):
      t = len(ids)
      got_scores = np.asarray(info.scores[:, i, :, :t])
      got = np.asarray(info.kept[:, i, :, :t])
      ref = oracle.scores(fixture, i, ratio)
      if ranked:
        ref, got_scores, swapped = oracle.rank_ties(ref, got_scores, values[:, i, :, :t])
        report.append(swapped)
      if ref is not None:
        scale = np.maximum(np.abs(ref).max(axis=(1, 2), keepdims=True), 1e-30)
        assert np.all(np.abs(got_scores - ref) <= SCORE_RTOL * scale), \
            f"{name} p{i} r{ratio}: scores differ from kvpress"
      want = oracle.kept(fixture, i, ratio)
      untied, tied = oracle.untied_mismatches(ref if ref is not None else got_scores, want, got,
                                              pooled_heads=pooled)
      assert untied == 0, f"{name} p{i} r{ratio}: {untied} kept sets differ beyond ties"
      report.append(tied)
  print(f"{name}: kept sets equal up to {sum(report)} tied positions")


@pytest.mark.parametrize("name", ["none", "knorm", "snapkv", "streaming_llm"])
def test_greedy_continuation_matches_kvpress(name, smollm2):
  """Prompt 0 compressed at ratio 0.5, then 8 greedy tokens, as kvpress's fixture run did: the
  first from the uncompressed prefill's logits, the next 7 decoded over the compressed cache."""
  import kvjax

  greedy = oracle.manifest()["greedy"]
  ids = oracle.prompts(oracle.load("knorm"))[greedy["prompt"]].tolist()
  want = greedy["results"][name]["ids"]
  n = greedy["n_tokens"]
  if name == "none":
    out = kvjax.generate(smollm2, [ids], max_new_tokens=n, stop_at_eos=False)
    assert np.asarray(out.tokens)[0].tolist() == want
    return
  cache, info = kvjax.compress(smollm2, [ids], name, ratio=greedy["ratio"], compat="kvpress",
                               details=True, room=16)
  assert int(np.asarray(cache.view().mask).sum(-1).max()) == greedy["results"][name][
      "cache_len_after_prefill"]
  first = int(np.argmax(np.asarray(info.logits[0])))
  out = kvjax.generate(smollm2, [[first]], cache=cache, max_new_tokens=n - 1, stop_at_eos=False)
  assert [first] + np.asarray(out.tokens)[0].tolist() == want
