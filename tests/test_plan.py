"""kvjax.planning: byte formulas against the caches' real arrays, and the planner's choice.

Invariants checked:
  * `estimate_bytes(spec, ...) == sum(make_cache(spec, ...).nbytes().values())` and so does
    `measured_bytes` (abstract shapes), for every candidate spec and the other kinds (offload,
    share:G over several inner kinds, window, tiered, dynamic), over hypothesis-generated configs,
    contexts, batches and dtypes; kinds whose module is not built are skipped;
  * `plan` returns a spec that fits, every more faithful candidate does not fit, a sized window is
    the largest that fits, a larger budget never gives a less faithful spec;
  * nothing fitting raises `PlanError` naming the smallest candidate; bad arguments raise.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import kvjax
from kvjax import planning as plan_lib
from kvjax.planning import PlanError, estimate_bytes, measured_bytes, plan, rank
from tests.helpers import examples

SPECS = ["full", "dynamic", "offload", "int8", "int4", "int3", "int2", "int4+residual:64",
         "int2+residual:64", "int8+group:16", "sink:4+window:32", "window:16", "tier:64:fp32,32:int4",
         "tier:8:bf16,16:int8,24:int2", "share:2", "share:3+int4", "share:2+sink:4+window:16",
         "share:2+offload"]

configs = st.builds(
    lambda layers, kv, g, h: kvjax.TINY.replace(n_layers=layers, n_kv_heads=kv, n_heads=kv * g, head_dim=h),
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.sampled_from([32, 64]))


def built(spec) -> bool:
  """The spec's kind (and a shared spec's inner kind) has a module."""
  return plan_lib.available(spec) and (spec.share == 1 or plan_lib.available(spec.replace(share=1)))


def real_bytes(spec, config, context, batch, dtype):
  return sum(kvjax.make_cache(spec, config, batch, context, dtype).nbytes().values())


@given(spec=st.sampled_from(SPECS), config=configs, context=st.integers(1, 300), batch=st.integers(1, 3),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
@examples(25)
def test_estimate_equals_real_nbytes(spec, config, context, batch, dtype):
  parsed = kvjax.parse_spec(spec)
  assume(built(parsed))  # kinds whose module is missing are left out
  assume(parsed.budget is None or parsed.budget <= context)
  want = real_bytes(parsed, config, context, batch, dtype)
  assert estimate_bytes(parsed, config, context, batch, dtype) == want
  assert measured_bytes(parsed, config, context, batch, dtype) == want


def test_rank():
  assert rank("full") == 0 and rank("int8") == 1 and rank("sink:4+window:77") == 6
  assert rank("tier:64:fp32,99:int4") == 8 and rank("window:8") is None and rank("int8+residual:32") is None


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_formula_on_smollm2_shapes(spec):
  parsed = kvjax.parse_spec(spec)
  if not built(parsed):
    pytest.skip(f"kind {parsed.kind!r} is not built")
  cfg = kvjax.SMOLLM2_135M.replace(n_layers=2)  # real head shapes, few layers: small arrays
  assert estimate_bytes(parsed, cfg, 200, 2) == real_bytes(parsed, cfg, 200, 2, jnp.float32)


def fixed_available():
  return [kvjax.parse_spec(c) for c in plan_lib.candidates() if isinstance(c, str) and plan_lib.available(c)]


def _sized_n(spec) -> int:
  return spec.window if spec.window is not None else spec.tiers[-1][0]


@given(budget=st.integers(1 << 14, 1 << 25), context=st.integers(70, 4000), batch=st.integers(1, 2))
@examples(25)
def test_plan_picks_most_faithful_fitting(budget, context, batch):
  cfg = kvjax.SMOLLM2_135M
  try:
    spec, nbytes = plan(cfg, budget, context, batch)
  except PlanError as e:
    assert "smallest candidate needs" in str(e)
    for s in fixed_available():
      assert estimate_bytes(s, cfg, context, batch) > budget
    return
  assert nbytes == estimate_bytes(spec, cfg, context, batch) <= budget
  for s in fixed_available():  # every more faithful fixed candidate does not fit
    if rank(s) < rank(spec):
      assert estimate_bytes(s, cfg, context, batch) > budget
  if spec.window is not None or spec.tiers is not None:  # a sized candidate: the largest that fits
    n = _sized_n(spec)
    bigger = str(spec).replace(f":{n}", f":{n + 1}", 1) if spec.window is not None else \
        str(spec).replace(f",{n}:", f",{n + 1}:")
    held = n + (spec.sink if spec.window is not None else 64)
    assert held == context or estimate_bytes(bigger, cfg, context, batch) > budget
  # More memory never gives a less faithful spec.
  more, _ = plan(cfg, budget * 2, context, batch)
  assert rank(more) <= rank(spec)


def test_exact_budgets():
  cfg = kvjax.SMOLLM2_135M
  full = estimate_bytes("full", cfg, 1024)
  assert plan(cfg, full, 1024) == (kvjax.parse_spec("full"), full)
  if plan_lib.available("int8"):
    assert str(plan(cfg, full - 1, 1024)[0]) == "int8"
  with pytest.raises(PlanError, match=r"no cache spec fits 1000 bytes for 1024 tokens x 1 rows of "
                                      r"smollm2-135m; the smallest candidate needs \d+ bytes"):
    plan(cfg, 1000, 1024)
  with pytest.raises(ValueError, match="context must be a positive int"):
    plan(cfg, 1000, 0)
  with pytest.raises(ValueError, match="max_bytes must be a positive int"):
    plan(cfg, -1, 10)


def test_missing_kinds_are_skipped(monkeypatch):
  cfg = kvjax.SMOLLM2_135M
  monkeypatch.setattr(plan_lib, "available", lambda spec: kvjax.parse_spec(spec).kind in ("full", "window"))
  budget = estimate_bytes("full", cfg, 4096) // 4  # int8 would fit, but is "not built"
  spec, _ = plan(cfg, budget, 4096)
  assert spec.kind == "window" and spec.sink == 4 and spec.window > 64
  monkeypatch.setattr(plan_lib, "available", lambda spec: False)
  with pytest.raises(PlanError, match="no candidate cache kind is available"):
    plan(cfg, 1 << 30, 10)


@pytest.mark.parametrize("spec", ["h2o:8+window:8", "int4+residual:32+h2o:8+window:32", "share:2+h2o:8+window:8"])
def test_kind_formula_equals_measured(spec):
  """Every built-in kind registers a formula, and it agrees with the arrays' abstract shapes."""
  from kvjax.planning import measured_bytes

  assert estimate_bytes(spec, kvjax.TINY, 64) == measured_bytes(spec, kvjax.TINY, 64)


def test_kind_without_formula_is_measured():
  """A registered kind that declares no byte formula is planned from its abstract shapes."""
  from kvjax.caches import registry
  from kvjax.caches.full import FullCache
  from kvjax.planning import measured_bytes

  def factory(spec, config, *, batch, capacity, dtype):
    return FullCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                          head_dim=config.head_dim, capacity=capacity, dtype=dtype)

  registry.register_kind("noformula", factory)
  try:
    assert estimate_bytes("noformula", kvjax.TINY, 64) == measured_bytes("noformula", kvjax.TINY, 64)
    assert estimate_bytes("noformula", kvjax.TINY, 64) == estimate_bytes("full", kvjax.TINY, 64)
  finally:
    registry.unregister_kind("noformula")
