"""kvjax.sharding: caches and decoding over a device mesh, and across processes.

The test process has one CPU device, so the multi-device checks run in subprocesses with
`--xla_force_host_platform_device_count=8` (tests/sharding_checks.py) and, for multi-host, two
processes joined by `jax.distributed.initialize` on 127.0.0.1 with gloo collectives
(tests/multihost_worker.py). Checked:
  * sharded equals unsharded (greedy tokens equal, perplexity NLLs within fp32 tolerance): the full
    cache on 1, 2, 4 and 8 devices with batch, head and slot (flash-decoding) sharding; every kind
    with batch, head and both (slow); SmolLM2, whose 3 kv heads divide no mesh (slow);
  * the compiled decode loop gathers no cache buffer across devices (no all-gather / all-to-all of
    an [.., S, H] array) and still donates the cache (input/output aliases);
  * a second call on an equal mesh built anew compiles nothing;
  * the fallback table for head counts that do not divide the devices (no devices needed);
  * two processes decode a sharded batch to the tokens of a single process;
  * bytes per device follow the split; a kind that cannot split its slots says so;
  * Gemma 3 (one kv head, sliding and global layer groups in a HybridCache): batch or slot
    sharding carries the model axis; only the groups that can split their slots do (slow).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import kvjax
from kvjax import sharding as ks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_checks(suite: str, tmp_path, *extra) -> list[dict]:
  out = tmp_path / f"{suite}.json"
  env = dict(os.environ)  # the script sets its own device count and keeps the other flags
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_checks.py"), "--suite", suite,
                         "--out", str(out), *extra], capture_output=True, text=True, env=env,
                        timeout=3000, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(out.read_text())


def assert_equal_rows(rows):
  for row in rows:
    if "error" in row or "check" in row:
      continue
    where = f"{row['spec']} on {row['mesh']} ({row['rules']}): {row['plan']}"
    assert row["tokens_equal"], f"greedy tokens differ: {where}"
    assert row["nll_diff"] < 1e-4, f"NLLs differ by {row['nll_diff']}: {where}"


@pytest.mark.slow
def test_full_cache_sharded_equals_unsharded(tmp_path):
  rows = run_checks("tiny-full", tmp_path, "--hlo")
  assert_equal_rows(rows)
  by = {(r.get("mesh"), r.get("rules")): r for r in rows}
  one = by[("data=1", None)]["cache_bytes_per_device"]
  # batch split over 2/4/8 devices, slots over 2/4/8: each device holds 1/n of the cache (+lengths)
  for mesh, n in (("data=2", 2), ("data=4", 4), ("data=8", 8)):
    assert by[(mesh, None)]["cache_bytes_per_device"] < one / n + 64
  slot_rows = [r for r in rows if r.get("rules") and "slots=('model',)" in r["rules"] and "error" not in r]
  assert len(slot_rows) == 4
  for r in slot_rows:
    n = int(r["mesh"].split("model=")[1])
    assert r["cache_bytes_per_device"] < one / n + 64, r
    assert "slots over model" in r["plan"]
  for r in rows:
    if "big_collectives" in r:
      assert r["big_collectives"] == [], f"the decode loop moves cache buffers: {r}"
      assert r["aliases"] >= 3, f"the cache is no longer donated: {r}"
  errors = [r for r in rows if "error" in r]
  assert len(errors) == 1 and "cannot split its slots" in errors[0]["error"]
  (recompiles,) = [r for r in rows if r.get("check") == "recompiles"]
  assert recompiles["compiles"] == 0
  # 3 prompts on data=8: padded to 8 rows and split, not replicated (each device: one row)
  (padded,) = [r for r in rows if r.get("check") == "padded-batch"]
  assert padded["tokens_equal"] and padded["nll_diff"] < 1e-4, padded
  assert padded["shape"][0] == 3 and padded["cache_rows"] == 8, padded
  assert padded["cache_bytes_per_device"] < padded["cache_bytes"] / 8 + 64, padded
  assert "batch over data" in padded["plan"] and "padded to 8 rows" in padded["plan"], padded
  assert "batch is replicated" not in padded["plan"], padded


@pytest.mark.slow
def test_every_kind_sharded_equals_unsharded(tmp_path):
  rows = run_checks("tiny-kinds", tmp_path)
  assert len(rows) == 3 * 13 and not any("error" in r for r in rows)
  assert_equal_rows(rows)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_sharded_equals_unsharded(tmp_path):
  from tests.helpers import smollm2_or_skip

  smollm2_or_skip()  # skips here, not in the subprocess, when the wheel is absent
  rows = run_checks("smollm2", tmp_path)
  assert_equal_rows(rows)
  assert not any("error" in r for r in rows)
  notes = " ".join(r["plan"] for r in rows if r["mesh"].startswith("model"))
  assert "3 kv heads do not divide model=2" in notes


@pytest.mark.slow
def test_gemma3_hybrid_sharded_equals_unsharded(tmp_path):
  """tiny-gemma3 (one kv head, 16-token window on 5 of 6 layers): its default layout, full@all and
  int8@global on 8 devices decode a ragged batch of 10 rows longer than the window to the
  unsharded tokens and NLLs; the model axis carries the batch or the slots, never the heads."""
  rows = run_checks("gemma3", tmp_path)
  assert_equal_rows(rows)
  by = {(r["spec"], r["mesh"], r["rules"] is None, "model" in (r["rules"] or "").split("slots")[0]):
        r for r in rows}
  assert len(rows) == 3 * 4
  for spec in ("full", "full@all", "int8@global"):
    batch = by[(spec, "data=8", True, False)]
    assert "batch over data" in batch["plan"] and "padded to 16 rows" in batch["plan"]
    assert batch["cache_bytes_per_device"] <= batch["cache_bytes"] / 8 + 64
    both = by[(spec, "data=2,model=4", False, True)]  # batch over data x model
    assert "batch over dataxmodel" in both["plan"], both
    assert both["cache_bytes_per_device"] <= both["cache_bytes"] / 8 + 64
  # 10 rows on data=2,model=4: 1 kv head does not divide model=4, 10 rows do not divide 8
  default = by[("full", "data=2,model=4", True, False)]
  assert "1 kv heads do not divide model=4: the slots are split over model" in default["plan"]
  assert "in layer 5 (FullCache) only; layers 0-4 (WindowCache) keep every slot" in default["plan"]
  assert default["slot_split"] == [False, True]
  every = by[("full@all", "data=2,model=4", True, False)]  # one FullCache, a window per layer
  assert every["slot_split"] == [True] and "keep every slot" not in every["plan"]
  assert every["cache_bytes_per_device"] <= every["cache_bytes"] / 8 + 64
  quantized = by[("int8@global", "data=2,model=4", True, False)]
  assert "every model device holds all heads (duplicated)" in quantized["plan"]
  assert by[("full@all", "model=4", False, False)]["slot_split"] == [True]
  (refused,) = [r for r in rows if "error" in r]
  assert refused["spec"] == "int8@global" and refused["mesh"] == "model=4"
  assert "cannot split its slots" in refused["error"]


# ---- plans without devices --------------------------------------------------------------------
def abstract(**axes):
  return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_fallbacks_for_three_kv_heads(devices):
  cfg = kvjax.SMOLLM2_135M
  batch_split = ks.plan(abstract(model=devices), cfg, batch=8 * devices, capacity=2048)
  assert batch_split.rules.batch == ("model",) and batch_split.rules.kv_heads == ()
  assert "the batch is split over model instead" in batch_split.describe()
  assert not batch_split.rules.tensor_parallel
  slot_split = ks.plan(abstract(model=devices), cfg, batch=3, capacity=2048)
  assert slot_split.rules.slots == ("model",)
  assert "slots are split over model instead" in slot_split.describe()
  duplicated = ks.plan(abstract(model=devices), cfg, batch=3, capacity=2048, slot_sharding_ok=False)
  assert duplicated.rules == ks.AxisRules(batch=(), kv_heads=(), slots=(), tensor_parallel=False)
  assert "holds all heads" in duplicated.describe()


def test_gemma3_one_kv_head_plans_and_group_axes():
  """One kv head divides no model axis: the batch carries it when it divides data x model, else
  the global group's slots (the window groups keep theirs whole, noted), else duplication."""
  from kvjax.caches import base
  from kvjax.models.config import TINY_GEMMA3

  mesh = abstract(data=2, model=4)
  default = kvjax.make_cache("full", TINY_GEMMA3, 10, 64)
  plan = ks.plan_cache(mesh, TINY_GEMMA3, default)
  assert plan.rules.batch == ("data",) and plan.rules.slots == ("model",)
  assert not plan.rules.tensor_parallel
  assert plan.notes[-1] == ("slots split over model in layer 5 (FullCache) only; layers 0-4 "
                            "(WindowCache) keep every slot on each model device")
  split = default.with_slot_sharding(ks.SlotSharding.of(plan))
  window, full = base.cache_logical_axes(split).groups
  assert window.k == ("layers", "batch", "kv_heads", None, "head_dim") and window.pos[1] is None
  assert full.k == base.LOGICAL_AXES
  assert base.cache_logical_axes(default).groups[0].k == base.LOGICAL_AXES  # unsplit: all named
  from kvjax import planning  # the planner's per-device bytes: only the global group is split

  window_group, full_group = default.groups
  assert planning.bytes_per_device("full", TINY_GEMMA3, 64, 10, mesh=abstract(model=4)) == (
      sum(window_group.nbytes().values()) + 2 * full_group.k.nbytes // 4 + full_group.lengths.nbytes)
  eight = ks.plan_cache(mesh, TINY_GEMMA3, kvjax.make_cache("full", TINY_GEMMA3, 8, 64))
  assert eight.rules.batch == ("data", "model") and not eight.rules.slots
  every = ks.plan_cache(mesh, TINY_GEMMA3, kvjax.make_cache("full@all", TINY_GEMMA3, 10, 64))
  assert every.rules.slots == ("model",) and not any("keep every slot" in n for n in every.notes)
  int8 = kvjax.make_cache("int8@global", TINY_GEMMA3, 10, 64)
  assert not ks.supports_slot_sharding(int8)
  assert "holds all heads" in ks.plan_cache(mesh, TINY_GEMMA3, int8).describe()
  with pytest.raises(ValueError, match="cannot split its slots"):
    ks.plan_cache(abstract(model=4), TINY_GEMMA3, int8, rules=ks.AxisRules.parse("kv_heads=,slots=model"))


def test_default_rules_and_overrides():
  tiny = kvjax.TINY  # 4 kv heads
  both = ks.plan(abstract(data=2, model=4), tiny, batch=4, capacity=64)
  assert both.rules.batch == ("data",) and both.rules.kv_heads == ("model",)
  assert both.rules.tensor_parallel and not both.notes
  batch_only = ks.plan(abstract(data=8), tiny, batch=8, capacity=64)  # a 1-D mesh named data
  assert batch_only.rules.batch == ("data",) and batch_only.rules.kv_heads == ()
  rules = ks.AxisRules.parse("batch=,kv_heads=,slots=data*model")
  slots = ks.plan(abstract(data=2, model=4), tiny, batch=4, capacity=64, rules=rules)
  assert slots.rules.slots == ("data", "model") and slots.spec(ks.LOGICAL_AXES)[3] == ("data", "model")
  with pytest.raises(ValueError, match="LOGICAL_AXIS=MESH_AXES"):
    ks.AxisRules.parse("rows=data")
  with pytest.raises(ValueError, match="splits two logical axes"):
    ks.AxisRules(batch=("data",), kv_heads=("data",))
  with pytest.raises(ValueError, match="needs 6 devices"):
    ks.make_mesh("data=2,model=3")
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    ks.plan("data=2", tiny, batch=2)


def test_single_device_mesh_equals_no_mesh(tiny):
  mesh = ks.make_mesh("data=1")
  a = kvjax.generate(tiny, [[5, 6, 7], [8]], max_new_tokens=5, mesh=mesh)
  b = kvjax.generate(tiny, [[5, 6, 7], [8]], max_new_tokens=5)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.sharding.startswith("mesh {'data': 1}") and b.sharding is None
  cache = kvjax.make_cache("full", tiny, 2, 16, mesh=mesh)
  assert ks.max_bytes_per_device(cache) == sum(cache.nbytes().values())
  with pytest.raises(ValueError, match="runs on one device"):
    kvjax.generate(tiny, [[1, 2]], max_new_tokens=2, cache="none", mesh=mesh)


# ---- several processes --------------------------------------------------------------------------
def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh,rules", [("data=2,model=4", None),
                                        ("data=8", "batch=,kv_heads=,slots=data")])
def test_two_processes_decode_like_one(tmp_path, tiny, mesh, rules):
  """Two processes x 4 CPU devices, one 8-device mesh (gloo collectives on 127.0.0.1)."""
  port = free_port()
  env = dict(os.environ)  # the worker sets its own device count and keeps the other flags
  procs = []
  for pid in range(2):
    cmd = [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), "--process-id", str(pid),
           "--port", str(port), "--out", str(tmp_path / f"p{pid}.json"), "--mesh", mesh]
    if rules:
      cmd += ["--rules", rules]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env, cwd=ROOT))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  results = [json.loads((tmp_path / f"p{pid}.json").read_text()) for pid in range(2)]
  prompts = np.random.default_rng(0).integers(0, 250, (4, 12)).astype(np.int32)
  want = kvjax.generate(tiny, prompts, max_new_tokens=8, stop_at_eos=False).tokens
  for r in results:
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
    np.testing.assert_array_equal(np.array(r["tokens"]), want)


def test_flash_decoding_is_an_extension_of_the_full_cache(tiny):
  """Slot sharding lives in caches/slot_sharded.py; the full cache is `SlotShardable`, kinds
  that cannot split their slots are not."""
  from kvjax.caches import base

  assert isinstance(kvjax.make_cache("full", tiny, 1, 16), base.SlotShardable)
  assert not isinstance(kvjax.make_cache("window:8", tiny, 1), base.SlotShardable)
  assert ks.supports_slot_sharding(kvjax.make_cache("full", tiny, 1, 16))
