"""kvjax's presses against kvpress 0.5.5 on SmolLM2-135M, token for token (full lane).

For each fixture press (tests/fixtures/kvpress, scripts/make_kvpress_fixtures.py) and each of its
3 prompts: kvjax's scores of every (layer, kv head) equal kvpress's within fp32 tolerance, and at
ratios 0.25/0.5/0.75 the kept sets are equal up to exact ties (tests/presses/oracle.py). The three
prompts run as one ragged batch of 3 rows, so this also checks that padding a row changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
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
  report = []
  for ratio in oracle.RATIOS:
    info = presses.score_prompt(smollm2, rows, spec, ratio=ratio, compat="kvpress")
    for i, ids in enumerate(rows):
      t = len(ids)
      got_scores = np.asarray(info.scores[:, i, :, :t])
      got = np.asarray(info.kept[:, i, :, :t])
      ref = oracle.scores(fixture, i, ratio)
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


def test_simlayerkv_matches_kvpress(smollm2):
  """The same layers are lazy for each prompt and keep exactly the same positions (no ties: the
  kept set is positional)."""
  fixture = oracle.load("simlayerkv")
  rows = oracle.prompts(fixture)
  params = oracle.manifest()["presses"]["simlayerkv"]["fixture_params"]
  spec = "simlayerkv(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
  info = presses.score_prompt(smollm2, rows, spec, compat="kvpress")
  for i, ids in enumerate(rows):
    t = len(ids)
    want = np.unpackbits(fixture[f"kept_mask_p{i}"], axis=-1, count=t).astype(bool)
    lazy = ~want.all(axis=(1, 2))
    np.testing.assert_array_equal(lazy, fixture[f"lazy_p{i}"])
    np.testing.assert_array_equal(np.asarray(info.kept[:, i, :, :t]), want, err_msg=f"p{i}")


def test_key_rerotation_decodes_like_kvpress(smollm2):
  """kvpress's greedy run after KeyRerotationPress(knorm) at ratio 0.5, positions continuing at
  n_kept: the same 8 tokens."""
  manifest = oracle.manifest()
  want = manifest["greedy"]["results"]["key_rerotation"]
  ids = manifest["prompts_ids"][manifest["greedy"]["prompt"]]
  cache, info = kvjax.compress(smollm2, [ids], "key_rerotation(knorm)", ratio=0.5, details=True)
  assert int(cache.lengths[0]) == want["cache_len_after_prefill"]
  first = int(np.argmax(np.asarray(info.logits[0])))
  out = kvjax.generate(smollm2, [[first]], cache=cache, max_new_tokens=7, stop_at_eos=False)
  assert [first] + [int(x) for x in out.tokens[0]] == want["ids"]
