"""`kvjax.generate` end to end on the tiny model.

Invariants checked:
  * greedy decoding gives identical tokens with cache="full", "dynamic" and "none" (recomputing the
    prefix every step), for batch 1 and a ragged batch; left-padded array prompts with
    `prompt_lengths` + padding="left" equal the list form and the right-padded array form;
  * the cached result equals greedy decoding by repeated uncached `llama.forward`;
  * sampling with a fixed seed (int or PRNG key) is reproducible, another seed differs, top_k=1 is greedy;
  * EOS stops each row on its own: the row pads after its EOS, the other rows go on unchanged;
  * streaming: `on_tokens` receives exactly the final tokens, in order;
  * "dynamic" starts small, doubles its capacity while decoding and still equals "full";
  * a second generate with the same shapes compiles nothing (`compile_stats()["n_compiles"]`), nor
    does another max_new_tokens or prompt length inside the same buckets;
  * capacity is checked before running: exactly enough slots works, one too few is CapacityError;
  * bad arguments raise ValueError/TypeError naming the problem.

`lively` is `tiny` with its matrices scaled by 5 (see tests/test_llama.py): the unscaled random
weights make greedy decoding repeat one token, which would hide cache bugs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.loading import Model
from kvjax.models import llama

PROMPTS = [[72, 105, 32, 116, 104, 101, 114, 101], [7, 200, 13], [99, 1, 2, 3, 4, 250]]
NEW = 12


@pytest.fixture(scope="module")
def lively(tiny):
  params = jax.tree_util.tree_map(lambda p: p * 5.0 if p.ndim > 1 else p, tiny.params)
  return Model("tiny-lively", tiny.config, params, tiny.tokenizer)


def gen(model, prompts, **kw):
  """generate with NEW tokens, no EOS, and 64 slots: "full" then shares executables with "dynamic"."""
  kw.setdefault("max_new_tokens", NEW)
  kw.setdefault("capacity", 64)
  kw.setdefault("stop_at_eos", False)
  return kvjax.generate(model, prompts, **kw)


@pytest.fixture(scope="module")
def reference(lively):
  """Greedy tokens by repeated uncached forward over the growing prefix (padded to 32 tokens)."""
  seqs = [list(p) for p in PROMPTS]
  for _ in range(NEW):
    tokens = np.zeros((3, 32), np.int32)
    for b, s in enumerate(seqs):
      tokens[b, :len(s)] = s
    lengths = np.array([len(s) for s in seqs])
    logits = np.asarray(llama.forward(lively.config, lively.params, jnp.asarray(tokens),
                                      jnp.asarray(lengths)))
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits[b, len(s) - 1])))
  return np.array([s[len(p):] for s, p in zip(seqs, PROMPTS)], np.int32)


# ---- greedy equivalences --------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["batch1", "ragged"])
def test_greedy_identical_across_cache_modes(lively, reference, rows):
  prompts = [PROMPTS[r] for r in rows]
  results = {mode: gen(lively, prompts, cache=mode) for mode in ("full", "dynamic", "none")}
  for mode, res in results.items():
    assert res.tokens.shape == (len(rows), NEW) and res.tokens.dtype == np.int32, mode
    np.testing.assert_array_equal(res.tokens, reference[rows], err_msg=mode)
    np.testing.assert_array_equal(res.n_generated, NEW)
  assert len(set(reference[0].tolist())) > 3  # varied output, so the comparison means something
  full = results["full"]
  assert results["dynamic"].cache.capacity == 64  # enough: it never had to grow
  assert full.spec == "full" and results["none"].spec == "none"
  np.testing.assert_array_equal(full.prompt_lengths, [len(p) for p in prompts])
  np.testing.assert_array_equal(np.asarray(full.cache.lengths), full.prompt_lengths + NEW - 1)
  assert full.cache_bytes["device"] > 0 and results["none"].cache_bytes == {}
  assert np.isfinite(full.decode_tok_per_s) and full.prefill_s > 0


def test_left_and_right_padded_arrays_equal_list_form(lively, reference):
  width = 10
  left = np.full((3, width), 7, np.int32)
  right = np.full((3, width), 9, np.int32)
  for b, p in enumerate(PROMPTS):
    left[b, width - len(p):] = p
    right[b, :len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS])
  inputs = left.copy(), lengths.copy()
  as_left = gen(lively, left, prompt_lengths=lengths, padding="left")
  np.testing.assert_array_equal(left, inputs[0])  # the caller's arrays are untouched
  np.testing.assert_array_equal(lengths, inputs[1])
  as_right = gen(lively, jnp.asarray(right), prompt_lengths=lengths)
  np.testing.assert_array_equal(as_left.tokens, reference)
  np.testing.assert_array_equal(as_right.tokens, reference)
  np.testing.assert_array_equal(as_left.prompt_ids[1, :3], PROMPTS[1])
  # A 1-D array is one row.
  np.testing.assert_array_equal(gen(lively, np.array(PROMPTS[0])).tokens, reference[:1])


def test_text_prompt_uses_tokenizer(tiny):
  res = kvjax.generate(tiny, "Hi", max_new_tokens=3, capacity=64)
  np.testing.assert_array_equal(res.prompt_ids, [[72, 105]])
  batch = kvjax.generate(tiny, ["Hi", "Hello", "Hey"], max_new_tokens=3, capacity=64)
  np.testing.assert_array_equal(batch.tokens[0], res.tokens[0])
  np.testing.assert_array_equal(batch.prompt_lengths, [2, 5, 3])


# ---- sampling -------------------------------------------------------------------------------------
def test_sampling_reproducible_and_top_k_1_is_greedy(lively, reference):
  hot = kvjax.Sampler(temperature=1.0)
  a = gen(lively, PROMPTS, sampler=hot, seed=3)
  b = gen(lively, PROMPTS, sampler=hot, seed=3)
  c = gen(lively, PROMPTS, sampler=hot, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  assert (a.tokens != reference).any()
  key = gen(lively, PROMPTS, sampler=hot, seed=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(key.tokens, a.tokens)
  top1 = gen(lively, PROMPTS, sampler=kvjax.Sampler(temperature=1.5, top_k=1), seed=5, cache="none")
  np.testing.assert_array_equal(top1.tokens, reference)


# ---- EOS and streaming ----------------------------------------------------------------------------
def eos_candidate(row):
  """A token whose first occurrence in `row` is at index >= 2 (and its index)."""
  for i, t in enumerate(row):
    if i >= 2 and t not in row[:i]:
      return int(t), i
  raise AssertionError(f"no usable EOS candidate in {row}")


@pytest.mark.parametrize("mode", ["full", "none"])
def test_eos_stops_each_row(lively, reference, mode):
  eos, at = eos_candidate(reference[0].tolist())
  pad = 258
  res = gen(lively, PROMPTS, cache=mode, eos_id=eos, pad_id=pad)
  for b in range(3):
    row = reference[b].tolist()
    stop = row.index(eos) + 1 if eos in row else NEW
    assert res.n_generated[b] == stop, (b, row)
    np.testing.assert_array_equal(res.tokens[b, :stop], row[:stop])
    assert (res.tokens[b, stop:] == pad).all()
  assert res.n_generated[0] == at + 1
  assert any(eos not in reference[b].tolist() for b in (1, 2)), "pick an EOS that another row never hits"
  # pad_id defaults to eos_id.
  res2 = gen(lively, PROMPTS, cache=mode, eos_id=eos)
  assert (res2.tokens[0, at + 1:] == eos).all()


def test_all_rows_done_stops_early(lively, reference):
  eos = int(reference[0, 0])  # row 0 stops at once; other rows stop at their own first eos or run on
  res = gen(lively, PROMPTS[:1], eos_id=eos, pad_id=0)
  assert res.n_generated[0] == 1
  np.testing.assert_array_equal(res.tokens[0], [eos] + [0] * (NEW - 1))


@pytest.mark.parametrize("mode,chunk", [("full", 1), ("full", 5), ("none", 1)])
def test_streaming_receives_final_tokens(lively, reference, mode, chunk):
  eos, _ = eos_candidate(reference[0].tolist())
  blocks = []
  res = gen(lively, PROMPTS, cache=mode, eos_id=eos, pad_id=258,
            on_tokens=lambda blk: blocks.append(np.array(blk)), stream_chunk=chunk)
  assert all(blk.shape[0] == 3 for blk in blocks)
  streamed = np.concatenate(blocks, axis=1)
  np.testing.assert_array_equal(streamed, res.tokens)
  if mode == "full" and chunk == 5:
    assert [blk.shape[1] for blk in blocks] == [1, 5, 5, 1]


# ---- dynamic growth ---------------------------------------------------------------------------------
def test_dynamic_cache_grows_and_equals_full(lively):
  # 60 + 12 tokens: a dynamic cache starts at 64 slots and must double once while decoding.
  prompts = [PROMPTS[0] * 7 + [1, 2, 3, 4], PROMPTS[1], PROMPTS[2] * 9]
  dyn = gen(lively, prompts, cache="dynamic", capacity=None)
  assert dyn.cache.capacity == 128
  full = gen(lively, prompts, cache="full", capacity=None)
  assert full.cache.capacity == 128  # the default: prompt + new tokens, bucketed
  np.testing.assert_array_equal(dyn.tokens, full.tokens)
  np.testing.assert_array_equal(np.asarray(dyn.cache.lengths), np.asarray(full.cache.lengths))
  np.testing.assert_allclose(np.asarray(dyn.cache.k[:, 0, :, :60]), np.asarray(full.cache.k[:, 0, :, :60]),
                             atol=1e-5)


# ---- compiles ------------------------------------------------------------------------------------
def test_no_recompile_for_same_shapes(lively):
  gen(lively, [[5, 6, 7]], max_new_tokens=5)
  before = kvjax.compile_stats()["n_compiles"]
  assert before >= 2  # the counter counts (at least this test's prefill and decode)
  gen(lively, [[5, 6, 7]], max_new_tokens=5)
  assert kvjax.compile_stats()["n_compiles"] == before, "same call compiled again"
  # Another max_new_tokens in the same output bucket (16) and another prompt in the same bucket.
  res = gen(lively, [[1, 2, 3, 4, 5]], max_new_tokens=9)
  assert kvjax.compile_stats()["n_compiles"] == before, "max_new_tokens / prompt length recompiled"
  assert res.n_compiles == 0 and res.compile_s == 0 and res.tokens.shape == (1, 9)
  # Different eos and seeds are run-time values too, and so is streaming's chunking.
  gen(lively, [[5, 6, 7]], max_new_tokens=5, eos_id=3, seed=11, on_tokens=lambda _: None)
  gen(lively, [[5, 6, 7]], max_new_tokens=5, seed=jax.random.PRNGKey(4), on_tokens=lambda _: None,
      stream_chunk=3)
  assert kvjax.compile_stats()["n_compiles"] == before


def test_rows_and_texts_stop_at_eos(lively, reference):
  """`rows()` cuts each row at what it generated and drops its final EOS, so decoding a row
  prints no padding; `tokens` keeps its fixed shape."""
  eos = int(reference[1, 2])
  res = gen(lively, PROMPTS, eos_id=eos, stop_at_eos=True)
  first = int(np.argmax(reference[1] == eos))  # row 1 stops at its first EOS
  assert res.rows()[1].tolist() == reference[1, :first].tolist()
  assert res.rows(keep_eos=True)[1].tolist() == reference[1, :first + 1].tolist()
  assert res.tokens.shape == (3, NEW)
  text = res.texts(lively.tokenizer)
  assert text[1] == lively.tokenizer.decode(reference[1, :first])


def test_decode_time_excludes_compiling(lively, monkeypatch):
  """A first call reports the decode loop's speed, not its compile time: seconds the loop spends
  compiling (here a stand-in that reports 1 s of compiling through jax.monitoring, as XLA does)
  are counted in compile_s, never in decode_s."""
  from kvjax import decode

  real = decode._decode

  def compiling_decode(*args, **kwargs):
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
      time.sleep(0.05)
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration",
                                              time.perf_counter() - start)
    return real(*args, **kwargs)

  gen(lively, [[5, 6, 7]], max_new_tokens=5)
  monkeypatch.setattr(decode, "_decode", compiling_decode)
  res = gen(lively, [[5, 6, 7]], max_new_tokens=5)
  assert res.compile_s >= 1.0 and res.decode_s < 0.5, (res.compile_s, res.decode_s)


# ---- capacity ------------------------------------------------------------------------------------
def test_capacity_exactly_enough(lively):
  prompt = (PROMPTS[0] * 7)[:53]
  need = len(prompt) + NEW - 1  # the last token is never fed back: 64 slots
  res = gen(lively, [prompt], capacity=need)
  assert res.cache.capacity == need
  np.testing.assert_array_equal(res.n_generated, NEW)
  np.testing.assert_array_equal(np.asarray(res.cache.lengths), need)
  assert not bool(res.cache.overflowed()[0])
  assert float(np.abs(np.asarray(res.cache.k[:, 0, :, need - 1])).max()) > 0  # the last slot was written
  with pytest.raises(kvjax.CapacityError, match=f"needs {need} cache slots.*capacity is {need - 1}"):
    gen(lively, [prompt], capacity=need - 1)
  with pytest.raises(kvjax.CapacityError, match="does not fit"):
    gen(lively, [prompt], capacity=4)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=100, capacity=16), kvjax.CapacityError, "max_new_tokens=100"),
    (dict(capacity=0), ValueError, "capacity must be a positive int"),
    (dict(cache="foo"), ValueError, "foo"),
    (dict(cache="int5"), ValueError, "int5"),
    (dict(cache="window:0"), ValueError, "window"),
    (dict(cache="sink:8"), ValueError, "sink:8"),
    (dict(cache=3), TypeError, "cache spec must be a string"),
    (dict(padding="middle"), ValueError, "padding must be 'left' or 'right'"),
    (dict(sampler="greedy"), TypeError, "sampler must be a kvjax.Sampler"),
])
def test_generate_rejects_bad_arguments(tiny, kwargs, exc, fragment):
  kwargs.setdefault("max_new_tokens", 4)
  with pytest.raises(exc, match=fragment):
    kvjax.generate(tiny, [[1, 2, 3]], **kwargs)


@pytest.mark.parametrize("prompts,kwargs,exc,fragment", [
    ([], {}, ValueError, "empty prompt"),
    ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
    ([[1, 2], [3, 260]], {}, ValueError, r"\[0, 260\).*max 260"),
    ([[-1, 2]], {}, ValueError, r"\[0, 260\).*min -1"),
    (np.zeros((2, 3, 4), np.int32), {}, ValueError, r"\[batch, length\]"),
    (np.zeros((2, 3), np.float32), {}, TypeError, "must be integers"),
    (np.zeros((2, 3), np.int32), dict(prompt_lengths=[1, 4]), ValueError, "prompt_lengths must lie"),
    (np.zeros((2, 3), np.int32), dict(prompt_lengths=[1]), ValueError, "prompt_lengths must be integers of shape"),
    (np.zeros((2, 3), np.int32), dict(prompt_lengths=[1, 0]), ValueError, "prompt_lengths must lie"),
    ([[1, 2], 3], {}, TypeError, "prompts must be"),
    # float ids are refused wherever they hide, never truncated to ints
    ([1.0, 2.0], {}, TypeError, "integer token ids"),
    ([[1, 2], [3.5, 4]], {}, TypeError, "prompt 1 must hold integer token ids"),
    ([np.array([1.0, 2.0])], {}, TypeError, "must be integers, got dtype float64"),
    ([np.zeros((2, 2), np.int32)], {}, ValueError, "1-D sequence"),
    ([True, False], {}, TypeError, "integer token ids"),
])
def test_generate_rejects_bad_prompts(tiny, prompts, kwargs, exc, fragment):
  with pytest.raises(exc, match=fragment):
    kvjax.generate(tiny, prompts, max_new_tokens=4, **kwargs)


def test_text_prompt_needs_tokenizer(tiny):
  bare = Model("bare", tiny.config, tiny.params, None)
  with pytest.raises(TypeError, match="tokenizer"):
    kvjax.generate(bare, "hello", max_new_tokens=2)


def test_make_cache_rejects_budget_over_capacity():
  with pytest.raises(kvjax.SpecError, match="more than the capacity 64"):
    kvjax.make_cache("window:128", kvjax.TINY, 1, 64)
  with pytest.raises(kvjax.SpecError, match="'none'"):
    kvjax.make_cache("none", kvjax.TINY, 1, 64)
  with pytest.raises(ValueError, match="batch must be a positive int"):
    kvjax.make_cache("full", kvjax.TINY, 0, 64)
  with pytest.raises(ValueError, match="capacity must be a positive int"):
    kvjax.make_cache("full", kvjax.TINY, 1, 0)


# ---- overflow is reported, never silent ------------------------------------------------------------
def test_result_reports_overflow_and_refuses_overflowed_rows(lively):
  res = gen(lively, PROMPTS)
  assert res.overflowed.shape == (3,) and not res.overflowed.any()
  # A cache whose row 1 overflowed inside the user's own jit (the write was dropped by design).
  cache = kvjax.make_cache("full", lively.config, 2, 16)
  k = jnp.ones((4, 2, 4, 20, 64))
  cache = jax.jit(lambda c, k: kvjax.append(c, k, k, jnp.array([3, 20])))(cache, k)
  assert cache.overflowed().tolist() == [False, True]
  with pytest.raises(kvjax.CapacityError, match=r"rows \[1\] of the given cache already dropped"):
    kvjax.generate(lively, [[1, 2], [3]], max_new_tokens=2, cache=cache)


def test_any_model_object_with_a_step_is_a_model(lively, reference):
  """generate needs params, config and step only; a bare object of the three gives the same
  tokens, and something that is not a model is refused by name."""

  class Bare:
    def __init__(self, params, config, step):
      self.params, self.config, self.step = params, config, step

  bare = Bare(lively.params, lively.config, lively.step)
  np.testing.assert_array_equal(gen(bare, PROMPTS).tokens, gen(lively, PROMPTS).tokens)
  with pytest.raises(TypeError, match="lacks step"):
    kvjax.generate(object.__new__(type("NoStep", (), {"params": 1, "config": 2})), [[1]],
                   max_new_tokens=2)
  with pytest.raises(TypeError, match="model.config must have a positive int n_layers"):
    kvjax.generate(Bare(lively.params, object(), lively.step), [[1]], max_new_tokens=2)


def test_compiles_are_shared_by_models_of_one_config_and_freed_with_the_model(lively):
  """The step is a static jit argument keyed by value (config, dtype), not by the model object:
  another model of the same config compiles nothing, and kvjax never keeps a model alive."""
  import gc
  import weakref

  twin = Model("twin", lively.config, jax.tree_util.tree_map(lambda p: p + 0.0, lively.params),
               lively.tokenizer)
  gen(lively, [[5, 6, 7]], max_new_tokens=5)
  before = kvjax.compile_stats()["n_compiles"]
  gen(twin, [[5, 6, 7]], max_new_tokens=5)
  assert kvjax.compile_stats()["n_compiles"] == before
  ref = weakref.ref(twin)
  del twin
  gc.collect()
  assert ref() is None, "the compiled executables keep the model (and its params) alive"


def test_clear_caches_only_past_a_count_of_memory_maps():
  maps = kvjax.memory_maps()
  if maps is None:  # not Linux: nothing to count, so it always clears
    assert kvjax.clear_caches(maps_above=10**9)
    return
  assert maps > 0
  assert not kvjax.clear_caches(maps_above=10**9)  # far below: nothing dropped (the conftest's
  # module fixture clears past its own count: the other branch runs there)
