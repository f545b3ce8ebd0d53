"""Decoding over 1, 2, 4 and 8 devices: bytes per device, speed, and the context a budget allows.

Runs on 8 CPU devices (`--xla_force_host_platform_device_count=8`, set by this script) with meshes
over the first n. The CPU's two cores are shared by all the fake devices, so tok/s shows only that
sharding does not break or slow the loop pathologically (a regression guard), not a speedup;
bytes per device are exact, measured from the shards each device holds.

For SmolLM2 (3 kv heads, which divide none of these meshes, so `kvjax.sharding` falls back):
  * batch 8, capacity 1024, mesh model=n: the batch is split over the devices (fallback 1);
  * batch 1, capacity 8192, slots split over n devices (flash-decoding, fallback 2);
and, from the planner with abstract meshes (nothing allocated), the largest full-cache context
(fp32, batch 1) whose per-device share fits a budget, with and without slot sharding.

Outputs (in --out): sharding.json, sharding.csv.

  python experiments/sharding.py            # SmolLM2, 32 new tokens
  python experiments/sharding.py --quick    # the tiny model, 8 new tokens
"""

import argparse
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402

import common  # noqa: E402

DEVICES = [1, 2, 4, 8]
NEW_TOKENS, QUICK_NEW_TOKENS = 32, 8
BUDGETS_MIB = [64, 256, 1024]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="the tiny model, 8 new tokens")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--strict", action="store_true", help="fail on the first error (tests)")
args = parser.parse_args()

import kvjax  # noqa: E402
from kvjax import planning, sharding  # noqa: E402

quick = args.quick
model = common.load_model("tiny" if quick else "smollm2-135m")
new_tokens = QUICK_NEW_TOKENS if quick else NEW_TOKENS
out = common.out_dir(args.out)
info = common.run_info(args)
prompt = kvjax.bench.bench_prompt(getattr(model, "tokenizer", None), 32, model.config.vocab_size)

SETUPS = [
    # (name, batch, capacity, rules): rules None = the defaults and their fallbacks
    ("batch split (fallback)", 8, 1024, None),
    ("slots split (flash-decoding)", 1, 8192, sharding.AxisRules(batch=(), kv_heads=(), slots=("model",))),
]
rows = []
outcomes = common.Outcomes(strict=args.strict)
for name, batch, capacity, rules in SETUPS:
  for n in DEVICES:
    with outcomes.guard(f"{name} on {n}"):
      mesh = sharding.make_mesh(f"model={n}", jax.devices()[:n])
      r = kvjax.bench.run_bench(model, batch=batch, prompt_len=32, new_tokens=new_tokens,
                                capacity=capacity, repeats=2, mesh=mesh, rules=rules)
      rows.append({"setup": name, "devices": n, "batch": batch, "capacity": capacity,
                   "decode_tok_per_s": r["decode_tok_per_s"], "cache_bytes": r["cache_bytes"],
                   "cache_bytes_per_device": r["cache_bytes_per_device"], "sharding": r["sharding"],
                   "compile_s": r["compile_s"]})
      print(f"{name:30s} {n} devices: {r['decode_tok_per_s']:8.1f} tok/s, cache "
            f"{common.fmt_bytes(r['cache_bytes'])} in all, {common.fmt_bytes(r['cache_bytes_per_device'])}"
            f" per device | {r['sharding']}", flush=True)

# The largest context that fits a per-device budget, from the planner's per-device bytes.
contexts = []
config = model.config
per_token = planning.estimate_bytes("full", config, 1024) / 1024
for budget in BUDGETS_MIB:
  for n in DEVICES:
    mesh = jax.sharding.AbstractMesh((n,), ("model",))
    slot_rules = sharding.AxisRules(batch=(), kv_heads=(), slots=("model",))
    best = {}
    for label, rules in (("without slot sharding", sharding.AxisRules(batch=(), kv_heads=(), slots=())),
                         ("with slot sharding", slot_rules)):
      fits = lambda t: planning.bytes_per_device("full", config, t, mesh=mesh, rules=rules) <= budget * 2**20
      low, high = 0, int(budget * 2**20 * n / per_token) // 256 + 1  # in units of 256 tokens
      while high - low > 1:  # fits(low * 256) (or low == 0), not fits(high * 256)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * 256) else (low, mid)
      low *= 256
      best[label] = low
    contexts.append({"budget_mib": budget, "devices": n, **best})
    print(f"budget {budget} MiB/device, {n} devices: full-cache context {best['without slot sharding']} "
          f"without slot sharding, {best['with slot sharding']} with", flush=True)

payload = {"experiment": "sharding", "quick": quick, **info,
           "settings": {"model": model.name if hasattr(model, "name") else "tiny",
                        "new_tokens": new_tokens, "devices": DEVICES, "budgets_mib": BUDGETS_MIB,
                        "fake_devices": "8 CPU devices on the host's cores (tok/s: a regression guard only)"},
           **outcomes.summary(), "results": rows, "contexts": contexts}
common.write_json(out / "sharding.json", payload)
common.write_csv(out / "sharding.csv", rows)
