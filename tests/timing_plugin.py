"""Where the suite's time goes: wall time and XLA compilations per test, as a JSON report.

Every test's setup + call + teardown is timed, and `kvjax.compile_stats()` is read before and
after it, so the report says how many executables each test built and how long XLA took to build
them (tracing, lowering, compiling). Under xdist the numbers travel from the workers to the
controller on each report's `user_properties`, so one file covers the whole run:

  python -m pytest -q -n 2 --timing-report=timings.json   # default: .pytest_cache/kvjax-timings.json
  python scripts/test_timings.py timings.json             # the top 20 by wall time and by compiles

`compiles` counts every executable a test obtained, built or loaded from the persistent
compilation cache (JAX times both as a backend compile); `cache_hits` says how many of them were
loads (`/jax/compilation_cache/cache_hits`), so a warm run shows the same compiles, more hits and
fewer compile seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import pytest

_HITS = {"n": 0}


def _on_event(event: str, **_):
  if event == "/jax/compilation_cache/cache_hits":
    _HITS["n"] += 1


jax.monitoring.register_event_listener(_on_event)

_START = pytest.StashKey[tuple]()
_RESULTS: dict[str, dict] = {}


def pytest_addoption(parser):
  parser.addoption("--timing-report", default=None, metavar="PATH",
                   help="write wall time and XLA compiles per test as JSON to PATH "
                        "(default .pytest_cache/kvjax-timings.json)")


def _counters():
  from kvjax.decode import compile_stats

  stats = compile_stats()
  return time.perf_counter(), stats["n_compiles"], stats["compile_s"], _HITS["n"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  item.stash[_START] = _counters()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if call.when == "teardown" and _START in item.stash:
    t0, n0, s0, h0 = item.stash[_START]
    t1, n1, s1, h1 = _counters()
    report.user_properties.append(("kvjax_timing", {
        "wall_s": round(t1 - t0, 3), "compiles": n1 - n0, "compile_s": round(s1 - s0, 3),
        "cache_hits": h1 - h0, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}))


def pytest_runtest_logreport(report):
  if report.when != "teardown":
    return
  for name, value in report.user_properties:
    if name == "kvjax_timing":
      _RESULTS[report.nodeid] = value


def pytest_sessionfinish(session):
  if os.environ.get("PYTEST_XDIST_WORKER") or not _RESULTS:
    return  # workers send their numbers to the controller, which writes the one file
  path = session.config.getoption("--timing-report") or os.path.join(
      str(session.config.rootpath), ".pytest_cache", "kvjax-timings.json")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  total = sum(r["wall_s"] for r in _RESULTS.values())
  with open(path, "w") as f:
    json.dump({"tests": _RESULTS, "n_tests": len(_RESULTS), "sum_wall_s": round(total, 1),
               "sum_compiles": sum(r["compiles"] for r in _RESULTS.values())}, f, indent=1)
