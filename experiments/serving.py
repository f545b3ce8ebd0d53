"""Paged serving: continuous batching vs static batching, prefix sharing, paged vs full step time.

Three measurements on one machine, one run each:

1. trace: `--requests` requests (default 64) with prompt lengths drawn log-uniformly from
   [16, 2048] and output lengths uniformly from [16, 256] (seeded; prompts are spans of
   tinyshakespeare), all present at time 0. Continuous batching runs them through
   `kvjax.engine.Engine` on `paged:16` with `--rows` rows; static batching runs them with
   `kvjax.generate` on `full` in groups of `--rows` in order, each group padded to its longest
   prompt and run to its longest output. Reported: useful tokens (what each request asked for) per
   second of wall time, compile excluded (a warm-up pass on a few requests runs first), and memory:
   the paged pool's peak pages in use, the pool built, and the full caches' bytes.
2. prefix: 16 requests sharing a 1024-token system prompt (plus a 32-token question each, 32 new
   tokens): peak pages in use with and without the page index.
3. step: decode tok/s of `paged:16` vs `full` at equal tokens held (prompt 1024, batch 1 and 8),
   through `kvjax.generate` (target: within 15%).
4. window (models with sliding layers, e.g. `--model gemma3-270m`): the engine's pools (global
   layers keep every token, sliding layers a window pool that gives pages back) against one pool
   over every layer (`paged:16@all`, what the engine built before), at `--rows` rows of 4096
   tokens; then 4 requests of 600-token prompts (two share a 520-token prefix) and 160 new tokens
   each: peak bytes in use per pool, prefix tokens adopted, and whether every greedy output
   equals `kvjax.generate` alone on the full cache.

Outputs (in --out): serving.json, serving.csv.

  python experiments/serving.py           # SmolLM2-135M
  python experiments/serving.py --quick   # tiny random model, small trace (numbers meaningless)
"""

import argparse
import time

import numpy as np

import common

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true")
parser.add_argument("--out", default=str(common.DOCS))
parser.add_argument("--model", default=None)
parser.add_argument("--requests", type=int, default=None)
parser.add_argument("--rows", type=int, default=8)
parser.add_argument("--page", type=int, default=16)
parser.add_argument("--skip", nargs="*", default=[], choices=["trace", "prefix", "step", "window"])
args = parser.parse_args()

import jax  # noqa: E402

import kvjax  # noqa: E402
from kvjax.engine import Engine, Request  # noqa: E402

quick = args.quick
model = common.load_model(args.model or ("tiny" if quick else "smollm2-135m"))
info = common.run_info(args)
out = common.out_dir(args.out)
text, text_source = common.load_text(None, quick)
tok = getattr(model, "tokenizer", None)
corpus = np.asarray(tok.encode(text) if tok is not None else
                    np.random.default_rng(0).integers(0, model.config.vocab_size, 50_000), np.int32)
n_requests = args.requests or (12 if quick else 64)
max_prompt, max_out = (128, 16) if quick else (2048, 256)
min_prompt, min_out = 16, (4 if quick else 16)
rows_n, page = args.rows, args.page
spec = f"paged:{page}"
rng = np.random.default_rng(0)


def span(n):
  start = int(rng.integers(0, corpus.size - n))
  return corpus[start:start + n].tolist()


lengths = np.exp(rng.uniform(np.log(min_prompt), np.log(max_prompt), n_requests)).astype(int)
outs = rng.integers(min_out, max_out + 1, n_requests)
trace = [Request(ids=span(int(n)), max_new_tokens=int(k), id=i) for i, (n, k) in enumerate(zip(lengths, outs))]
useful = int(outs.sum())
capacity = -(-(max_prompt + max_out) // 256) * 256
capacity = -(-capacity // page) * page  # the Engine wants a multiple of the page size
results = {}
rows = []


def run_engine(requests, **options):
  """(seconds, peak bytes in use, mean bytes in use over steps, engine) of an engine run (bytes
  of the pages in use in every pool: one pool, or a global and a window pool on Gemma 3)."""
  engine = Engine(model, rows=rows_n, capacity=capacity, cache=spec, stop_at_eos=False, **options)
  used = []
  start = time.perf_counter()
  for _ in engine.run(list(requests)):
    used.append(engine.used_bytes())
  return time.perf_counter() - start, max(used), float(np.mean(used)), engine


def static_batches(requests):
  start = time.perf_counter()
  cache_bytes = 0
  for i in range(0, len(requests), rows_n):
    group = requests[i:i + rows_n]
    r = kvjax.generate(model, [q.ids for q in group], max_new_tokens=max(q.max_new_tokens for q in group),
                       cache="full", stop_at_eos=False)
    cache_bytes = max(cache_bytes, kvjax.total_bytes(r.cache))
  return time.perf_counter() - start, cache_bytes


if "trace" not in args.skip:
  warm = trace[:: max(1, n_requests // 6)][:6]  # compiles every prefill chunk and the step
  run_engine(warm, prefix_cache=False)
  static_batches(warm)
  # the trace's prompts share nothing, so the page index is off: pages in use are rows' pages
  seconds, peak, mean, engine = run_engine(trace, prefix_cache=False)
  continuous = dict(setting="trace", method=f"continuous batching, {spec}", rows=rows_n,
                    seconds=seconds, useful_tokens=useful, tok_per_s=useful / seconds,
                    peak_bytes=peak, mean_bytes=mean, pool_bytes=engine.pool_bytes())
  print(f"  continuous: {continuous['tok_per_s']:.1f} tok/s, peak {peak / 2**20:.1f} MiB in use, "
        f"mean {mean / 2**20:.1f} MiB", flush=True)
  seconds, cache_bytes = static_batches(trace)
  static = dict(setting="trace", method="static batching, full", rows=rows_n, seconds=seconds,
                useful_tokens=useful, tok_per_s=useful / seconds, peak_bytes=cache_bytes,
                mean_bytes=cache_bytes)
  print(f"  static:     {static['tok_per_s']:.1f} tok/s, cache {cache_bytes / 2**20:.1f} MiB", flush=True)
  continuous["speedup_vs_static"] = continuous["tok_per_s"] / static["tok_per_s"]
  continuous["memory_vs_static"] = continuous["peak_bytes"] / static["peak_bytes"]
  rows += [continuous, static]

if "prefix" not in args.skip:
  system = span(128 if quick else 1024)
  asks = [Request(ids=system + span(32), max_new_tokens=8 if quick else 32, id=i) for i in range(16)]
  for share in (True, False):
    engine = Engine(model, rows=16, capacity=capacity, cache=spec, prefix_cache=share,
                    stop_at_eos=False)
    for r in asks:
      engine.insert(r)
    peak = engine.used_bytes()
    for _ in engine.run([]):
      peak = max(peak, engine.used_bytes())
    rows.append(dict(setting="prefix", method=f"{spec}, page index {'on' if share else 'off'}",
                     rows=16, peak_bytes=peak))
  on, off = rows[-2], rows[-1]
  on["memory_saved"] = 1 - on["peak_bytes"] / off["peak_bytes"]
  print(f"  prefix: {on['peak_bytes'] / 2**20:.1f} vs {off['peak_bytes'] / 2**20:.1f} MiB "
        f"(saved {on['memory_saved']:.0%})", flush=True)

if "step" not in args.skip:
  from kvjax import bench

  prompt_len = 128 if quick else 1024
  for batch in (1, 8):
    speeds = {}
    for kind in ("full", spec):
      r = bench.run_bench(model, batch=batch, prompt_len=prompt_len, new_tokens=16 if quick else 64,
                          cache=kind, repeats=2)
      speeds[kind] = r["decode_tok_per_s"]
    rows.append(dict(setting="step", method=f"{spec} vs full", rows=batch, prompt_len=prompt_len,
                     full_tok_per_s=speeds["full"], paged_tok_per_s=speeds[spec],
                     paged_vs_full=speeds[spec] / speeds["full"]))
    print(f"  step b{batch}: full {speeds['full']:.1f}, paged {speeds[spec]:.1f} tok/s "
          f"({speeds[spec] / speeds['full']:.2f}x)", flush=True)

from kvjax.engine import pools, steps  # noqa: E402

if "window" not in args.skip and pools.split(model.config) is not None:
  long_cap = 256 if quick else 4096
  engine = Engine(model, rows=rows_n, capacity=long_cap, cache=spec, stop_at_eos=False)
  one_pool = kvjax.total_bytes(kvjax.make_cache(f"{spec}@all", model, rows_n, long_cap))
  pool_bytes = engine.pool_bytes()
  print(f"  window pools: {pool_bytes / 2**20:.1f} MiB vs one pool "
        f"{one_pool / 2**20:.1f} MiB ({pool_bytes / one_pool:.3f}x)", flush=True)
  n_prompt, n_shared, n_new = (40, 24, 12) if quick else (600, 520, 160)
  shared = span(n_shared)
  asks = [Request(ids=(shared + span(n_prompt - n_shared)) if i < 2 else span(n_prompt),
                  max_new_tokens=n_new, id=i) for i in range(4)]
  engine = Engine(model, rows=min(rows_n, 4), capacity=long_cap, cache=spec, stop_at_eos=False)
  peak = [0] * len(steps.groups(engine.cache))
  events = []
  for event in engine.run(asks):
    events.append(event)
    peak = [max(a, c.used_bytes()) for a, c in zip(peak, steps.groups(engine.cache))]
  got = kvjax.collect(events)
  same = 0
  for r in asks:
    alone = kvjax.generate(model, [r.ids], max_new_tokens=n_new, cache="full", stop_at_eos=False)
    same += got[(r.id, 0)] == [int(t) for t in np.asarray(alone.tokens[0][:n_new])]
  kinds = ["window" if c.window_only else "global" for c in steps.groups(engine.cache)]
  rows.append(dict(setting="window", method=f"{spec}: global pool + window pool", rows=rows_n,
                   capacity=long_cap, pool_bytes=pool_bytes, one_pool_bytes=one_pool,
                   pool_vs_one_pool=pool_bytes / one_pool, run_rows=engine.rows,
                   peak_bytes=dict(zip(kinds, peak)), prefix_tokens_adopted=engine.index.hits,
                   requests=len(asks), prompt=n_prompt, shared_prefix=n_shared, new_tokens=n_new,
                   equal_alone=f"{same}/{len(asks)}"))
  print(f"  window run: peak {', '.join(f'{k} {b / 2**20:.1f} MiB' for k, b in zip(kinds, peak))}; "
        f"{engine.index.hits} prefix tokens adopted; {same}/{len(asks)} equal generate alone",
        flush=True)

payload = {"experiment": "serving", "quick": quick, **info,
           "settings": {"model": getattr(model, "name", "?"), "dtype": str(np.dtype(model.dtype)),
                        "requests": n_requests, "rows": rows_n, "page": page,
                        "prompt_lengths": [int(x) for x in lengths], "output_lengths": [int(x) for x in outs],
                        "text": text_source, "backend": jax.default_backend()},
           "notes": ["tok/s counts the tokens each request asked for, over wall time, compile "
                     "excluded; static batching pads each group to its longest prompt and output",
                     "one run each on this machine"],
           "rows": rows}
common.write_json(out / "serving.json", payload)
common.write_csv(out / "serving.csv", rows)
