"""Reads the suite's timing report (tests/timing_plugin.py) and prints where the time went.

  python scripts/test_timings.py [.pytest_cache/kvjax-timings.json] [--top 20] [--by-module]
"""

from __future__ import annotations

import argparse
import collections
import json


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("report", nargs="?", default=".pytest_cache/kvjax-timings.json")
  parser.add_argument("--top", type=int, default=20)
  parser.add_argument("--by-module", action="store_true", help="also sum per test module")
  args = parser.parse_args()
  with open(args.report) as f:
    data = json.load(f)
  tests = data["tests"]
  print(f"{data['n_tests']} tests, {data['sum_wall_s']:.0f} s summed over workers, "
        f"{data['sum_compiles']} XLA compiles")
  for key in ("wall_s", "compiles"):
    print(f"\ntop {args.top} by {key}:")
    print(f"{'wall s':>8} {'compiles':>8} {'compile s':>9}  test")
    for node, r in sorted(tests.items(), key=lambda kv: -kv[1][key])[:args.top]:
      print(f"{r['wall_s']:8.1f} {r['compiles']:8d} {r['compile_s']:9.1f}  {node}")
  if args.by_module:
    modules = collections.defaultdict(lambda: [0.0, 0, 0])
    for node, r in tests.items():
      m = modules[node.split("::")[0]]
      m[0] += r["wall_s"]
      m[1] += r["compiles"]
      m[2] += 1
    print(f"\n{'wall s':>8} {'compiles':>8} {'tests':>6}  module")
    for name, (wall, compiles, n) in sorted(modules.items(), key=lambda kv: -kv[1][0]):
      print(f"{wall:8.1f} {compiles:8d} {n:6d}  {name}")


if __name__ == "__main__":
  main()
