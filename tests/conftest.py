pytest_plugins = ["kvjax.testing.plugin"]

import os

# Tests run on the CPU in float32; keep XLA from grabbing every core for one test's threads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import kvjax  # noqa: E402

jax.config.update("jax_enable_x64", False)


# ---- compiled code must not pile up in one process -------------------------------------------------
# Every XLA:CPU executable maps ~9 regions of memory, and the kernel allows a process 65530
# (vm.max_map_count). The whole suite in one process (`python -m pytest -q`, no -n) builds well
# over 7000 executables: once the maps ran out, LLVM aborted mid-compile ("Fatal Python error",
# seen at tests/test_prefix.py after ~320 tests while a module-level table kept every executable
# alive). So: JAX's caches are dropped after each module, and the maps left after that must stay
# near what the first module left: anything that keeps compiled code alive across modules (a
# table of executables, a cache keyed by models) fails here, in CI, long before the limit.
def _memory_maps() -> int | None:
  try:
    with open(f"/proc/{os.getpid()}/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return None


_RESIDUAL: dict = {}
_GROWTH_LIMIT = 6000  # ~650 executables kept alive across modules


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code(request):
  yield
  kvjax.clear_caches()
  maps = _memory_maps()
  if maps is None:
    return
  first = _RESIDUAL.setdefault("first", maps)
  assert maps - first < _GROWTH_LIMIT, (
      f"{maps} memory maps remain after {request.module.__name__} and a cache clear, {maps - first} "
      f"more than after the first module: something keeps compiled executables alive across tests; "
      f"one process would run out of vm.max_map_count and abort")


@pytest.fixture(scope="session")
def tiny():
  """The random-weight 4-layer tiny model (MHA) with its byte tokenizer."""
  import kvjax

  return kvjax.load("tiny")


@pytest.fixture(scope="session")
def tiny_gqa(tiny):
  """Like tiny but with 2 kv heads for 4 query heads (GQA), random weights."""
  import jax.numpy as jnp

  import kvjax
  from kvjax.loading import Model
  from kvjax.models import llama

  cfg = kvjax.TINY.replace(n_kv_heads=2, name="tiny-gqa")
  return Model("tiny-gqa", cfg, llama.init_params(cfg, 1, jnp.float32), tiny.tokenizer)
