"""kvjax's presses beside kvpress 0.5.5: prefill + compress, then greedy decode, same ids, same GGUF.

Both sides run SmolLM2-135M-Instruct from the same GGUF, dequantized to float32, on the CPU, over
the same prompts: `--prompts` spans of tinyshakespeare of `--prompt-len` tokens each, tokenized
once by kvjax (the kvpress side receives the ids). For each press (kvpress defaults, `compat=
"kvpress"` on the kvjax side) at ratio 0.5, and for no press (the full cache), `--new-tokens`
tokens are decoded greedily after the prompt (the first from the uncompressed prefill's logits,
as in kvpress; no stop at EOS):

  * kvjax, batch 1 (each prompt alone) and batch B (all prompts in one call):
    `kvjax.compress(model, rows, press, ratio=0.5, compat="kvpress", details=True)` then
    `kvjax.generate(model, [[first] per row], cache=cache, max_new_tokens=N - 1)`. Prefill s =
    wall time of compress up to the first tokens on the host (cache ready); decode s = wall time
    of the generate call. No press: `kvjax.generate(model, rows, cache="full", max_new_tokens=N)`,
    prefill s = its `prefill_s`, decode s = the rest of the call's wall time.
  * kvpress, batch 1 per prompt (its pipeline compresses one context at a time):
    `experiments/kvpress_peer.py` in a subprocess with kvpress's python (`--kvpress-python`, else
    $KVJAX_KVPRESS_PYTHON; otherwise skipped with a note; kvpress is never a kvjax dependency).
    Its `KVPressTextGenerationPipeline` takes a context string, not ids, so the peer does what the
    pipeline's `_forward` does, by hand: `with press(model): model(ids, DynamicCache())`, then
    N - 1 single-token greedy steps at positions T, T + 1, ... (see the peer's docstring).

Warm-up: every (press, batch) runs once before the timed runs (kvjax compiles there; the peer gets
a short run per press) and is not counted; `compile_stats` checks that no timed run compiled.
Timed runs interleave the frameworks press by press (kvjax batch 1, kvpress, kvjax batch B) so
that load from other processes hits both alike; `--rounds` > 1 repeats them and takes each run's
median. Prefill tok/s = prompt tokens / prefill s; decode tok/s = rows * (N - 1) / decode s (the
tokens made after the prefill's first), summed over prompts at batch 1.

Outputs (in --out): press_speed.json: per (press, framework, batch) seconds and tok/s, the
kvjax / kvpress ratios, the cost of compressing (press / no press, each framework), and how many
prompts' greedy tokens agree between kvjax and kvpress (all N, and the leading run).

On a shared box pass `--threads 1`: with more runnable processes than cores, torch's two OpenMP
threads spin-wait on each other (a 1024-token knorm prefill + 31-token decode took 19 s + 85 s
with torch's default 2 threads and 5 s + 4 s with 1, at a load of ~8 on 2 cores); one thread each
keeps the two frameworks on an equal footing.

  KVJAX_KVPRESS_PYTHON=/work/kvpress-venv/bin/python python experiments/press_speed.py --threads 1
  python experiments/press_speed.py --quick      # 2 short prompts, 4 tokens (kvpress if found)
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
PRESSES = ["knorm", "streaming_llm", "snapkv"]
RATIO = 0.5
N_PROMPTS = 8
PROMPT_LEN = 2048
NEW_TOKENS = 32
ROUNDS = 1
PEER_TIMEOUT_S = 3600

QUICK_N_PROMPTS = 2
QUICK_PROMPT_LEN = 96  # > snapkv's 64-token window, which kvpress requires
QUICK_NEW_TOKENS = 4

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="2 prompts of 96 tokens, 4 new tokens")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--presses", nargs="+", default=PRESSES)
parser.add_argument("--ratio", type=float, default=RATIO)
parser.add_argument("--prompts", type=int, default=None, help="number of prompts (= kvjax's batch)")
parser.add_argument("--prompt-len", type=int, default=None)
parser.add_argument("--new-tokens", type=int, default=None)
parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds (median per run)")
parser.add_argument("--data", default=str(common.DEFAULT_DATA))
parser.add_argument("--kvpress-python", default=None,
                    help="python of kvpress's venv (default: $KVJAX_KVPRESS_PYTHON)")
parser.add_argument("--kvpress-threads", type=int, default=None, help="torch threads (default: torch's)")
parser.add_argument("--no-kvpress", action="store_true", help="kvjax only")
parser.add_argument("--threads", type=int, default=None,
                    help="threads for both: XLA's CPU intra-op threads (set before JAX starts) and "
                         "torch's (default: each framework's own)")
parser.add_argument("--model", default=MODEL, help="smollm2-135m (default) or tiny (no kvpress)")
args = parser.parse_args()
MODEL = args.model
if args.threads:
  # One XLA CPU thread: no Eigen pool; otherwise an intra-op pool of that size.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + (
      " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if args.threads == 1
      else f" intra_op_parallelism_threads={args.threads}")).strip()
  args.kvpress_threads = args.kvpress_threads or args.threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kvjax  # noqa: E402

quick = args.quick
n_prompts = args.prompts or (QUICK_N_PROMPTS if quick else N_PROMPTS)
prompt_len = args.prompt_len or (QUICK_PROMPT_LEN if quick else PROMPT_LEN)
new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if quick else NEW_TOKENS)
configs = [None] + list(args.presses)  # None: no press, the full cache
out = common.out_dir(args.out)
info = common.run_info(args)

# ---- model and prompts --------------------------------------------------------------------------
gguf_path = None
try:
  from kvjax.models import catalog

  if MODEL != "tiny":
    gguf_path = catalog.resolve_model_path(MODEL, allow_download=not quick)
  model = kvjax.load(MODEL)
except FileNotFoundError as e:
  if not quick:
    raise SystemExit(f"cannot load {MODEL}: {e}")
  print(f"note: {MODEL} is not available ({e}); quick run uses the tiny model, kvpress skipped")
  model = kvjax.load("tiny")

text = pathlib.Path(args.data).read_text(encoding="utf-8")
prompts, offsets = [], []
for i in range(n_prompts):
  # Spans spread over the text, each from a line start, cut to exactly prompt_len tokens.
  at = i * (len(text) - 8 * prompt_len) // max(1, n_prompts)
  at = at if at == 0 else text.index("\n", at) + 1
  if getattr(model, "tokenizer", None) is not None:
    ids = model.tokenizer.encode(text[at:at + 8 * prompt_len])
  else:  # the tiny model has no tokenizer: bytes as ids
    ids = [b % model.config.vocab_size for b in text[at:at + prompt_len].encode()]
  assert len(ids) >= prompt_len, (at, len(ids))
  prompts.append([int(t) for t in ids[:prompt_len]])
  offsets.append(at)
print(f"model {model.name}, {n_prompts} prompts of {prompt_len} tokens, {new_tokens} new tokens, "
      f"presses {args.presses} at ratio {args.ratio}")


# ---- kvjax --------------------------------------------------------------------------------------
def kvjax_run(press, rows):
  """One prefill (+ compress) and greedy decode of `rows`; seconds and tokens [B, N]."""
  before = kvjax.compile_stats()["n_compiles"]
  start = time.perf_counter()
  if press is None:
    res = kvjax.generate(model, rows, cache="full", max_new_tokens=new_tokens, stop_at_eos=False)
    end = time.perf_counter()
    prefill_s, decode_s, tokens = res.prefill_s, end - start - res.prefill_s, res.tokens
  else:
    cache, details = kvjax.compress(model, rows, press, ratio=args.ratio, compat="kvpress",
                                    details=True)
    first = np.asarray(jnp.argmax(details.logits, axis=-1))
    jax.block_until_ready(cache)
    mid = time.perf_counter()
    tokens = first[:, None]
    if new_tokens > 1:
      res = kvjax.generate(model, [[int(t)] for t in first], cache=cache,
                           max_new_tokens=new_tokens - 1, stop_at_eos=False)
      tokens = np.concatenate([tokens, res.tokens], axis=1)
    end = time.perf_counter()
    prefill_s, decode_s = mid - start, end - mid
  return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": np.asarray(tokens).tolist(),
          "n_compiles": kvjax.compile_stats()["n_compiles"] - before}


def kvjax_batch1(press):
  runs = [kvjax_run(press, [p]) for p in prompts]
  return [{"prompt": i, "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
           "tokens": r["tokens"][0], "n_compiles": r["n_compiles"]} for i, r in enumerate(runs)]


def kvjax_batched(press):
  r = kvjax_run(press, prompts)
  return [{"prompt": "all", "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
           "tokens": r["tokens"], "n_compiles": r["n_compiles"]}]


# ---- kvpress (a subprocess answering one JSON line per command) ---------------------------------
class Peer:
  """experiments/kvpress_peer.py, started once; `run(press, prompts, truncate)` -> its results."""

  PREFIX = "@@kvpress@@ "

  def __init__(self, python, tmp):
    ids_file = pathlib.Path(tmp) / "ids.json"
    ids_file.write_text(json.dumps(prompts))
    self.log = open(pathlib.Path(tmp) / "peer.log", "w")
    cmd = [python, str(pathlib.Path(__file__).with_name("kvpress_peer.py")), "--gguf",
           str(gguf_path), "--ids", str(ids_file)]
    if args.kvpress_threads:
      cmd += ["--threads", str(args.kvpress_threads)]
    print("running kvpress:", " ".join(cmd), flush=True)
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True)
    self.info = self.read()

  def read(self):
    for line in self.proc.stdout:
      if line.startswith(self.PREFIX):
        return json.loads(line[len(self.PREFIX):])
    self.log.flush()
    tail = pathlib.Path(self.log.name).read_text()[-2000:]
    raise RuntimeError(f"kvpress peer exited ({self.proc.wait()}): {tail}")

  def run(self, press, which, truncate=None, n=None):
    cmd = {"press": press, "ratio": args.ratio, "prompts": which, "new_tokens": n or new_tokens,
           "truncate": truncate}
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self.read()["results"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self.log.close()


kvpress_python = args.kvpress_python or os.environ.get("KVJAX_KVPRESS_PYTHON") or None
peer, peer_note = None, None
tmp = tempfile.TemporaryDirectory()
if args.no_kvpress:
  peer_note = "skipped (--no-kvpress)"
elif gguf_path is None or model.name != MODEL:
  peer_note = f"skipped: {MODEL} GGUF not available"
elif kvpress_python is None:
  peer_note = ("skipped: no kvpress python given (pass --kvpress-python or set "
               "KVJAX_KVPRESS_PYTHON; see scripts/make_kvpress_fixtures.py for its venv)")
else:
  try:
    peer = Peer(kvpress_python, tmp.name)
    print(f"  kvpress peer ready: {peer.info}", flush=True)
  except (OSError, RuntimeError) as e:
    peer_note = f"failed to start: {e}"
if peer_note:
  print(f"note: kvpress {peer_note}")

# ---- warm-up (not counted) ----------------------------------------------------------------------
warm_start = time.perf_counter()
compiles_before = kvjax.compile_stats()
for press in common.progress(configs, desc="warm-up"):
  kvjax_run(press, [prompts[0]])
  kvjax_run(press, prompts)
  if peer is not None:
    peer.run(press, [0], truncate=min(prompt_len, 128), n=2)
warmup = {"seconds": time.perf_counter() - warm_start,
          "compile_s": kvjax.compile_stats()["compile_s"] - compiles_before["compile_s"],
          "n_compiles": kvjax.compile_stats()["n_compiles"] - compiles_before["n_compiles"]}
print(f"  warm-up {warmup['seconds']:.0f} s (kvjax compiled {warmup['n_compiles']} executables in "
      f"{warmup['compile_s']:.0f} s)", flush=True)

# ---- timed runs, interleaved press by press -----------------------------------------------------
runs = {}  # (press, framework, batch) -> list over rounds of per-prompt results
for rnd in range(args.rounds):
  for press in configs:
    label = press or "none"
    print(f"  round {rnd + 1}/{args.rounds}, {label}", flush=True)
    runs.setdefault((label, "kvjax", 1), []).append(kvjax_batch1(press))
    if peer is not None:
      runs.setdefault((label, "kvpress", 1), []).append(peer.run(press, list(range(n_prompts))))
    runs.setdefault((label, "kvjax", n_prompts), []).append(kvjax_batched(press))
if peer is not None:
  peer.close()
tmp.cleanup()


# ---- summary ------------------------------------------------------------------------------------
def leading(a, b):
  """How many leading greedy tokens two runs share."""
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


rows = []
tokens = {}  # (press, framework, batch) -> [prompt][N] tokens of the first round
for (label, framework, batch), rounds in runs.items():
  med = lambda key, j: statistics.median(r[j][key] for r in rounds)  # noqa: E731
  n_runs = len(rounds[0])
  prefill_s = sum(med("prefill_s", j) for j in range(n_runs))
  decode_s = sum(med("decode_s", j) for j in range(n_runs))
  first = rounds[0]
  tokens[(label, framework, batch)] = ([r["tokens"] for r in first] if batch == 1 else
                                       first[0]["tokens"])
  rows.append({"press": label, "framework": framework, "batch": batch, "prompts": n_prompts,
               "prompt_len": prompt_len, "new_tokens": new_tokens,
               "prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s,
               "prefill_s_per_prompt": [med("prefill_s", j) for j in range(n_runs)],
               "decode_s_per_prompt": [med("decode_s", j) for j in range(n_runs)],
               "prefill_tok_per_s": n_prompts * prompt_len / prefill_s,
               "decode_tok_per_s": n_prompts * (new_tokens - 1) / decode_s if new_tokens > 1
               else None,
               "timed_compiles": sum(r.get("n_compiles", 0) for rr in rounds for r in rr),
               "cache_len": [r.get("cache_len") for r in first] if framework == "kvpress"
               else None})
by = {(r["press"], r["framework"], r["batch"]): r for r in rows}

ratios, cost, agree = {}, {}, {}
for label in [c or "none" for c in configs]:
  for batch in (1, n_prompts):
    kv = by.get((label, "kvjax", batch))
    kp = by.get((label, "kvpress", 1))
    if kv and kp:
      ratios[f"{label}_kvjax_b{batch}_over_kvpress_b1"] = {
          "prefill": kv["prefill_tok_per_s"] / kp["prefill_tok_per_s"],
          "decode": (kv["decode_tok_per_s"] / kp["decode_tok_per_s"]
                     if kv["decode_tok_per_s"] and kp["decode_tok_per_s"] else None),
          "total": kp["total_s"] / kv["total_s"]}
  for framework, batch in (("kvjax", 1), ("kvjax", n_prompts), ("kvpress", 1)):
    r, base = by.get((label, framework, batch)), by.get(("none", framework, batch))
    if label != "none" and r and base:
      cost[f"{label}_{framework}_b{batch}"] = {"prefill": r["prefill_s"] / base["prefill_s"],
                                               "decode": r["decode_s"] / base["decode_s"]}
  kv1, kvb = tokens.get((label, "kvjax", 1)), tokens.get((label, "kvjax", n_prompts))
  kp = tokens.get((label, "kvpress", 1))
  entry = {"kvjax_b1_vs_b{}".format(n_prompts): sum(a == b for a, b in zip(kv1, kvb))}
  if kp:
    entry["kvjax_b1_vs_kvpress_all_tokens"] = sum(a == b for a, b in zip(kv1, kp))
    entry["kvjax_b1_vs_kvpress_leading"] = [leading(a, b) for a, b in zip(kv1, kp)]
    entry[f"kvjax_b{n_prompts}_vs_kvpress_all_tokens"] = sum(a == b for a, b in zip(kvb, kp))
  agree[label] = entry

for r in rows:
  print(f"  {r['press']:14s} {r['framework']:7s} b{r['batch']}: prefill+compress "
        f"{r['prefill_s']:7.2f} s ({r['prefill_tok_per_s']:7.1f} tok/s), decode {r['decode_s']:6.2f} s"
        + (f" ({r['decode_tok_per_s']:6.1f} tok/s)" if r["decode_tok_per_s"] else ""))
for k, v in ratios.items():
  print(f"  {k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items() if b is not None))
for k, v in cost.items():
  print(f"  cost {k}: prefill x{v['prefill']:.2f}, decode x{v['decode']:.2f}")
for k, v in agree.items():
  print(f"  agree {k}: {v}")

payload = {"experiment": "press_speed", "quick": quick, **info,
           "settings": {"model": model.name, "gguf": str(gguf_path) if gguf_path else None,
                        "dtype": str(np.dtype(model.dtype)), "presses": args.presses,
                        "ratio": args.ratio, "compat": "kvpress", "prompts": n_prompts,
                        "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": args.rounds,
                        "data": args.data, "char_offsets": offsets, "greedy": True,
                        "stop_at_eos": False, "threads": args.threads,
                        "xla_flags": os.environ.get("XLA_FLAGS")},
           "method": {"kvjax": "kvjax.compress(..., compat='kvpress', details=True) then "
                               "kvjax.generate(cache=...) from the first tokens; no press: "
                               "kvjax.generate(cache='full'); prefill s = compress to the first "
                               "tokens (generate's prefill_s without a press), decode s = the rest",
                      "kvpress": "experiments/kvpress_peer.py: with press(model): model(ids, "
                                 "DynamicCache(), logits_to_keep=1), then N - 1 greedy "
                                 "single-token steps at positions T + i (the pipeline's _forward "
                                 "by hand: the pipeline takes text, not ids); batch 1",
                      "order": "warm-up of every (press, batch) first; then press by press: kvjax "
                               "batch 1, kvpress batch 1, kvjax batch B; medians over rounds"},
           "warmup": warmup, "kvpress": peer.info if peer else None, "kvpress_note": peer_note,
           "rows": rows, "ratios": ratios, "compress_cost": cost, "agreement": agree,
           "tokens": {f"{k[0]}/{k[1]}/b{k[2]}": v for k, v in tokens.items()}}
common.write_json(out / "press_speed.json", payload)
