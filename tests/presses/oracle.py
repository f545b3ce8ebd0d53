"""Reading kvpress 0.5.5's fixtures (tests/fixtures/kvpress/, made by
scripts/make_kvpress_fixtures.py) and comparing kept sets up to exact ties.

kvpress keeps the top-n of each (layer, kv head) with torch.topk, whose order among equal scores
is undocumented; kvjax breaks ties to the lower position. Two kept sets therefore agree when
every position where they differ scores (by kvpress's own scores) the same as the lowest score
kvpress kept, within a relative 1e-6 (docs/kvpress_oracle.md, "Ties").

Three presses do not keep a per-head top-k of their recorded scores (`SELECTION`): adakv pools a
layer's heads (compared per layer); chunkkv keeps the top chunks of chunk scores made from the
recorded (inner) scores (compared chunk by chunk, `chunk_view`); block rescores changing subsets
and records no scores, so its kept sets must be equal exactly.
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

# presses whose kvpress scores are ranks of float values (lagkv: ranks within each partition), and
# the kvjax spec scoring those values themselves, to tell tied ranks apart (`rank_ties`)
RANKED = {"lagkv": "lagkv(lag_size=32, cross_scoring=True)"}


# how each press's kept sets are compared, where not per (layer, kv head) top-k up to ties
SELECTION = {"adakv": "pooled_heads", "chunkkv": "chunks", "block": "exact"}


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


def rank_ties(ref, got, values):
  """(ref, got, swapped) with ranks that differ only by a tie merged.

  ref: kvpress's rank scores, got: kvjax's, values: the values kvjax ranked, all float [L, K, T].
  torch's argsort orders equal values arbitrarily (and 1-ulp differences of the values come out
  either way), so two positions whose values tie within TIE_RTOL may have their ranks swapped.
  Every group of differing positions of one (layer, kv head) whose values tie and whose ranks are
  the same multiset in both is set to its lowest rank in both (so the kept-set comparison sees the
  tie); swapped counts those positions. Other differences are left for the caller to report."""
  ref, got = ref.copy(), got.copy()
  swapped = 0
  for layer, h in np.ndindex(ref.shape[:2]):
    differ = np.flatnonzero(np.abs(ref[layer, h] - got[layer, h]) > TIE_RTOL)
    if not differ.size:
      continue
    at = differ[np.argsort(values[layer, h, differ], kind="stable")]
    v = values[layer, h, at].astype(np.float64)
    cuts = np.flatnonzero(np.abs(np.diff(v)) > TIE_RTOL * np.abs(v[1:])) + 1
    for group in np.split(at, cuts):
      a, b = np.sort(ref[layer, h, group]), np.sort(got[layer, h, group])
      if group.size > 1 and np.allclose(a, b, rtol=0, atol=TIE_RTOL):
        ref[layer, h, group] = got[layer, h, group] = a[0]
        swapped += group.size
  return ref, got, swapped


def chunk_view(ref_scores, want, got, chunk_length: int):
  """ChunkKV's kept sets as chunks: (chunk scores [L, 1, C], want, got bool [L, 1, C]) for
  `untied_mismatches`. A chunk's score is kvpress's: the mean over its positions (the last chunk
  may be short) of the scores summed over kv heads. Raises AssertionError where a kept set is not
  whole chunks, the same in every kv head. ref_scores float [L, K, T]; want, got bool [L, K, T]."""
  t = want.shape[-1]
  starts = np.arange(0, t, chunk_length)
  summed = ref_scores.astype(np.float64).sum(axis=1)  # [L, T]
  chunk_scores = np.stack([summed[:, s:s + chunk_length].mean(axis=-1) for s in starts], axis=-1)

  def chunks(kept, who):
    first = kept[:, 0, starts]  # [L, C] each chunk's first position in head 0
    whole = np.repeat(first, chunk_length, axis=-1)[:, :t]
    assert (kept == whole[:, None, :]).all(), f"{who}'s kept set is not whole chunks in every head"
    return first[:, None, :]

  return chunk_scores[:, None, :], chunks(want, "kvpress"), chunks(got, "kvjax")


def exact_mismatches(want, got):
  """(differing, 0): the number of (layer, kv head) kept sets that differ at all."""
  return int((want != got).any(axis=-1).sum()), 0
