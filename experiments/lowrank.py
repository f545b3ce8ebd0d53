"""Latent (low-rank) KV caches on a model not trained with them: perplexity against bytes per token.

Calibration: `kvjax.calibrate.collect_kv` over the first `--cal-tokens` tokens of tinyshakespeare
(windows of 512), then `fit_lowrank` per rank, on un-rotated keys (the default, `keys="pre"`) and on
keys rotated at their window positions (`keys="post"`); `share:2:cal` fits its maps on the same
recorded keys and values. Evaluation: `kvjax.perplexity` on `--windows` windows of `--window`
tokens taken well after the calibration text (never overlapping it), scored as one batch; the
reported perplexity is exp of the token-weighted mean NLL over the windows.

Bytes per token: a batch-1 cache of each spec with room for 2048 tokens, its per-token arrays
(`kv_nbytes()` where the kind separates them from its calibration maps) divided by 2048;
the maps are a fixed cost per cache, reported apart (`maps_bytes`).

Outputs (in --out): lowrank.json, lowrank.csv.

  python experiments/lowrank.py            # SmolLM2-135M, 16k calibration tokens, 4 x 512 evaluated
  python experiments/lowrank.py --quick    # tiny random model (numbers meaningless), seconds
"""

import argparse
import math
import time

import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
CAL_TOKENS = 16384
WINDOW = 512
WINDOWS = 4
GAP = 4096  # tokens skipped between the calibration text and the evaluated windows
BYTES_TOKENS = 2048  # capacity of the cache whose arrays give bytes per token
RANKS = [16, 32, 64, 96]
QUANTIZED_RANKS = [64, 96]  # with int8 and int4 latents
BASELINES = ["full", "share:2:cal", "int8", "int4", "int2"]

QUICK_MODEL = "tiny"
QUICK_CAL_TOKENS = 256
QUICK_WINDOW = 64
QUICK_WINDOWS = 2
QUICK_GAP = 0
QUICK_RANKS = [16, 64]
QUICK_QUANTIZED_RANKS = [64]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare)")
parser.add_argument("--cal-tokens", type=int, default=None)
parser.add_argument("--window", type=int, default=None)
parser.add_argument("--windows", type=int, default=None)
parser.add_argument("--ranks", nargs="+", type=int, default=None)
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
args = parser.parse_args()

import kvjax  # noqa: E402
from kvjax import calibrate  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK_MODEL if quick else MODEL)
cal_tokens = args.cal_tokens or (QUICK_CAL_TOKENS if quick else CAL_TOKENS)
window = args.window or (QUICK_WINDOW if quick else WINDOW)
n_windows = args.windows or (QUICK_WINDOWS if quick else WINDOWS)
gap = QUICK_GAP if quick else GAP
ranks = args.ranks or (QUICK_RANKS if quick else RANKS)
quantized_ranks = [r for r in (QUICK_QUANTIZED_RANKS if quick else QUANTIZED_RANKS) if r in ranks]

out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
cfg = model.config
features = cfg.n_kv_heads * cfg.head_dim
text, text_source = common.load_text(args.data, quick)
all_ids = np.asarray(model.tokenizer.encode(text), np.int32)
start = cal_tokens + gap
if all_ids.size < start + n_windows * window:
  raise SystemExit(f"{text_source}: {all_ids.size} tokens, need {start + n_windows * window}")
cal_ids = all_ids[:cal_tokens]
docs = [all_ids[start + i * window: start + (i + 1) * window] for i in range(n_windows)]
print(f"model {model_name}: calibrate on tokens [0, {cal_tokens}), evaluate {n_windows} x {window} "
      f"tokens from {start} ({text_source})", flush=True)

t0 = time.perf_counter()
kv = calibrate.collect_kv(model, cal_ids, window=min(WINDOW, cal_tokens))
collect_s = time.perf_counter() - t0
print(f"  recorded keys/values of {kv[0].shape[1]} tokens in {collect_s:.1f} s", flush=True)
cal_window = min(WINDOW, cal_tokens)

maps: dict = {}
t0 = time.perf_counter()
for rotated in (False, True):  # principal directions are nested: fit the largest rank, keep prefixes
  top = calibrate.fit_lowrank(model, None, max(ranks), kv=kv, window=cal_window, rotated=rotated)
  for r in ranks:
    maps[(r, rotated)] = top.replace(k_basis=top.k_basis[..., :r], v_basis=top.v_basis[..., :r])
share_maps = calibrate.fit_share_maps(model, None, 2, kv=kv)
fit_s = time.perf_counter() - t0
print(f"  fitted {len(maps)} low-rank maps and the share:2 maps in {fit_s:.1f} s", flush=True)

# Calibration reconstruction error (relative squared error over layers), pre and post RoPE.
k_all, _ = kv
positions = np.arange(k_all.shape[1]) % cal_window


def key_error(r, rotated):
  m = maps[(r, rotated)]
  num = den = 0.0
  for layer in range(cfg.n_layers):
    x = k_all[layer].astype(np.float64)
    if rotated:
      x = calibrate.rotate_flat(x, positions, cfg.head_dim, cfg.rope_theta)
    b, mu = np.asarray(m.k_basis[layer], np.float64), np.asarray(m.k_mean[layer], np.float64)
    num += np.sum(((x - mu) @ b @ b.T + mu - x) ** 2)
    den += np.sum((x - x.mean(0)) ** 2)
  return num / den


# ---- runs -------------------------------------------------------------------------------------
runs = []  # (label, spec, options, keys mode)
for s in BASELINES:
  runs.append((s, s, {"maps": share_maps} if s.endswith(":cal") else {}, None))
for r in ranks:
  if r > features:
    continue
  runs.append((f"lowrank:{r}", f"lowrank:{r}", {"maps": maps[(r, False)]}, "pre"))
  runs.append((f"lowrank:{r} (post-RoPE keys)", f"lowrank:{r}", {"maps": maps[(r, True)]}, "post"))
for r in quantized_ranks:
  for bits in (8, 4):
    runs.append((f"lowrank:{r}+int{bits}", f"lowrank:{r}+int{bits}", {"maps": maps[(r, False)]}, "pre"))

rows, failed = [], []
for label, spec, options, keys in runs:
  try:
    t0 = time.perf_counter()
    results = kvjax.perplexity(model, docs, cache=spec, cache_options=options)
    seconds = time.perf_counter() - t0
    nll = sum(res.nll * (res.tokens - 1) for res in results) / sum(res.tokens - 1 for res in results)
    cache = kvjax.make_cache(spec, model, 1, BYTES_TOKENS, **options)
    kv_part = cache.kv_nbytes() if hasattr(cache, "kv_nbytes") else cache.nbytes()
    maps_bytes = cache.maps_nbytes() if hasattr(cache, "maps_nbytes") else 0
    bpt = common.total_bytes(kv_part) / BYTES_TOKENS
  except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
    if args.strict:
      raise
    failed.append({"spec": label, "error": f"{type(e).__name__}: {e}"})
    print(f"  {label:34s} FAILED {type(e).__name__}: {e}", flush=True)
    continue
  row = {"label": label, "spec": spec, "keys": keys, "ppl": math.exp(nll), "nll": nll,
         "bytes_per_token": bpt, "maps_bytes": maps_bytes, "seconds": seconds,
         "rank": int(spec.split(":")[1].split("+")[0]) if spec.startswith("lowrank") else None}
  if keys is not None:
    row["key_error"] = key_error(row["rank"], keys == "post")
  rows.append(row)
  print(f"  {label:34s} ppl {row['ppl']:9.3f}  {bpt:8.1f} B/token  maps {common.fmt_bytes(maps_bytes)}"
        f"  ({seconds:.1f} s)", flush=True)

full = next((r for r in rows if r["spec"] == "full"), None)
for r in rows:
  r["bytes_vs_full"] = r["bytes_per_token"] / full["bytes_per_token"] if full else None

payload = {"experiment": "lowrank", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(model.dtype).name, "text": text_source,
                        "calibration_tokens": int(cal_ids.size), "calibration_window": cal_window,
                        "eval_start": int(start), "window": window, "windows": n_windows,
                        "ranks": ranks, "quantized_ranks": quantized_ranks,
                        "features_per_token": features},
           "timing_s": {"collect_kv": collect_s, "fit": fit_s},
           "notes": ["ppl: exp of the token-weighted mean NLL over the evaluated windows "
                     "(kvjax.perplexity, one batch; chunk-exact kinds in chunks, int8/int4/int2 "
                     "token by token)",
                     f"bytes_per_token: per-token arrays of a batch-1 cache of {BYTES_TOKENS} slots / "
                     f"{BYTES_TOKENS}; calibration maps (a fixed cost per cache) in maps_bytes",
                     "key_error: relative squared error of the keys rebuilt from rank-R latents on "
                     "the calibration tokens (over the centred keys), pre- or post-RoPE"],
           "failed": failed, "rows": rows}
common.write_json(out / "lowrank.json", payload)
common.write_csv(out / "lowrank.csv", rows)
