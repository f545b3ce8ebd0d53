"""kvjax vs HF transformers and llama.cpp on the same GGUF and prompt, and the bandwidth limit.

`--model gemma3-270m` runs the same comparison on Gemma 3 270M (llama.cpp in f32 only; kvjax with
its default Gemma 3 cache, window rings on sliding layers; HF with its own default, which also
gives sliding layers a window-sized cache) and writes peers_gemma3-270m.json.

All decode SmolLM2-135M-Instruct (the same GGUF file) greedily from the same prompt token ids
(kvjax's tokenizer; the peers receive the ids), 128 new tokens: kvjax and HF dequantized to float32
at batch 1 and 8, llama.cpp at batch 1 both in float32 and in the file's own Q4_1.

  * kvjax: `kvjax.bench.run_bench` (what `kvjax bench` runs): full cache of capacity 2048, jitted
    prefill + while-loop decode, best of `--repeats` runs after one that compiles (the peers also
    get a warm-up run and then `--repeats`). In this process.
  * HF: `experiments/hf_peer.py` in a subprocess with a python that has torch + transformers
    (`--hf-python`, else $KVJAX_HF_PYTHON, else this python if it can import them; otherwise the
    HF side is skipped with a note). `generate(do_sample=False, min_new_tokens=N)` with its
    default dynamic cache; decode time = time(N tokens) - time(1 token).
  * llama.cpp: `experiments/llamacpp_peer.py` in a subprocess with the python of a separate venv
    that has llama-cpp-python (`--llamacpp-python`, else $KVJAX_LLAMACPP_PYTHON; otherwise skipped
    with a note; never this python: llama.cpp is no dependency of kvjax). `--llamacpp-threads`
    threads (default 2). Format "f32" is the GGUF converted to all-float32 by llama.cpp's own
    quantize API (cached in `--llamacpp-work-dir` if given), "q4_1" the GGUF as is. Prompt eval,
    then N - 1 single-token evals with argmax of the last logits, timed as the decode.
  The three never run at the same time (they would share the cores): kvjax, then HF, then llama.cpp.

Decode tok/s counts the tokens made after the prefill's first, all rows together, on every side.

Memory bandwidth: a NumPy copy of a large array (bytes read + bytes written per second, best of
5); on accelerators the device's, from a jitted `x + 1` over a large array, is used instead. A decode step must read every weight once, so at batch 1 the bandwidth-bound limit is
bandwidth / weight bytes tokens per second (at batch b, b times that while weights dominate).
llama.cpp rows use their own weight bytes (`llama_model_size`: the Q4_1 file reads far fewer).

Outputs (in --out): peers.json (tok/s of all, ratios kvjax/HF per batch, kvjax/llama.cpp f32 and
q4_1 at batch 1, batch8/batch1 per framework, the limit) and peers.png (if matplotlib is installed).

The llama.cpp venv (built from the sdist, CPU only; takes a while on 2 cores; never install it into
kvjax's environment):

  python3 -m venv /work/llamacpp-venv
  /work/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36

  KVJAX_HF_PYTHON=/work/hfvenv/bin/python KVJAX_LLAMACPP_PYTHON=/work/llamacpp-venv/bin/python \
      python experiments/peers.py
  python experiments/peers.py --quick          # batch 1, 8 new tokens (peers only if found)
"""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
BATCHES = [1, 8]
NEW_TOKENS = 128
PROMPT_LEN = 32
CAPACITY = 2048
REPEATS = 3
BANDWIDTH_MB = 1024  # array copied to measure memory bandwidth
HF_TIMEOUT_S = 3600
LLAMACPP_TIMEOUT_S = 3600
LLAMACPP_FORMATS = ["f32", "q4_1"]

QUICK_BATCHES = [1]
QUICK_NEW_TOKENS = 8
QUICK_PROMPT_LEN = 16
QUICK_CAPACITY = 256
QUICK_BANDWIDTH_MB = 128

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="batch 1, 8 new tokens (smoke run)")
parser.add_argument("--model", default=MODEL,
                    help="registered model (smollm2-135m, gemma3-270m); results of a model other "
                         "than smollm2-135m go to peers_<model>.json")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--batches", nargs="+", type=int, default=None)
parser.add_argument("--new-tokens", type=int, default=None)
parser.add_argument("--prompt-len", type=int, default=None)
parser.add_argument("--capacity", type=int, default=None)
parser.add_argument("--repeats", type=int, default=REPEATS)
parser.add_argument("--hf-python", default=None, help="python with torch + transformers + gguf")
parser.add_argument("--hf-threads", type=int, default=None, help="torch threads for HF (default: torch's)")
parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
parser.add_argument("--llamacpp-python", default=None,
                    help="python of a venv with llama-cpp-python (default: $KVJAX_LLAMACPP_PYTHON)")
parser.add_argument("--llamacpp-threads", type=int, default=2, help="llama.cpp threads (default 2)")
parser.add_argument("--llamacpp-work-dir", default=None,
                    help="keep llama.cpp's F32 conversion of the GGUF here (default: a temp dir)")
parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
args = parser.parse_args()

MODEL = args.model
# llama.cpp formats: f32 (the GGUF converted to float32 by llama.cpp) and, for SmolLM2, the file's
# own Q4_1; Gemma 3's Q4_K_M file is compared in f32 only (the weights kvjax and HF decode with).
LLAMACPP_FORMATS = LLAMACPP_FORMATS if MODEL == "smollm2-135m" else ["f32"]
STEM = "peers" if MODEL == "smollm2-135m" else f"peers_{MODEL}"

import kvjax  # noqa: E402
from kvjax.bench import bench_prompt, run_bench  # noqa: E402

quick = args.quick
batches = args.batches or (QUICK_BATCHES if quick else BATCHES)
new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if quick else NEW_TOKENS)
prompt_len = args.prompt_len or (QUICK_PROMPT_LEN if quick else PROMPT_LEN)
capacity = args.capacity or (QUICK_CAPACITY if quick else CAPACITY)
out = common.out_dir(args.out)
info = common.run_info(args)

# ---- memory bandwidth ---------------------------------------------------------------------------
n = (QUICK_BANDWIDTH_MB if quick else BANDWIDTH_MB) * 2**20 // 8
src = np.arange(n, dtype=np.float64)
dst = np.empty_like(src)
best = float("inf")
for _ in range(5):
  start = time.perf_counter()
  np.copyto(dst, src)
  best = min(best, time.perf_counter() - start)
host_bandwidth = 2 * src.nbytes / best  # bytes read + written per second
del src, dst
print(f"host memory bandwidth (numpy copy, read+write): {host_bandwidth / 1e9:.1f} GB/s")
# The same on the JAX device (a jitted x + 1 over a large array); the limit uses this one on
# accelerators, where the weights live in device memory.
x = jax.numpy.ones((n,), jax.numpy.float32)
bump = jax.jit(lambda a: a + 1)
bump(x).block_until_ready()
best = float("inf")
for _ in range(5):
  start = time.perf_counter()
  bump(x).block_until_ready()
  best = min(best, time.perf_counter() - start)
device_bandwidth = 2 * x.nbytes / best
del x
print(f"device memory bandwidth (jitted x + 1, read+write): {device_bandwidth / 1e9:.1f} GB/s")
bandwidth = device_bandwidth if common.on_accelerator() else host_bandwidth

# ---- model and prompt -------------------------------------------------------------------------
gguf_path = None
try:
  from kvjax.models import catalog

  gguf_path = catalog.resolve_model_path(MODEL, allow_download=not quick)
  model = kvjax.load(MODEL)
except FileNotFoundError as e:
  if not quick:
    raise SystemExit(f"cannot load {MODEL}: {e}")
  print(f"note: {MODEL} is not available ({e}); quick run uses the tiny model, peers skipped")
  model = kvjax.load("tiny")
prompt = bench_prompt(model.tokenizer, prompt_len)
weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
print(f"model {model.name} ({np.dtype(model.dtype).name}, {weight_bytes / 2**20:.0f} MiB of weights), "
      f"prompt {len(prompt)} tokens, {new_tokens} new tokens, batches {batches}, capacity {capacity}")

# ---- kvjax --------------------------------------------------------------------------------------
kv = []
for batch in common.progress(batches, desc="kvjax"):
  r = run_bench(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                capacity=capacity, cache="full", repeats=args.repeats + 1)  # + 1: the first compiles
  kv.append(r)
  print(f"  kvjax batch {batch}: {r['decode_tok_per_s']:.1f} decode tok/s "
        f"(prefill {r['prefill_s'] * 1e3:.0f} ms, compile {r['compile_s']:.1f} s)", flush=True)
kv_tokens = kvjax.generate(model, [prompt], max_new_tokens=new_tokens, capacity=capacity,
                           stop_at_eos=False).tokens[0].tolist()

# ---- HF transformers (subprocess) --------------------------------------------------------------
def find_hf_python():
  if args.hf_python:
    return args.hf_python
  if os.environ.get("KVJAX_HF_PYTHON"):
    return os.environ["KVJAX_HF_PYTHON"]
  if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "gguf")):
    return sys.executable
  return None


hf, hf_note = None, None
hf_python = None if args.no_hf else find_hf_python()
if args.no_hf:
  hf_note = "skipped (--no-hf)"
elif gguf_path is None or model.name != MODEL:
  hf_note = f"skipped: {MODEL} GGUF not available"
elif hf_python is None:
  hf_note = ("skipped: no python with torch + transformers + gguf found "
             "(pass --hf-python or set KVJAX_HF_PYTHON)")
else:
  with tempfile.TemporaryDirectory() as tmp:
    ids_file, hf_out = pathlib.Path(tmp) / "ids.json", pathlib.Path(tmp) / "hf.json"
    ids_file.write_text(json.dumps([int(i) for i in prompt]))
    cmd = [hf_python, str(pathlib.Path(__file__).with_name("hf_peer.py")), "--gguf", str(gguf_path),
           "--ids", str(ids_file), "--batches", *map(str, batches), "--new-tokens", str(new_tokens),
           "--repeats", str(args.repeats), "--out", str(hf_out)]
    if args.hf_threads:
      cmd += ["--threads", str(args.hf_threads)]
    print("running HF:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HF_TIMEOUT_S)
    print(proc.stdout.strip())
    if proc.returncode == 0:
      hf = json.loads(hf_out.read_text())
      hf["python"] = hf_python
      hf["env"] = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_"))}
    else:
      hf_note = f"failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
if hf_note:
  print(f"note: HF {hf_note}")

# ---- llama.cpp (subprocess, after HF: never at the same time) -----------------------------------
llamacpp, llamacpp_note = None, None
llamacpp_python = args.llamacpp_python or os.environ.get("KVJAX_LLAMACPP_PYTHON") or None
if args.no_llamacpp:
  llamacpp_note = "skipped (--no-llamacpp)"
elif gguf_path is None or model.name != MODEL:
  llamacpp_note = f"skipped: {MODEL} GGUF not available"
elif llamacpp_python is None:
  llamacpp_note = ("skipped: no python with llama-cpp-python given (pass --llamacpp-python or set "
                   "KVJAX_LLAMACPP_PYTHON; see the docstring for building its venv)")
elif 1 not in batches:
  llamacpp_note = "skipped: llama.cpp is measured at batch 1 only and 1 is not in --batches"
else:
  with tempfile.TemporaryDirectory() as tmp:
    ids_file, lc_out = pathlib.Path(tmp) / "ids.json", pathlib.Path(tmp) / "llamacpp.json"
    ids_file.write_text(json.dumps([int(i) for i in prompt]))
    cmd = [llamacpp_python, str(pathlib.Path(__file__).with_name("llamacpp_peer.py")),
           "--gguf", str(gguf_path), "--ids", str(ids_file), "--new-tokens", str(new_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.llamacpp_threads),
           "--formats", *LLAMACPP_FORMATS, "--out", str(lc_out)]
    if args.llamacpp_work_dir:
      cmd += ["--work-dir", args.llamacpp_work_dir]
    print("running llama.cpp:", " ".join(cmd), flush=True)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMACPP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
      llamacpp_note = f"failed: {type(e).__name__}: {e}"
    else:
      print(proc.stdout.strip())
      if proc.returncode == 0:
        llamacpp = json.loads(lc_out.read_text())
        llamacpp["python_path"] = llamacpp_python
      else:
        llamacpp_note = f"failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
if llamacpp_note:
  print(f"note: llama.cpp {llamacpp_note}")

# ---- summary ------------------------------------------------------------------------------------
kv_tps = {r["batch"]: r["decode_tok_per_s"] for r in kv}
hf_tps = {r["batch"]: r["decode_tok_per_s"] for r in hf["results"]} if hf else {}
limit = bandwidth / weight_bytes
ratios = {f"kvjax_over_hf_batch{b}": kv_tps[b] / hf_tps[b] for b in batches if b in hf_tps}
if 1 in kv_tps and len(batches) > 1:
  top = max(batches)
  ratios[f"kvjax_batch{top}_over_batch1"] = kv_tps[top] / kv_tps[1]
  if 1 in hf_tps and top in hf_tps:
    ratios[f"hf_batch{top}_over_batch1"] = hf_tps[top] / hf_tps[1]


def first_difference(a, b):
  """How many leading greedy tokens two runs share."""
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


agree = first_difference(kv_tokens, hf["results"][0]["tokens_row0"]) if hf else None
rows = [{"framework": "kvjax", "batch": b, "decode_tok_per_s": kv_tps[b],
         "bandwidth_limit_tok_per_s": b * limit} for b in batches]
rows += [{"framework": "hf", "batch": b, "decode_tok_per_s": hf_tps[b],
          "bandwidth_limit_tok_per_s": b * limit} for b in hf_tps]
# llama.cpp (batch 1): its limit uses its own weight bytes, so the Q4_1 row is held to the bytes
# it actually reads per token.
lc_rows = {r["format"]: r for r in llamacpp["results"]} if llamacpp else {}
rows += [{"framework": r["framework"], "batch": 1, "decode_tok_per_s": r["decode_tok_per_s"],
          "bandwidth_limit_tok_per_s": bandwidth / r["weight_bytes"], "weight_bytes": r["weight_bytes"]}
         for r in lc_rows.values()]
for fmt, r in lc_rows.items():
  if 1 in kv_tps:
    ratios[f"kvjax_over_llamacpp_{fmt}_batch1"] = kv_tps[1] / r["decode_tok_per_s"]
lc_agree = {fmt: first_difference(kv_tokens, r["tokens_row0"]) for fmt, r in lc_rows.items()}
for row in rows:
  row["fraction_of_limit"] = row["decode_tok_per_s"] / row["bandwidth_limit_tok_per_s"]
  print(f"  {row['framework']:14s} batch {row['batch']}: {row['decode_tok_per_s']:8.1f} tok/s "
        f"({100 * row['fraction_of_limit']:.0f}% of the {row['bandwidth_limit_tok_per_s']:.0f} tok/s "
        "bandwidth limit)")
for k, v in ratios.items():
  print(f"  {k}: {v:.2f}")
if agree is not None:
  print(f"  greedy tokens identical for the first {agree}/{new_tokens} (batch 1)")
for fmt, n in lc_agree.items():
  print(f"  kvjax and llama.cpp {fmt}: greedy tokens identical for the first {n}/{new_tokens}")

payload = {"experiment": "peers", "quick": quick, **info,
           "settings": {"model": model.name, "gguf": str(gguf_path) if gguf_path else None,
                        "dtype": np.dtype(model.dtype).name, "batches": batches,
                        "new_tokens": new_tokens, "prompt_len": len(prompt), "capacity": capacity,
                        "repeats": args.repeats, "greedy": True},
           "method": {"kvjax": "kvjax.bench.run_bench in this process (full cache, compile excluded)",
                      "hf": "experiments/hf_peer.py in a subprocess; decode = time(N) - time(1)",
                      "llamacpp": "experiments/llamacpp_peer.py in a subprocess, batch 1; decode = "
                                  "the N - 1 single-token evals after the prompt eval; f32 = the "
                                  "GGUF converted by llama_model_quantize(LLAMA_FTYPE_ALL_F32), "
                                  "q4_1 = the GGUF as is; limit from its own weight bytes",
                      "bandwidth": "(read + write bytes) / s: numpy copy of a large array on the "
                                   "host (used on CPU), jitted x + 1 on the JAX device (used on "
                                   "accelerators)"},
           "memory_bandwidth_bytes_per_s": bandwidth,
           "host_bandwidth_bytes_per_s": host_bandwidth, "device_bandwidth_bytes_per_s": device_bandwidth,
           "weight_bytes": weight_bytes,
           "bandwidth_limit_tok_per_s_batch1": limit,
           "kvjax": kv, "kvjax_tokens_row0": kv_tokens, "hf": hf, "hf_note": hf_note,
           "llamacpp": llamacpp, "llamacpp_note": llamacpp_note,
           "ratios": ratios, "greedy_tokens_agree": agree, "llamacpp_greedy_tokens_agree": lc_agree,
           "rows": rows}
common.write_json(out / f"{STEM}.json", payload)

plt = common.pyplot()
if plt is not None:
  fig, ax = plt.subplots(figsize=(6, 4))
  series = [("kvjax", kv_tps)] + ([("HF transformers", hf_tps)] if hf_tps else [])
  series += [(r["framework"], {1: r["decode_tok_per_s"]}) for r in lc_rows.values()]
  width = 0.8 / len(series)
  x = np.arange(len(batches))
  for i, (label, tps) in enumerate(series):
    at = [j for j, b in enumerate(batches) if b in tps]  # llama.cpp: batch 1 only
    ax.bar(x[at] + (i - (len(series) - 1) / 2) * width, [tps[batches[j]] for j in at], width,
           label=label)
  ax.plot(x, [b * limit for b in batches], "k_", markersize=30, label="bandwidth limit (float32)")
  ax.set(xticks=x, xticklabels=[f"batch {b}" for b in batches], ylabel="decode tok/s", yscale="log",
         title=f"{model.name}: greedy decode, {new_tokens} new tokens")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / f"{STEM}.png", dpi=120)
  print(f"wrote {out / f'{STEM}.png'}")
