"""experiments/leaderboard.py: the quick mode on the tiny model writes a leaderboard.json of the
promised shape, the SVG, and a results.md section.

Cut down from --quick (one press, one ratio, two tasks; full lane since 2026-12-07, for the fast
lane's budget): every (press, ratio, setting)
row holds per-task scores in [0, 1], their average and the sample counts; the query-agnostic row
asks each key of the niah_multiquery context on its own (each_key); the full cache (ratio 0) is
recorded once and shows under both settings in `averages`. The numbers of a random model mean
nothing. tests/test_experiments.py runs the whole --quick mode in the slow lane.
"""

import json
import subprocess
import sys

import pytest

from tests.test_experiments import EXPERIMENTS, REPO, check_common, run_in_process

TASKS = ["niah_multiquery", "vt"]


def test_leaderboard_quick_structure(tmp_path):
  run_in_process("leaderboard", tmp_path, "--quick", "--strict", "--presses", "snapkv",
                 "--ratios", "0.5", "--tasks", *TASKS)
  d = json.loads((tmp_path / "leaderboard.json").read_text())
  check_common(d, "leaderboard")
  st = d["settings"]
  assert st["model"] == "tiny" and st["presses"] == {"snapkv": "snapkv"} and st["tasks"] == TASKS
  assert d["wall_s"] > 0 and d["machine"]["cpu_count"] >= 1
  (length,) = st["lengths"]
  assert [s["task"] for s in d["samples"][str(length)]] == TASKS

  rows = {(r["press"], r["ratio"], r["setting"]): r for r in d["results"]}
  assert set(rows) == {("full", 0.0, "both"), ("snapkv", 0.5, "query_agnostic"),
                       ("snapkv", 0.5, "query_aware")}
  for r in rows.values():
    assert set(r["scores"]) == set(TASKS)
    assert all(0.0 <= v <= 1.0 for v in r["scores"].values())
    assert r["average"] == pytest.approx(sum(r["scores"].values()) / len(TASKS))
    assert all(r["n"][t] == 1 for t in TASKS)
    assert r["wall_s"] >= 0 and len(r["answers"]) == sum(r["n"].values())
  # Several questions of one compressed context: the multiquery context's keys one at a time.
  for key in (("full", 0.0, "both"), ("snapkv", 0.5, "query_agnostic")):
    assert rows[key]["n"]["each_key"] == st["each_key"] == 2
    assert 0.0 <= rows[key]["each_key"] <= 1.0
  assert rows[("snapkv", 0.5, "query_aware")]["each_key"] is None

  averages = d["averages"][str(length)]
  for setting in ("query_agnostic", "query_aware"):
    assert averages[setting]["full"] == {"0.0": rows[("full", 0.0, "both")]["average"]}
    assert averages[setting]["snapkv"] == {"0.5": rows[("snapkv", 0.5, setting)]["average"]}
  svg = (tmp_path / "leaderboard.svg").read_text()
  assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "snapkv" in svg

  proc = subprocess.run([sys.executable, str(EXPERIMENTS / "report.py"), "--docs", str(tmp_path)],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  md = (tmp_path / "results.md").read_text()
  assert "## Press leaderboard" in md and "`snapkv`" in md and "leaderboard.svg" in md
