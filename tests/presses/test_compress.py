"""kvjax.compress and the press protocol on the tiny model and synthetic layers (fast lane).

The press-by-press checks against kvpress itself are in test_kvpress_oracle.py (full lane).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import presses
from kvjax.caches.terms import SpecError
from kvjax.testing.presses import PressError, check_press, synthetic_inputs


@pytest.fixture(scope="module")
def tiny():
  return kvjax.load("tiny")


def _rows(tiny, lengths=(12, 7), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, tiny.config.vocab_size, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("spec", ["knorm", "streaming_llm", "snapkv", "pyramidkv", "adakv(snapkv)"])
def test_builtin_presses_pass_the_kit(spec):
  check_press(spec)


@pytest.fixture
def drop_compiled_code():
  """Each press compiles its own programs: the two every-press runs (~60 of them, in one module)
  would pile up past the process's memory maps, so they are dropped once many are held."""
  yield
  kvjax.clear_caches(maps_above=20000)


@pytest.mark.slow
@pytest.mark.usefixtures("drop_compiled_code")
@pytest.mark.parametrize("name", [n for n in presses.press_names() if presses.example_spec(n)])
def test_every_press_passes_the_kit_end_to_end(name, tiny):
  check_press(presses.example_spec(name), model=tiny)


def test_kit_end_to_end_on_tiny(tiny):
  check_press("snapkv", model=tiny)
  check_press("adakv(knorm)", model=tiny)


@pytest.mark.slow
@pytest.mark.usefixtures("drop_compiled_code")
@pytest.mark.parametrize("name", [n for n in presses.press_names() if presses.example_spec(n)
                                  and not presses.make_press(presses.example_spec(n)).rerotates])
def test_every_press_passes_the_kit_end_to_end_on_a_hybrid_model(name, tiny_gemma3):
  """Every press but the re-rotating ones (which refuse hybrid models: a clear SpecError), with
  sliding layers beside the pressed global one and a prompt row past the 16-token window (the
  fast lane checks kvzip's windows in tests/presses/test_kvzip.py)."""
  check_press(presses.example_spec(name), model=tiny_gemma3)


def test_budget_above_prompt_generates_as_the_full_cache(tiny):
  rows = _rows(tiny)
  rest = [[5, 9], [7, 4]]
  cache = kvjax.compress(tiny, rows, "snapkv", budget=100, room=16)
  got = kvjax.generate(tiny, rest, cache=cache, max_new_tokens=6, stop_at_eos=False).tokens
  want = kvjax.generate(tiny, [r + s for r, s in zip(rows, rest)], max_new_tokens=6,
                        stop_at_eos=False).tokens
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_ragged_rows_equal_each_row_alone(tiny):
  rows = _rows(tiny, (12, 7, 9))
  batch = presses.score_prompt(tiny, rows, "snapkv", ratio=0.5)
  for b, row in enumerate(rows):
    alone = presses.score_prompt(tiny, [row], "snapkv", ratio=0.5)
    n = len(row)
    np.testing.assert_allclose(np.asarray(batch.scores[:, b, :, :n]),
                               np.asarray(alone.scores[:, 0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.kept[:, b, :, :n]), np.asarray(alone.kept[:, 0]))
    np.testing.assert_allclose(np.asarray(batch.logits[b]), np.asarray(alone.logits[0]),
                               rtol=1e-4, atol=1e-4)


def test_ratio_and_budget_set_each_rows_count(tiny):
  rows = _rows(tiny, (12, 7))
  info = presses.score_prompt(tiny, rows, "knorm", ratio=0.5)
  np.testing.assert_array_equal(np.asarray(info.n_kept[0]), [6, 3])  # floor(n (1 - r))
  assert (np.asarray(info.kept).sum(-1)[:, 0] == 6).all() and (np.asarray(info.kept).sum(-1)[:, 1] == 3).all()
  info = presses.score_prompt(tiny, rows, "knorm", budget=8)
  np.testing.assert_array_equal(np.asarray(info.n_kept[0]), [8, 7])
  np.testing.assert_array_equal(presses.row_budgets([10, 3], ratio=0.875), [1, 1])


def test_cache_holds_the_kept_tokens_quantized(tiny):
  rows = _rows(tiny, (12,))
  full = kvjax.compress(tiny, rows, "knorm", ratio=0.5, room=4)
  small = kvjax.compress(tiny, rows, "knorm", ratio=0.5, room=4, storage="int4")
  assert kvjax.total_bytes(small) < kvjax.total_bytes(full) / 2
  np.testing.assert_array_equal(np.asarray(small.positions), np.asarray(full.positions))
  assert int(full.lengths[0]) == 12 and int(np.asarray(full.view().mask).sum(-1).max()) == 6


def test_pyramid_budgets_make_a_layered_cache(tiny):
  rows = _rows(tiny, (40,))
  cache = kvjax.compress(tiny, rows, "pyramidkv(window_size=4)", ratio=0.5)
  assert isinstance(cache, kvjax.LayeredCache)
  info = presses.score_prompt(tiny, rows, "pyramidkv(window_size=4)", ratio=0.5)
  budgets = np.asarray(info.n_kept[:, 0])
  assert budgets[0] > budgets[-1] and abs(budgets.mean() - 20) <= 1


def test_spec_strings_and_compat():
  p = presses.make_press("snapkv(window_size=16, pooling='avg')")
  assert (p.window_size, p.kernel_size, p.pooling) == (16, None, "avg")
  q = p.resolve("kvpress")
  assert (q.window_size, q.kernel_size, q.pooling) == (16, 5, "avg")  # explicit options stay
  assert presses.make_press("snapkv").resolve("kvpress").window_size == 64
  assert presses.make_press("snapkv").resolve(None).window == 32
  ada = presses.make_press("adakv(snapkv(window_size=8), alpha_safeguard=0.1)")
  assert ada.press.window_size == 8 and ada.alpha_safeguard == 0.1
  assert str(ada) == "adakv(snapkv(window_size=8), alpha_safeguard=0.1)"
  assert presses.make_press(str(ada)) == ada


@pytest.mark.parametrize("spec, words", [
    ("nosuch", "unknown press 'nosuch'"),
    ("snapkv(window_size=)", "not a literal"),
    ("snapkv(bogus=1)", "bogus"),
    ("snapkv(pooling='median')", "pooling"),
    ("adakv", "wraps a press"),
    ("snapkv) ", "unexpected"),
    ("think(knorm)", "think does not wrap a press"),
])
def test_bad_specs_name_the_problem(spec, words):
  with pytest.raises((SpecError, ValueError), match=words.replace("(", r"\(")):
    presses.make_press(spec)


def test_wraps_presses_tells_wrappers_from_scorers():
  assert presses.wraps_presses("adakv") and presses.wraps_presses("composed")
  assert not presses.wraps_presses("snapkv") and not presses.wraps_presses("think")
  with pytest.raises(SpecError, match="unknown press"):
    presses.wraps_presses("nope")


def test_bad_arguments_name_the_problem(tiny):
  rows = _rows(tiny, (8,))
  with pytest.raises(SpecError, match="exactly one of ratio"):
    kvjax.compress(tiny, rows, "knorm")
  with pytest.raises(SpecError, match="ratio must be in"):
    kvjax.compress(tiny, rows, "knorm", ratio=1.0)
  with pytest.raises(SpecError, match="budget must be"):
    kvjax.compress(tiny, rows, "knorm", budget=0)
  with pytest.raises(SpecError, match="compat"):
    kvjax.compress(tiny, rows, "knorm", ratio=0.5, compat="hf")
  with pytest.raises(ValueError, match="token ids must be in"):
    kvjax.compress(tiny, [[10**9]], "knorm", ratio=0.5)


# ---- your own press -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ValueNormPress(presses.Press):
  """Keeps the tokens whose values have the largest norm (a toy press for this test)."""

  name: ClassVar[str] = "value_norm"
  doc: ClassVar[str] = "largest value L2 norm (a test press)"

  def score(self, x, n_kept):
    return jnp.linalg.norm(x.v, axis=-1)


@dataclasses.dataclass(frozen=True)
class KeepsPadding(ValueNormPress):
  name: ClassVar[str] = "keeps_padding"

  def select(self, x, scores, n_kept):
    return jnp.ones(scores.shape, bool)


def test_a_user_press_end_to_end(tiny):
  presses.register_press(ValueNormPress)
  try:
    check_press("value_norm", model=tiny)
  finally:
    presses.unregister_press("value_norm")


def test_a_user_press_registers_and_composes():
  presses.register_press(ValueNormPress)
  try:
    check_press("value_norm")
    check_press("adakv(value_norm)")
    x = synthetic_inputs()
    keep = presses.make_press("value_norm").select(x, jnp.linalg.norm(x.v, axis=-1),
                                                   jnp.asarray([3, 3]))
    norms = np.linalg.norm(np.asarray(x.v[0, 0, :24]), axis=-1)
    assert set(np.nonzero(np.asarray(keep[0, 0]))[0]) == set(np.argsort(-norms)[:3])
  finally:
    presses.unregister_press("value_norm")
  assert "value_norm" not in presses.press_names()


def test_the_kit_catches_a_press_that_keeps_padding():
  with pytest.raises(PressError, match=r"\[padding\]"):
    check_press(KeepsPadding())


def test_hybrid_model_presses_its_global_layers_only():
  gemma = kvjax.load("tiny-gemma3")  # 5 sliding layers (window 16), 1 global
  rows = _rows(gemma, (40, 25))
  rest = [[5], [7]]
  cache = kvjax.compress(gemma, rows, "snapkv", budget=100, room=16)
  assert isinstance(cache, kvjax.HybridCache)
  got = kvjax.generate(gemma, rest, cache=cache, max_new_tokens=5, stop_at_eos=False).tokens
  want = kvjax.generate(gemma, [r + s for r, s in zip(rows, rest)], max_new_tokens=5,
                        stop_at_eos=False).tokens
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  info = presses.score_prompt(gemma, rows, "snapkv", ratio=0.5)
  assert info.layers == (5,) and info.scores.shape[0] == 1
  np.testing.assert_array_equal(np.asarray(info.n_kept), [[20, 12]])
  # one prefill replayed: the sliding layers' outputs come from another (equal) attention
  # program there, so the global layer's inputs agree to fp32 rounding, not bit for bit
  _same_compression(gemma, rows, presses.prefill(gemma, rows), "snapkv", ratio=0.5, atol=1e-4)


def test_sink_and_window_are_kept_whatever_the_press(tiny):
  rows = _rows(tiny, (20, 13))
  cache = kvjax.compress(tiny, rows, "random", ratio=0.5, sink=2, window=3, room=4)
  view = cache.view()
  pos, mask = np.asarray(view.positions), np.asarray(view.mask)
  for b, n in enumerate((20, 13)):
    held = [set(pos[l, b, h][mask[l, b, h]]) for l in range(pos.shape[0]) for h in range(pos.shape[2])]
    assert all({0, 1, n - 3, n - 2, n - 1} <= s for s in held)
  with pytest.raises(SpecError, match="sink must be"):
    kvjax.compress(tiny, rows, "random", ratio=0.5, sink=-1)


def _same_compression(model, rows, prefilled, spec, atol=1e-5, **kw):
  """compress from the ids and from a Prefilled give the same kept sets, scores and cache."""
  a, da = kvjax.compress(model, rows, spec, details=True, **kw)
  b, db = kvjax.compress(model, prefilled, spec, details=True, **kw)
  np.testing.assert_array_equal(np.asarray(da.kept), np.asarray(db.kept))
  np.testing.assert_allclose(np.asarray(da.scores), np.asarray(db.scores), rtol=1e-5, atol=atol)
  np.testing.assert_allclose(np.asarray(da.logits), np.asarray(db.logits), rtol=1e-5, atol=atol)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol)
  return a, b


def test_one_prefill_compresses_like_the_ids_for_every_press_and_ratio(tiny):
  rows = _rows(tiny, (20, 13))
  prefilled = presses.prefill(tiny, rows)
  assert prefilled.n_layers == tiny.config.n_layers and prefilled.nbytes > 0
  for spec, kw in [("snapkv", dict(ratio=0.5)), ("adakv(knorm)", dict(ratio=0.5)),
                   ("pyramidkv", dict(budget=6))]:  # one ScoredCache, a shared pool, layered
    a, b = _same_compression(tiny, rows, prefilled, spec, **kw)
  rest = [[5, 9], [7, 4]]
  np.testing.assert_array_equal(np.asarray(kvjax.generate(tiny, rest, cache=a, max_new_tokens=4).tokens),
                                np.asarray(kvjax.generate(tiny, rest, cache=b, max_new_tokens=4).tokens))
  score = presses.score_prompt(tiny, prefilled, "knorm", ratio=0.5)
  np.testing.assert_array_equal(np.asarray(score.kept),
                                np.asarray(presses.score_prompt(tiny, rows, "knorm",
                                                                ratio=0.5).kept))


def test_one_scoring_serves_every_ratio(tiny):
  """compress(scores=) with the scores of another ratio keeps what compress keeps by itself (a
  ratio sweep scores once), from the ids or a Prefilled; presses whose scores read the budget, and
  scores of the wrong shape, are refused."""
  rows = _rows(tiny, (20, 13))
  prefilled = presses.prefill(tiny, rows)
  for spec, sources in [("snapkv", (rows, prefilled)), ("pyramidkv", (prefilled,)),
                        ("adakv(knorm)", (prefilled,))]:  # one ScoredCache, layered, shared pool
    scores = presses.score_prompt(tiny, prefilled, spec, ratio=0.25).scores
    want, info = kvjax.compress(tiny, sources[0], spec, ratio=0.75, details=True)
    for ids in sources:
      got, given = kvjax.compress(tiny, ids, spec, ratio=0.75, scores=scores, details=True)
      np.testing.assert_array_equal(np.asarray(given.kept), np.asarray(info.kept))
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)
  with pytest.raises(SpecError, match="depend on the budget"):
    kvjax.compress(tiny, rows, "streaming_llm", ratio=0.5, scores=scores)
  with pytest.raises(SpecError, match=r"scores has shape \(4, 1, 4, 20\)"):
    kvjax.compress(tiny, rows, "snapkv", ratio=0.5, scores=scores[:, :1])


def test_a_saved_prefill_loads_back_bit_for_bit(tiny, tmp_path):
  rows = _rows(tiny, (20, 13))
  prefilled = presses.prefill(tiny, rows)
  presses.save_prefilled(prefilled, tmp_path / "pre")
  loaded = presses.load_prefilled(tmp_path / "pre")
  assert (loaded.rows, loaded.run, loaded.meta) == (prefilled.rows, prefilled.run, prefilled.meta)
  for x, y in zip(jax.tree.leaves((prefilled.q, prefilled.k, prefilled.v, prefilled.logits)),
                  jax.tree.leaves((loaded.q, loaded.k, loaded.v, loaded.logits))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  a = kvjax.compress(tiny, prefilled, "snapkv", ratio=0.5)
  b = kvjax.compress(tiny, loaded, "snapkv", ratio=0.5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(FileNotFoundError, match="holds no saved prefill"):
    presses.load_prefilled(tmp_path)


def test_a_prefilled_refuses_what_it_cannot_replay(tiny):
  rows = _rows(tiny)
  prefilled = presses.prefill(tiny, rows)
  with pytest.raises(SpecError, match="press='kvzip'"):
    kvjax.compress(tiny, prefilled, "kvzip", ratio=0.5)  # scores a longer (repeated) prompt
  repeated = presses.prefill(tiny, rows, press="kvzip")
  _same_compression(tiny, rows, repeated, "kvzip", ratio=0.5)
  with pytest.raises(SpecError, match="another press's prefill"):
    kvjax.compress(tiny, repeated, "knorm", ratio=0.5)
  other = kvjax.load("tiny-gemma3")
  with pytest.raises(SpecError, match="another model"):
    kvjax.compress(other, prefilled, "knorm", ratio=0.5)
