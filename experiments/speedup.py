"""Cached vs uncached decoding: total time and per-token latency as the sequence grows.

For each model and sequence length L, a short prompt is extended by greedy decoding to L tokens:

  * cached   (cache="full", capacity L): one jitted prefill, then a jitted while-loop decode; a
             step attends over the tokens held, so per-token cost grows slowly (O(T) per token).
  * uncached (cache="none"): every step re-runs the causal forward over the whole prefix, so the
             per-token cost grows with the prefix and the total with its square (O(T^2)).

Times exclude compilation (kvjax times executables after they are built). The uncached run is
done once, up to the longest length allowed (`--uncached-max`); shorter lengths are prefixes of
that same greedy run, so their totals are sums of its first steps. Lengths beyond the cap (CPU
default: 512, since uncached decoding at 2048 takes hours on a few cores) are *extrapolated* from
a linear fit of the measured per-step time against the prefix width, marked as such in the table
and JSON. The linear fit leaves out attention's quadratic term, so it underestimates the uncached
time: an extrapolated speedup is a lower bound.

Per-token latency vs position comes from `on_tokens` timestamps (compile time subtracted); the
cached curve uses `stream_chunk=8`, i.e. averages over 8-token decode calls.

Outputs (in --out): speedup.json, speedup.csv, speedup.png (if matplotlib is installed).

  python experiments/speedup.py            # SmolLM2-135M and GPT-2-small shape, 128..2048
  python experiments/speedup.py --quick    # tiny model, 64 and 128 tokens (CI smoke run)
"""

import argparse
import time

import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODELS = ["smollm2-135m", "gpt2-small-shape"]
LENGTHS = [128, 256, 512, 1024, 2048]
PROMPT_LEN = 16
UNCACHED_MAX_CPU = 512  # uncached runs longer than this are extrapolated on CPU
STREAM_CHUNK = 8
SEED_CLAIM = {"model": "gpt2-small-shape", "length": 512, "speedup": 4.2,
              "source": "seed 000: GPT-2 (small), 512 tokens, 500 ms without vs 120 ms with"}

QUICK_MODELS = ["tiny"]
QUICK_LENGTHS = [64, 128]
QUICK_UNCACHED_MAX = 64

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, short lengths (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--models", nargs="+", default=None)
parser.add_argument("--lengths", nargs="+", type=int, default=None)
parser.add_argument("--uncached-max", type=int, default=None,
                    help="longest uncached run actually measured (default: 512 on CPU, no cap on "
                         "accelerators); longer lengths are extrapolated")
parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
args = parser.parse_args()

import kvjax  # noqa: E402  (after argparse so --help is instant)
from kvjax.bench import bench_prompt  # noqa: E402

models = args.models or (QUICK_MODELS if args.quick else MODELS)
lengths = sorted(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS))
if args.uncached_max is not None:
  uncached_max = args.uncached_max
elif args.quick:
  uncached_max = QUICK_UNCACHED_MAX
else:
  uncached_max = None if common.on_accelerator() else UNCACHED_MAX_CPU
out = common.out_dir(args.out)
info = common.run_info(args)
print(f"backend {info['machine']['jax_backend']}, models {models}, lengths {lengths}, "
      f"uncached measured up to {uncached_max or 'every length'}")


def timed_callback(stamps):
  """on_tokens callback recording (time, compile seconds so far, tokens in the block)."""
  def on_tokens(block):
    stamps.append((time.perf_counter(), kvjax.compile_stats()["compile_s"], block.shape[1]))
  return on_tokens


def step_times(stamps, start, compile_start):
  """Per-block (seconds without compile, tokens) from callback stamps."""
  times, sizes = [], []
  prev_t, prev_c = start, compile_start
  for t, c, n in stamps:
    times.append((t - prev_t) - (c - prev_c))
    sizes.append(n)
    prev_t, prev_c = t, c
  return np.array(times), np.array(sizes)


rows, curves = [], {}
for name in models:
  model = common.load_model(name)
  prompt = bench_prompt(model.tokenizer, args.prompt_len)
  print(f"\n== {name}  (dtype {np.dtype(model.dtype).name}, prompt {len(prompt)} tokens)")

  # ---- cached: one real run per length (plus a streamed run at the longest for the curve) ------
  cached = {}
  for length in common.progress(lengths, desc=f"{name} cached"):
    new = length - len(prompt)
    r = kvjax.generate(model, [prompt], max_new_tokens=new, cache="full", capacity=length,
                       stop_at_eos=False)
    cached[length] = {"prefill_s": r.prefill_s, "decode_s": r.decode_s,
                      "total_s": r.prefill_s + r.decode_s, "tokens": r.tokens[0]}
  longest = lengths[-1]
  stamps = []
  c0 = kvjax.compile_stats()["compile_s"]
  t0 = time.perf_counter()
  kvjax.generate(model, [prompt], max_new_tokens=longest - len(prompt), cache="full",
                 capacity=longest, stop_at_eos=False, on_tokens=timed_callback(stamps),
                 stream_chunk=STREAM_CHUNK)
  times, sizes = step_times(stamps, t0, c0)
  ends = len(prompt) + np.cumsum(sizes)  # sequence length after each block
  cached_curve = {"position": ends[1:].tolist(), "ms_per_token": (1e3 * times[1:] / sizes[1:]).tolist()}

  # ---- uncached: one real run up to the cap; shorter lengths are its prefixes ----------------
  measured_len = max([n for n in lengths if uncached_max is None or n <= uncached_max],
                     default=min(lengths[0], uncached_max or lengths[0]))
  print(f"  uncached run to {measured_len} tokens (one forward over the prefix per token)...", flush=True)
  stamps = []
  c0 = kvjax.compile_stats()["compile_s"]
  t0 = time.perf_counter()
  r = kvjax.generate(model, [prompt], max_new_tokens=measured_len - len(prompt), cache="none",
                     stop_at_eos=False, on_tokens=timed_callback(stamps))
  steps, _ = step_times(stamps, t0, c0)  # steps[i]: forward over len(prompt) + i tokens
  uncached_tokens = r.tokens[0]
  prefix_at_step = len(prompt) + np.arange(len(steps))
  # Per-step cost depends on the padded prefix width (multiples of 32). The first run of each
  # newly compiled width is slower (buffers, thread pools): like compile time, it is not counted;
  # that step gets its width's median instead.
  widths = -(-prefix_at_step // 32) * 32
  for w in np.unique(widths[1:]):
    at = np.flatnonzero(widths == w)
    at = at[at > 0]
    if len(at) > 1:
      steps[at[0]] = np.median(steps[at[1:]])
  bucket_w = np.unique(widths[1:]) if len(steps) > 1 else np.unique(widths)
  bucket_t = np.array([np.median(steps[1:][widths[1:] == w]) if len(steps) > 1 else steps[0]
                       for w in bucket_w])
  # Linear in the width: a lower bound (it leaves out attention's quadratic term), so an
  # extrapolated speedup errs on the low side.
  fit = np.polyfit(bucket_w, bucket_t, deg=min(1, len(bucket_w) - 1))
  uncached_curve = {"position": (prefix_at_step[1:] + 1).tolist(), "ms_per_token": (1e3 * steps[1:]).tolist(),
                    "fit_coeffs_s_vs_width": fit.tolist()}

  for length in lengths:
    c = cached[length]
    n_steps = length - len(prompt)
    if n_steps <= len(steps):
      un_total = float(steps[:n_steps].sum())
      extrapolated = False
      agree = int(np.argmin(np.append(c["tokens"] == uncached_tokens[:n_steps], False)))
    else:
      later = len(prompt) + np.arange(len(steps), n_steps)
      un_total = float(steps.sum() + np.clip(np.polyval(fit, -(-later // 32) * 32), 0, None).sum())
      extrapolated = True
      agree = None
    row = {"model": name, "length": length, "prompt_len": len(prompt), "new_tokens": n_steps,
           "cached_total_s": c["total_s"], "cached_prefill_s": c["prefill_s"],
           "cached_decode_s": c["decode_s"], "cached_ms_per_token": 1e3 * c["total_s"] / n_steps,
           "uncached_total_s": un_total, "uncached_ms_per_token": 1e3 * un_total / n_steps,
           "uncached_extrapolated": extrapolated, "speedup": un_total / c["total_s"],
           "greedy_tokens_agree": agree}
    rows.append(row)
    print(f"  L={length:5d}  cached {c['total_s']:8.3f}s  uncached {un_total:9.3f}s"
          f"{' (extrapolated)' if extrapolated else ''}  speedup {row['speedup']:6.1f}x"
          + (f"  tokens agree for {agree}/{n_steps}" if agree is not None else ""), flush=True)
  curves[name] = {"cached": cached_curve, "uncached": uncached_curve}

seed = next((r for r in rows if r["model"] == SEED_CLAIM["model"] and r["length"] == SEED_CLAIM["length"]), None)
payload = {"experiment": "speedup", "quick": args.quick, **info,
           "settings": {"models": models, "lengths": lengths, "prompt_len": args.prompt_len,
                        "uncached_max": uncached_max, "stream_chunk": STREAM_CHUNK, "batch": 1,
                        "greedy": True},
           "notes": ["times exclude compilation; total = prefill + decode of length - prompt tokens",
                     "uncached totals beyond uncached_max are extrapolated from a linear fit of "
                     "per-step time vs padded prefix width (column uncached_extrapolated); it "
                     "leaves out attention's quadratic term, so those speedups are lower bounds",
                     "uncached: the first run of each newly compiled prefix width is replaced by "
                     "that width's median step (first-execution overhead, like compile, not counted)",
                     "cached per-token curve: on_tokens with stream_chunk=8 (8-token decode calls)",
                     "greedy_tokens_agree: leading generated tokens identical with and without cache"],
           "seed_claim": SEED_CLAIM, "seed_comparison": seed, "rows": rows, "curves": curves}
common.write_json(out / "speedup.json", payload)
common.write_csv(out / "speedup.csv", rows)

plt = common.pyplot()
if plt is not None:
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, name in enumerate(models):
    color = f"C{i}"
    cc, uc = curves[name]["cached"], curves[name]["uncached"]
    ax1.plot(cc["position"], cc["ms_per_token"], color=color, label=f"{name} cached")
    ax1.plot(uc["position"], uc["ms_per_token"], color=color, ls="--", label=f"{name} uncached")
    mine = [r for r in rows if r["model"] == name]
    ax2.plot([r["length"] for r in mine], [r["cached_total_s"] for r in mine], "o-", color=color,
             label=f"{name} cached")
    ax2.plot([r["length"] for r in mine], [r["uncached_total_s"] for r in mine], "s--", color=color,
             label=f"{name} uncached")
    for r in mine:
      ax2.annotate(f"{r['speedup']:.0f}x" + ("*" if r["uncached_extrapolated"] else ""),
                   (r["length"], r["uncached_total_s"]), textcoords="offset points", xytext=(4, 4),
                   fontsize=8)
  ax1.set(xlabel="position (tokens in the sequence)", ylabel="ms per token", yscale="log",
          title="per-token latency")
  ax2.set(xlabel="sequence length", ylabel="total seconds (no compile)", xscale="log", yscale="log",
          title="total time; labels: speedup (* = extrapolated)")
  common.plain_log_axis(ax1.yaxis)
  common.plain_log_axis(ax2.xaxis, ticks=lengths)
  common.plain_log_axis(ax2.yaxis)
  ax1.legend(fontsize=8)
  ax2.legend(fontsize=8)
  fig.suptitle(f"cached vs uncached greedy decoding ({info['machine']['jax_backend']}, "
               f"{info['machine']['cpu_count']} cpus)")
  fig.tight_layout()
  fig.savefig(out / "speedup.png", dpi=120)
  print(f"wrote {out / 'speedup.png'}")
