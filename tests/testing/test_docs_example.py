"""docs/testing.md runs: its python block defines a kind from kvjax's public pieces and passes the
kit, which is what the page promises a user."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def test_testing_page_example_passes_the_kit():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0], "docs/testing.md", "exec"), namespace)
  assert {"contents", "positions", "n_valid", "budget", "model-forward"} <= set(namespace["checked"])
