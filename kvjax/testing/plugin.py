"""pytest plugin for cache-kind tests: two lines in a user's test file.

  pytest_plugins = ["kvjax.testing.plugin"]

  def test_my_kind(check_kind):
    check_kind(my_factory)

`check_kind` is `check_cache_kind` with the example count of the run: `--kvjax-examples N`
(default 6) or the environment variable KVJAX_EXAMPLES, so a CI job can search harder than a
developer's fast loop.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
  parser.addoption("--kvjax-examples", type=int, default=None,
                   help="hypothesis examples per invariant in kvjax.testing checks (default 6)")


def examples(config) -> int:
  value = config.getoption("--kvjax-examples", default=None)
  if value is None:
    value = int(os.environ.get("KVJAX_EXAMPLES", "6"))
  return value


@pytest.fixture
def check_kind(request):
  """check_kind(factory, **kwargs): `kvjax.testing.check_cache_kind` with this run's example count."""
  from kvjax.testing import check_cache_kind

  def run(factory, **kwargs):
    kwargs.setdefault("max_examples", examples(request.config))
    return check_cache_kind(factory, **kwargs)

  return run
