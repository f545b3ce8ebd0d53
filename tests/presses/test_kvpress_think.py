"""ThinK against kvpress 0.5.5 on SmolLM2-135M (full lane): key channels, not tokens.

tests/fixtures/kvpress/think.npz holds, per prompt, kvpress's channel scores [L, K, H]
(`channel_scores_p{i}`) and, per ratio r, the channels its ThinKPress(key_channel_compression_ratio
=r) zeroed (`pruned_channels_p{i}_r{RR}`). kvjax's channel scores must equal them within fp32
tolerance, its pruned channels must be the same up to ties, and a compressed cache must hold every
prompt token with exactly those channels zeroed. The three prompts run as one ragged batch.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import presses
from kvjax.presses.keys import ThinKPress
from tests.presses import oracle

pytestmark = pytest.mark.slow

SCORE_RTOL = 1e-4  # relative to each (layer, kv head)'s largest channel score


@dataclasses.dataclass(frozen=True)
class ChannelScores(ThinKPress):
  """ThinK whose token scores carry its channel scores at positions 0..H-1 (0 after), so that
  score_prompt hands them back for every layer (prompts are longer than head_dim)."""

  def score(self, x, n_kept):
    s = self.channel_scores(x)  # [B, K, H]
    return jnp.pad(s, ((0, 0), (0, 0), (0, x.tokens - x.head_dim)))


def test_think_matches_kvpress(smollm2):
  fixture = oracle.load("think")
  rows = oracle.prompts(fixture)
  head_dim = smollm2.config.head_dim
  info = presses.score_prompt(smollm2, rows, ChannelScores(), ratio=0.0, compat="kvpress")
  scores = np.asarray(info.scores[..., :head_dim])  # [L, B, K, H]
  kept = np.asarray(info.kept).sum(axis=-1)  # [L, B, K]: every token of every row
  assert (kept == np.array([len(r) for r in rows])[None, :, None]).all()
  for i in range(len(rows)):
    ref = fixture[f"channel_scores_p{i}"]
    scale = np.abs(ref).max(axis=-1, keepdims=True)
    assert np.all(np.abs(scores[:, i] - ref) <= SCORE_RTOL * scale), f"p{i}: channel scores differ"
    for ratio in oracle.RATIOS:
      want = fixture[f"pruned_channels_p{i}_{oracle.tag(ratio)}"]
      n_pruned = int(head_dim * ratio)
      rank = np.argsort(np.argsort(scores[:, i], axis=-1, kind="stable"), axis=-1)
      got = rank < n_pruned  # what ThinKPress.pruned_channels keeps for that ratio
      untied, _ = oracle.untied_mismatches(-ref, want, got)  # "kept" = pruned: lowest scores
      assert untied == 0, f"p{i} r{ratio}: {untied} (layer, head) channel sets differ beyond ties"

  # end to end: the cache keeps every token and zeroes exactly kvpress's channels (ratio 0.5)
  cache = presses.compress(smollm2, rows, "think", ratio=0.0, key_channel_compression_ratio=0.5,
                           room=1)
  view = cache.view()
  mask, keys = np.asarray(view.mask), np.asarray(view.keys)  # [L, B, K, S], [L, B, K, S, H]
  for i, ids in enumerate(rows):
    assert (mask[:, i].sum(axis=-1) == len(ids)).all()
    zero = np.where(mask[:, i, :, :, None], np.abs(keys[:, i]), 0).sum(axis=2) == 0  # [L, K, H]
    want = fixture[f"pruned_channels_p{i}_r50"]
    untied, _ = oracle.untied_mismatches(-fixture[f"channel_scores_p{i}"], want, zero)
    assert untied == 0, f"p{i}: the cache's zeroed channels differ from kvpress's"
