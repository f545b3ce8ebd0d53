"""Engine soak: thousands of random operations on the tiny model, every page audited after each.

The operations and checks are those of tests/test_engine_soak.py (`soak`): inserts with random
prompt and output lengths, n > 1 samples, shared page-aligned prefixes (page index hits and
copy-on-write), EOS, samples freed mid-stream, a pool small enough to refuse inserts (they wait
in order). After every operation `Engine.audit()` must be empty; at the end every sample's tokens
must equal its request run alone (greedy) in an engine of the same shape.

Reported: operations per second (a short warm-up soak compiles everything first, so it is not
counted; the audits are), steps, tokens, inserts and refusals, peak pages in use of the pool,
prompt tokens served by the page index, and every audit failure or output mismatch.

  python experiments/engine_soak.py                 # 2000 operations, seed 0
  python experiments/engine_soak.py --ops 5000 --seed 3
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # for tests.test_engine_soak

WARMUP_OPS = 60  # compiles every executable the soak uses (prefill chunks, step, fork, ...)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--ops", type=int, default=2000)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

import kvjax  # noqa: E402  (after argparse so --help is instant)
from tests.helpers import lively  # noqa: E402
from tests.test_engine_soak import CACHE, CAPACITY, PAGES, ROWS, engines, soak  # noqa: E402

model = lively(kvjax.load("tiny"))
start = time.perf_counter()
soak(*engines(model), ops=WARMUP_OPS, seed=args.seed + 10_000)
warmup_s = time.perf_counter() - start

engine, reference = engines(model)
stats = soak(engine, reference, ops=args.ops, seed=args.seed)

print(f"engine: rows={ROWS} capacity={CAPACITY} cache={CACHE} pages={PAGES}; "
      f"seed {args.seed}; warm-up {warmup_s:.1f} s")
print(f"operations  {stats.ops} ({args.ops} random, then steps to drain) in {stats.ops_s:.1f} s: "
      f"{stats.ops / stats.ops_s:.0f} ops/s")
print(f"steps       {stats.steps}, tokens {stats.tokens} ({stats.tokens / stats.ops_s:.0f} tok/s)")
print(f"inserts     {stats.inserted} admitted, {stats.refused} refused for now (queued), "
      f"{stats.freed} samples freed mid-stream, {stats.eos} ended on EOS")
print(f"pages       peak {stats.peak_pages} of {PAGES} in use; {stats.index_hits} prompt tokens "
      f"from the page index")
print(f"reference   every sample vs its request alone: {len(stats.mismatches)} mismatches "
      f"({stats.check_s:.1f} s)")
print(f"audit       {len(stats.problems)} failures")
for op, what, problems in stats.problems[:20]:
  print(f"  op {op} ({what}): " + "; ".join(problems))
for rid, sample, how, got, want in stats.mismatches[:20]:
  print(f"  request {rid} sample {sample} ({how}): {got} != {want}")
sys.exit(1 if stats.problems or stats.mismatches else 0)
