"""fp8 KV storage beside int8: perplexity and cache bytes for the same kinds stored as intN and fp8.

Perplexity: `kvjax.perplexity(model, ids, cache=spec)` on the first `--ppl-tokens` tokens of
tinyshakespeare, the same protocol as quality.py: the call picks the chunk itself (256-token chunks
for lossless kinds, token by token for every lossy one, so each token sees exactly what that cache
would hold while decoding). Bytes: the arrays of the cache after the run (`sum(cache_bytes)`,
batch 1: capacity, not only used slots), and `kvjax.estimate_bytes` at `--estimate-tokens` tokens
(nothing allocated). `bytes_per_slot` divides that estimate by slots x layers x kv heads: what one
token's key and value together cost in one (layer, row, kv head) stream, scales included (slots =
the estimate's tokens, or the budget of a bounded kind).

Outputs (in --out): fp8.json, fp8.csv.

  python experiments/fp8.py            # SmolLM2-135M fp32, 512 tokens
  python experiments/fp8.py --quick    # tiny random model (numbers meaningless), 96 tokens
"""

import argparse

import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
PPL_TOKENS = 512
ESTIMATE_TOKENS = 4096
SPECS = ["full", "int8", "fp8", "fp8_e5m2", "int4", "fp8+residual:64", "int8+paged:16",
         "fp8+paged:16", "h2o:128+window:128", "fp8+h2o:128+window:128",
         "tier:64:fp32,192:int8", "tier:64:fp32,192:fp8"]
ESTIMATE_SPECS = ["full", "int8", "fp8", "int4"]

QUICK_MODEL = "tiny"
QUICK_PPL_TOKENS = 96
QUICK_SPECS = ["full", "int8", "fp8", "fp8_e5m2", "fp8+h2o:32+window:32", "tier:16:fp32,48:fp8"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare)")
parser.add_argument("--ppl-tokens", type=int, default=None)
parser.add_argument("--estimate-tokens", type=int, default=ESTIMATE_TOKENS)
parser.add_argument("--specs", nargs="+", default=None, help="explicit spec list")
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
args = parser.parse_args()

import kvjax  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK_MODEL if quick else MODEL)
ppl_tokens = args.ppl_tokens or (QUICK_PPL_TOKENS if quick else PPL_TOKENS)
specs = list(args.specs or (QUICK_SPECS if quick else SPECS))
out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
cfg = model.config
streams = cfg.n_layers * cfg.n_kv_heads  # (layer, kv head) streams of one row
text, text_source = common.load_text(args.data, quick)
ids = np.asarray(model.tokenizer.encode(text)[:ppl_tokens], np.int32)
print(f"model {model_name}, {len(ids)} perplexity tokens from {text_source}, {len(specs)} specs",
      flush=True)


def storage(spec) -> str:
  """The storage format of a spec's tokens: its storage term, intN, or the model's dtype."""
  s = kvjax.parse_spec(spec)
  if s.tiers:
    return ",".join(fmt for _, fmt in s.tiers)
  return s.storage or (f"int{s.bits}" if s.bits else np.dtype(model.dtype).name)


outcomes = common.Outcomes(strict=args.strict)
rows = []
for spec in common.progress(specs, desc="specs"):
  parsed = kvjax.parse_spec(spec)
  row = {"spec": spec, "kind": parsed.kind, "storage": storage(spec), "budget": parsed.budget}
  with outcomes.guard(spec):
    p = kvjax.perplexity(model, ids, cache=spec)
    row.update(ppl=p.ppl, nll=p.nll, ppl_tokens=p.tokens, ppl_seconds=p.seconds,
               cache_bytes=common.total_bytes(p.cache_bytes))
  if not outcomes.ok(spec):
    continue
  with outcomes.guard(spec):
    est = kvjax.estimate_bytes(spec, cfg, args.estimate_tokens, dtype=model.dtype)
    slots = parsed.budget or args.estimate_tokens
    row.update(estimate_tokens=args.estimate_tokens, estimate_bytes=est,
               bytes_per_slot=est / (slots * streams))
  rows.append(row)
  print(f"  {spec:28s} ppl {row['ppl']:9.3f}  bytes {common.fmt_bytes(row['cache_bytes'])}  "
        f"{row.get('bytes_per_slot', float('nan')):6.1f} B/slot/stream  ({p.seconds:.1f} s)", flush=True)

full = next((r for r in rows if r["spec"] == "full"), None)
for r in rows:
  r["ppl_delta_vs_full"] = r["ppl"] - full["ppl"] if full else None
  r["bytes_vs_full"] = r["cache_bytes"] / full["cache_bytes"] if full else None

estimates = []
for spec in ESTIMATE_SPECS:
  with outcomes.guard(f"estimate {spec}"):
    est = kvjax.estimate_bytes(spec, cfg, args.estimate_tokens, dtype=model.dtype)
    estimates.append({"spec": spec, "tokens": args.estimate_tokens, "bytes": est,
                      "bytes_per_slot": est / (args.estimate_tokens * streams)})
    print(f"  estimate {spec:8s} at {args.estimate_tokens} tokens: {common.fmt_bytes(est)}", flush=True)

payload = {"experiment": "fp8", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(model.dtype).name,
                        "ppl_tokens": int(len(ids)), "text": text_source, "specs": specs,
                        "estimate_tokens": args.estimate_tokens, "layers": cfg.n_layers,
                        "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim},
           "notes": ["perplexity: kvjax.perplexity with its default chunk (lossless kinds in "
                     "256-token chunks, lossy kinds token by token), batch 1",
                     "cache_bytes: arrays of the cache after the run (capacity, not only used slots)",
                     "bytes_per_slot: kvjax.estimate_bytes / (slots x layers x kv heads), key and "
                     "value of one token in one (layer, row, kv head) stream, scales included; "
                     "slots = estimate_tokens, or the budget of a bounded kind"],
           **outcomes.summary(), "estimates": estimates, "rows": rows}
common.write_json(out / "fp8.json", payload)
common.write_csv(out / "fp8.csv", rows)
