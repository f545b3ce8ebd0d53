"""Reading kvpress 0.5.5's fixtures (tests/fixtures/kvpress/, made by
scripts/make_kvpress_fixtures.py) and comparing kept sets up to exact ties.

kvpress keeps the top-n of each (layer, kv head) with torch.topk, whose order among equal scores
is undocumented; kvjax breaks ties to the lower position. Two kept sets therefore agree when
every position where they differ scores (by kvpress's own scores) the same as the lowest score
kvpress kept, within a relative 1e-6 (docs/kvpress_oracle.md, "Ties").
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "kvpress"
RATIOS = (0.25, 0.5, 0.75)
TIE_RTOL = 1e-6

# the kvjax spec that reproduces each fixture's kvpress press (its fixture_params included)
SPECS = {
    "knorm": "knorm",
    "streaming_llm": "streaming_llm",
    "snapkv": "snapkv",
    "pyramidkv": "pyramidkv",
    "tova": "tova",
    "observed_attention": "observed_attention",
    "expected_attention": "expected_attention",
    "keydiff": "keydiff",
    "lagkv": "lagkv(lag_size=32)",
    "cur": "cur",
    "criticalkv": "criticalkv(expected_attention(use_vnorm=False))",
    "chunkkv": "chunkkv(snapkv)",
    "block": "block(keydiff, block_size=64)",
    "adakv": "adakv(snapkv)",
    "key_rerotation": "key_rerotation(knorm)",
    "finch": "finch(window_size=32)",  # the fixture's question: the last 32 ids after a delimiter
}


def manifest() -> dict:
  return json.loads((FIXTURES / "manifest.json").read_text())


def load(press: str) -> dict:
  with np.load(FIXTURES / f"{press}.npz") as f:
    return dict(f)


def prompts(fixture: dict) -> list[np.ndarray]:
  return [fixture[f"ids_p{i}"] for i in range(3)]


def tag(ratio: float) -> str:
  return f"r{int(round(ratio * 100))}"


def scores(fixture: dict, i: int, ratio: float) -> np.ndarray | None:
  """float32 [L, K, T] kvpress's scores of prompt i (the ratio's own where they depend on it)."""
  return fixture.get(f"scores_p{i}_{tag(ratio)}", fixture.get(f"scores_p{i}"))


def kept(fixture: dict, i: int, ratio: float) -> np.ndarray:
  """bool [L, K, T] the positions kvpress kept."""
  t = len(fixture[f"ids_p{i}"])
  return np.unpackbits(fixture[f"kept_mask_p{i}_{tag(ratio)}"], axis=-1, count=t).astype(bool)


def untied_mismatches(ref_scores, want, got, *, pooled_heads: bool = False):
  """(untied, tied): the number of (layer, kv head) sets — or layers, with pooled_heads — whose
  kept positions differ beyond exact ties, and the number of positions that differ only by a tie.
  ref_scores float [L, K, T]; want, got bool [L, K, T]."""
  untied = tied = 0
  if pooled_heads:
    ref_scores, want, got = (a.reshape(a.shape[0], 1, -1) for a in (ref_scores, want, got))
  for layer in range(want.shape[0]):
    for h in range(want.shape[1]):
      w, g, s = want[layer, h], got[layer, h], ref_scores[layer, h].astype(np.float64)
      if w.sum() != g.sum():
        untied += 1
        continue
      diff = w != g
      if not diff.any():
        continue
      threshold = s[w].min()
      close = np.abs(s[diff] - threshold) <= TIE_RTOL * max(1.0, abs(threshold))
      if close.all():
        tied += int(diff.sum())
      else:
        untied += 1
  return untied, tied
