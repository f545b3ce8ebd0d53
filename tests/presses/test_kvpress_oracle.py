"""kvjax's presses against kvpress 0.5.5 on SmolLM2-135M, token for token (full lane).

For each fixture press (tests/fixtures/kvpress, scripts/make_kvpress_fixtures.py) and each of its
3 prompts: kvjax's scores of every (layer, kv head) equal kvpress's within fp32 tolerance, and at
ratios 0.25/0.5/0.75 the kept sets are equal up to exact ties (tests/presses/oracle.py). The three
prompts run as one ragged batch of 3 rows, so this also checks that padding a row changes nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp
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
  missing = set(re.findall(r"\b([a-z][a-z0-9_]*)\b(?!\s*=)", spec)) - set(presses.press_names())
  if missing:
    pytest.skip(f"{spec}: {', '.join(sorted(missing))} not implemented")
  fixture = oracle.load(name)
  rows = oracle.prompts(fixture)
  selection = oracle.SELECTION.get(name, "per_head")
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


@dataclasses.dataclass(frozen=True)
class KvpressKept(presses.Press):
  """Keeps exactly the positions kvpress kept in a fixture (a test press: its fields pick the
  fixture, so each fixture compiles its own program)."""

  name: ClassVar[str] = "kvpress_kept"
  fixture: str = "knorm"
  prompt: int = 0
  ratio: float = 0.5

  def score(self, x, n_kept):
    mask = oracle.kept(oracle.load(self.fixture), self.prompt, self.ratio)[x.layer]
    return jnp.asarray(mask, jnp.float32)[None]


@pytest.mark.parametrize("name", ["none", "knorm", "snapkv", "streaming_llm"])
def test_greedy_continuation_matches_kvpress(name, smollm2):
  """Prompt 0 compressed at ratio 0.5, then 8 greedy tokens, as kvpress's fixture run did: the
  first from the uncompressed prefill's logits, the next 7 decoded over the compressed cache.
  Over exactly kvpress's kept positions kvjax continues with kvpress's tokens; with its own
  selection too, except knorm, whose layer-0 kept sets differ from kvpress's on 2 tied positions
  (repeated tokens have equal key norms), which changes the continuation from the 4th token."""
  import kvjax

  greedy = oracle.manifest()["greedy"]
  i, ratio, n = greedy["prompt"], greedy["ratio"], greedy["n_tokens"]
  ids = oracle.prompts(oracle.load("knorm"))[i].tolist()
  want = greedy["results"][name]["ids"]
  if name == "none":
    out = kvjax.generate(smollm2, [ids], max_new_tokens=n, stop_at_eos=False)
    assert np.asarray(out.tokens)[0].tolist() == want
    return

  def continue_after(press, **options):
    cache, info = kvjax.compress(smollm2, [ids], press, ratio=ratio, details=True, room=16,
                                 **options)
    assert int(np.asarray(cache.view().mask).sum(-1).max()) == greedy["results"][name][
        "cache_len_after_prefill"]
    first = int(np.argmax(np.asarray(info.logits[0])))
    out = kvjax.generate(smollm2, [[first]], cache=cache, max_new_tokens=n - 1, stop_at_eos=False)
    return [first] + np.asarray(out.tokens)[0].tolist()

  assert continue_after(KvpressKept(name, i, ratio)) == want
  own = continue_after(name, compat="kvpress")
  if name == "knorm":
    assert own[:3] == want[:3]
  else:
    assert own == want


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


@pytest.mark.parametrize("chunk", [2048, 64])
def test_kvzip_matches_kvpress(chunk, smollm2):
  """KVzipPress(layerwise=True) at chunk_size 2048 (each fixture prompt repeated in one pass) and
  64 (in 4-5 chunks: kvpress's path for contexts over 2048 tokens). The ids kvpress puts between
  the context and each repetition are kvjax's; the scores agree to SCORE_RTOL (the sinks, which
  each raises above the rest its own way, aside). kvpress keeps K n - floor(K n r) (layer, kv
  head) pairs per layer and kvjax K floor(n (1 - r)), up to K fewer: kvjax's kept set is the
  top of kvpress's own ranking, of its size, up to exact ties."""
  fixture, meta = oracle.load("kvzip"), oracle.manifest()["presses"]["kvzip"]
  rows = [r.tolist() for r in oracle.prompts(fixture)]
  spec = f"kvzip(suffix='\\n', chunk={chunk})"
  press = presses.make_press(spec)
  tok = smollm2.tokenizer
  assert press.repeat_ids(tok) == meta["repeat_ids"]["chunk0"]
  assert press.next_ids(tok, rows[0][56:64]) == meta["repeat_ids"]["chunk1"]
  kv_heads, tied = smollm2.config.n_kv_heads, 0
  for ratio in oracle.RATIOS:
    info = presses.score_prompt(smollm2, rows, spec, ratio=ratio)
    for i, ids in enumerate(rows):
      t, sink = len(ids), press.n_sink
      ref = fixture[f"scores_p{i}_c{chunk}"]
      got_scores = np.asarray(info.scores[:, i, :, :t])
      scale = np.abs(ref[..., sink:]).max(axis=(1, 2), keepdims=True)
      assert np.all(np.abs(got_scores[..., sink:] - ref[..., sink:]) <= SCORE_RTOL * scale), \
          f"kvzip c{chunk} p{i}: scores differ from kvpress"
      want = np.unpackbits(fixture[f"kept_mask_p{i}_c{chunk}_{oracle.tag(ratio)}"], axis=-1,
                           count=t).astype(bool)
      got = np.asarray(info.kept[:, i, :, :t])
      n_got, n_want = got.sum(axis=(1, 2)), want.sum(axis=(1, 2))
      assert ((n_want - n_got >= 0) & (n_want - n_got <= kv_heads)).all(), (n_want, n_got)
      for kept, n in ((want, n_want), (got, n_got)):  # each is the top of kvpress's ranking
        order = np.argsort(-ref.reshape(len(ref), -1), axis=-1, kind="stable")
        top = np.zeros(order.shape, bool)
        for layer in range(len(ref)):
          top[layer, order[layer, :n[layer]]] = True
        untied, ties = oracle.untied_mismatches(ref, top.reshape(ref.shape), kept,
                                                pooled_heads=True)
        assert untied == 0, f"kvzip c{chunk} p{i} r{ratio}: {untied} layers differ beyond ties"
        tied += ties
  print(f"kvzip chunk {chunk}: kept sets equal up to {tied} tied positions")
