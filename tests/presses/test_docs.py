"""docs/presses.md lists every registered press (fast lane)."""

from __future__ import annotations

import pathlib

from kvjax import presses

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "presses.md"


def test_every_press_is_in_the_catalogue():
  text = DOC.read_text()
  missing = [n for n in presses.press_names()
             if f"`{presses.example_spec(n) or n}`" not in text and f"`{n}(" not in text]
  assert not missing, f"docs/presses.md does not list {missing}"
