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
parser.add_argument("--skip", nargs="*", default=[], choices=["trace", "prefix", "step"])
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
  """(seconds, peak pages in use, mean pages in use over steps, engine) of an engine run."""
  engine = Engine(model, rows=rows_n, capacity=capacity, cache=spec, stop_at_eos=False, **options)
  used = []
  start = time.perf_counter()
  for _ in engine.run(list(requests)):
    used.append(int(engine.cache.pages_in_use()))
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
  page_bytes = engine.cache.page_bytes()
  continuous = dict(setting="trace", method=f"continuous batching, {spec}", rows=rows_n,
                    seconds=seconds, useful_tokens=useful, tok_per_s=useful / seconds,
                    peak_pages=peak, peak_bytes=peak * page_bytes, mean_bytes=mean * page_bytes,
                    pool_bytes=kvjax.total_bytes(engine.cache))
  print(f"  continuous: {continuous['tok_per_s']:.1f} tok/s, peak {peak} pages "
        f"({peak * page_bytes / 2**20:.1f} MiB), mean {mean * page_bytes / 2**20:.1f} MiB", flush=True)
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
    peak = int(engine.cache.pages_in_use())
    for _ in engine.run([]):
      peak = max(peak, int(engine.cache.pages_in_use()))
    rows.append(dict(setting="prefix", method=f"{spec}, page index {'on' if share else 'off'}",
                     rows=16, peak_pages=peak, peak_bytes=peak * engine.cache.page_bytes()))
  on, off = rows[-2], rows[-1]
  on["memory_saved"] = 1 - on["peak_bytes"] / off["peak_bytes"]
  print(f"  prefix: {on['peak_pages']} vs {off['peak_pages']} pages (saved {on['memory_saved']:.0%})",
        flush=True)

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
