"""pytest plugin for cache-kind tests: two lines in a user's test file.

  pytest_plugins = ["kvjax.testing.plugin"]

  def test_my_kind(check_kind):
    check_kind(make_my_kind)        # or a spec string: check_kind("mykind:64")

`check_kind` is `check_cache_kind` with this run's settings:
  --kvjax-kit quick|thorough   (or KVJAX_KIT) quick: one shape and few examples, for a development
                               loop; thorough (the default): every shape, the full example count
  --kvjax-examples N           (or KVJAX_EXAMPLES) examples per invariant of a thorough run
                               (default 6), so a CI job can search harder than a developer's loop

A suite that wants both, quick in its fast lane and thorough in a slow one, can parametrize the
fixture: `@pytest.mark.parametrize("kvjax_kit", ["quick", "thorough"])` on the test (or a
conftest fixture named `kvjax_kit` with those params) overrides the option per test.
"""

from __future__ import annotations

import os

import pytest

KITS = ("quick", "thorough")


def pytest_addoption(parser):
  group = parser.getgroup("kvjax", "kvjax.testing conformance kit")
  group.addoption("--kvjax-examples", type=int, default=None,
                  help="hypothesis examples per invariant in thorough kvjax.testing checks (default 6)")
  group.addoption("--kvjax-kit", choices=KITS, default=None,
                  help="quick (one shape, few examples) or thorough (default) conformance checks")


def examples(config) -> int:
  value = config.getoption("--kvjax-examples", default=None)
  if value is None:
    value = int(os.environ.get("KVJAX_EXAMPLES", "6"))
  return value


@pytest.fixture
def kvjax_kit(request) -> str:
  """'quick' or 'thorough': the kit setting of this run (option, then KVJAX_KIT, then thorough)."""
  kit = request.config.getoption("--kvjax-kit", default=None) or os.environ.get("KVJAX_KIT", "thorough")
  if kit not in KITS:
    raise pytest.UsageError(f"KVJAX_KIT={kit!r}: choose one of {KITS}")
  return kit


@pytest.fixture
def check_kind(request, kvjax_kit):
  """check_kind(kind, **kwargs): `kvjax.testing.check_cache_kind` with this run's settings; `kind`
  is a spec string or a factory(spec, config, *, batch, capacity, dtype)."""
  from kvjax.testing import check_cache_kind

  def run(kind, **kwargs):
    kwargs.setdefault("max_examples", examples(request.config))
    kwargs.setdefault("quick", kvjax_kit == "quick")
    return check_cache_kind(kind, **kwargs)

  return run
