"""KV-cache memory: the seeds' formulas against bytes kvjax measures from its cache arrays.

Formulas (K and V, every layer, every kv head, one row):

  seed 003's 4-layer, 4-head, d 256 model:  2048 * T floats (fp32: 8 KiB per token)
  LLaMA-7B in fp16:                         2 * 32 layers * 32 heads * 128 dims * T * 2 bytes
  SmolLM2-135M (GQA, 3 kv heads), fp32:     2 * 30 * 3 * 64 * T * 4 bytes
  the same model with full MHA (9 kv heads) for the GQA saving (3x)
  Gemma 3 270M (MQA), fp32, all-full:       2 * 18 * 1 * 256 * T * 4 bytes; its specs are layouts
                                            (global layers get the spec, sliding ones a 512 ring)

Measured: `kvjax.make_cache(spec, config, batch=1, capacity).nbytes()`, which sums the real
arrays of the cache pytree (keys, values, scales, positions, lengths, ...), split by memory kind.
No model runs: a cache's arrays are allocated up front, so an empty cache of capacity T already
holds its final bytes. Caches too large to allocate here (LLaMA-7B at 32k is 16 GiB) are measured
on their shapes instead (`jax.eval_shape` of the same constructor; the `measured_from` column says
which). Bounded kinds (window, sink, h2o, tier) hold their budget whatever T; when T is below the
budget they are built at capacity = budget. Kinds not built yet are skipped with a note.

Outputs (in --out): memory.json, memory.csv, memory.png (if matplotlib is installed).

  python experiments/memory.py            # 1k / 8k / 32k tokens, five model shapes, every kind
  python experiments/memory.py --quick    # 256 / 1024 tokens
"""

import argparse

import jax
import jax.numpy as jnp

import common

# ---- settings -------------------------------------------------------------------------------
TOKENS = [1024, 8192, 32768]
QUICK_TOKENS = [256, 1024]
SPECS = [
    "full", "dynamic", "offload",
    "int8", "int4", "int2", "int4+residual:128",
    "window:1024", "sink:4+window:1020", "h2o:256+window:768",
    "tier:64:fp32,448:int8,3584:int2",
    "share:2", "share:2:cal",
]
MAX_ALLOC_MB = 2048  # bigger caches are measured from their shapes, not allocated

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="small token counts (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--tokens", nargs="+", type=int, default=None)
parser.add_argument("--specs", nargs="+", default=None)
parser.add_argument("--max-alloc-mb", type=float, default=None,
                    help=f"allocate caches up to this size (default {MAX_ALLOC_MB}, quick 64)")
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
args = parser.parse_args()

import kvjax  # noqa: E402

tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
specs = args.specs or SPECS
max_alloc = (args.max_alloc_mb if args.max_alloc_mb is not None else (64 if args.quick else MAX_ALLOC_MB)) * 2**20
out = common.out_dir(args.out)
info = common.run_info(args)

LLAMA_7B = kvjax.LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             head_dim=128, ffn_dim=11008, name="llama-7b")
MODELS = [
    # (label, config, dtype, formula in bytes for T tokens, where the formula comes from)
    ("tiny (seed 003: 4 layers, 4 heads, d 256)", kvjax.TINY, jnp.float32,
     lambda t: 2048 * t * 4, "2048*T floats * 4 B"),
    ("smollm2-135m (GQA, 3 kv heads)", kvjax.SMOLLM2_135M, jnp.float32,
     lambda t: 2 * 30 * 3 * 64 * t * 4, "2*30*3*64*T * 4 B"),
    ("smollm2-135m as MHA (9 kv heads)", kvjax.SMOLLM2_135M.replace(n_kv_heads=9, name="smollm2-mha"),
     jnp.float32, lambda t: 2 * 30 * 9 * 64 * t * 4, "2*30*9*64*T * 4 B"),
    ("llama-7b (fp16)", LLAMA_7B, jnp.float16, lambda t: 2 * 32 * 32 * 128 * t * 2,
     "2*32*32*128*T * 2 B"),
    # A spec on Gemma 3 is a layout: plain specs apply to the 3 global layers, the 15 sliding
    # ones keep a 512-token ring (kvjax.layouts); the formula is the all-full cache's.
    ("gemma3-270m (MQA; 15 sliding + 3 global layers)", kvjax.GEMMA3_270M, jnp.float32,
     lambda t: 2 * 18 * 1 * 256 * t * 4, "2*18*1*256*T * 4 B (all-full)"),
]
if args.quick:
  MODELS = MODELS[:2]


def measure(spec, config, dtype, capacity, formula_bytes):
  """({memory kind: bytes}, 'arrays' | 'shapes', fixed bytes) of an empty cache of `capacity` slots.

  share:G:cal caches also hold calibration maps (a fixed cost per model, not per token): identity
  maps of the right shape stand in for fitted ones, and their bytes are reported apart.
  """
  def build():
    options = {}
    if kvjax.parse_spec(spec).share_calibrated:
      from kvjax.caches.shared import ShareMaps

      options["maps"] = ShareMaps.identity(config.n_layers, config.n_kv_heads * config.head_dim)
    return kvjax.make_cache(spec, config, 1, capacity, dtype, **options)

  def split(cache):  # (KV storage by memory kind, calibration maps' bytes)
    if hasattr(cache, "kv_nbytes"):
      return cache.kv_nbytes(), int(cache.maps_nbytes())
    return cache.nbytes(), 0

  if formula_bytes <= max_alloc:
    cache = build()
    nbytes, extra = split(cache)
    del cache
    return nbytes, "arrays", extra
  kv, extra = split(jax.eval_shape(build))
  return kv, "shapes", extra


outcomes = common.Outcomes(strict=args.strict)
rows = []
for label, config, dtype, formula, formula_text in MODELS:
  print(f"\n== {label}  ({jnp.dtype(dtype).name}; formula {formula_text})")
  for spec in common.progress(specs, desc=config.name):
    parsed = kvjax.parse_spec(spec)
    for t in tokens:
      if not outcomes.ok(spec):
        break
      capacity = max(t, parsed.budget or 0)
      with outcomes.guard(spec):
        nbytes, how, fixed_bytes = measure(spec, config, dtype, capacity, formula(t))
        total = common.total_bytes(nbytes)
        rows.append({"model": label, "config": config.name, "dtype": jnp.dtype(dtype).name,
                     "spec": spec, "tokens": t, "capacity": capacity,
                     "formula_full_bytes": formula(t), "formula": formula_text,
                     "measured_bytes": total, "measured_by_memory_kind": nbytes,
                     "measured_from": how, "fixed_bytes": fixed_bytes, "bytes_per_token": total / t,
                     "ratio_to_full_formula": total / formula(t)})

# Print the table: one line per (model, spec), one column per token count.
print()
for label, *_ in MODELS:
  print(label)
  print(f"  {'spec':34s}" + "".join(f"{t:>14d}" for t in tokens))
  mine = [r for r in rows if r["model"] == label]
  formula_row = {r["tokens"]: r["formula_full_bytes"] for r in mine}
  print(f"  {'formula (full)':34s}" + "".join(f"{common.fmt_bytes(formula_row.get(t, 0)):>14s}" for t in tokens))
  for spec in dict.fromkeys(r["spec"] for r in mine):
    by_t = {r["tokens"]: r["measured_bytes"] for r in mine if r["spec"] == spec}
    print(f"  {spec:34s}" + "".join(f"{common.fmt_bytes(by_t[t]):>14s}" if t in by_t else f"{'-':>14s}"
                                    for t in tokens))

gqa = {}
for t in tokens:
  a = next((r for r in rows if r["config"] == "smollm2-135m" and r["spec"] == "full" and r["tokens"] == t), None)
  b = next((r for r in rows if r["config"] == "smollm2-mha" and r["spec"] == "full" and r["tokens"] == t), None)
  if a and b:
    gqa[t] = b["measured_bytes"] / a["measured_bytes"]
if gqa:
  print("\nGQA saving (MHA bytes / GQA bytes, full cache):", {t: round(v, 3) for t, v in gqa.items()})

payload = {"experiment": "memory", "quick": args.quick, **info,
           "settings": {"tokens": tokens, "specs": specs, "batch": 1, "max_alloc_bytes": max_alloc},
           "notes": ["measured = sum of the cache pytree's arrays (kvjax nbytes), batch 1, empty cache "
                     "of the given capacity (arrays are preallocated, so this is the final size)",
                     "measured_from=shapes: too big to allocate here; bytes of the same arrays' shapes",
                     "bounded kinds are built at capacity max(tokens, budget): their size is the budget",
                     "full includes the 4-byte int32 lengths per row on top of the formula",
                     "fixed_bytes: per-model extras outside the KV storage (share:G:cal maps, "
                     "measured on identity maps of the fitted maps' shape)"],
           **outcomes.summary(), "gqa_saving": gqa, "rows": rows}
common.write_json(out / "memory.json", payload)
common.write_csv(out / "memory.csv", rows)

plt = common.pyplot()
if plt is not None:
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, (label, config, dtype, formula, _) in enumerate(MODELS):
    full = [r for r in rows if r["model"] == label and r["spec"] == "full"]
    ax1.plot(tokens, [formula(t) for t in tokens], color=f"C{i}", ls="--", label=f"{label} formula")
    ax1.plot([r["tokens"] for r in full], [r["measured_bytes"] for r in full], "o", color=f"C{i}",
             label=f"{label} measured")
  ax1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="bytes (batch 1)",
          title="full cache: seed formulas vs measured arrays")
  ax1.legend(fontsize=7)
  target = MODELS[1][0]
  for j, spec in enumerate(dict.fromkeys(r["spec"] for r in rows if r["model"] == target)):
    mine = [r for r in rows if r["model"] == target and r["spec"] == spec]
    ax2.plot([r["tokens"] for r in mine], [r["measured_bytes"] for r in mine], marker="o",
             color=f"C{j % 10}", ls="-" if j < 10 else ":", label=spec)
  ax2.set(xscale="log", yscale="log", xlabel="tokens", ylabel="bytes (batch 1)",
          title=f"{target}: every cache kind")
  ax2.legend(fontsize=7, ncol=2)
  for ax in (ax1, ax2):
    common.bytes_axis(ax.yaxis)
    common.plain_log_axis(ax.xaxis, ticks=tokens)
  fig.tight_layout()
  fig.savefig(out / "memory.png", dpi=120)
  print(f"wrote {out / 'memory.png'}")
