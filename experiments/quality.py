"""Quality vs memory for every cache kind: perplexity and passkey retrieval against cache bytes.

Perplexity: `kvjax.perplexity` on the first `--ppl-tokens` tokens of tinyshakespeare. Lossless
caches feed 256-token chunks; every lossy kind (window, sink, quantized, h2o, tier, share) feeds the
text token by token, so each token sees exactly what that cache would hold while decoding. That is
one jitted step per token: slow on CPU, hence the modest default of 512 tokens.

Passkey: a random 5-digit key is hidden at several depths (fraction of the way into the context)
inside repetitive filler text of about `--passkey-tokens` tokens, and asked for at the end. Greedy
`kvjax.generate` continues "The pass key is"; the score is exact match of the first 5-digit number
it writes. All trials of one cache spec run as one ragged batch.

Bounded kinds (window, sink, h2o, tier; h2o and tier also with fp8 storage) are swept over
`--budgets` tokens; unbounded ones (full, int8/fp8/fp8_e5m2/int4/int2, residual, share) have one
point each. x = cache bytes measured from the cache arrays after the run (perplexity: batch 1;
passkey: per row); kinds not built yet are skipped with a note, kinds that raise are recorded
under "failed".

Outputs (in --out): quality.json, quality.csv, quality.png (if matplotlib is installed).

  python experiments/quality.py            # SmolLM2-135M, 512 tokens, budgets 64/128/256
  python experiments/quality.py --quick    # tiny random model (numbers meaningless), 96 tokens
"""

import argparse
import math
import re

import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
PPL_TOKENS = 512
PASSKEY_TOKENS = 512
BUDGETS = [64, 128, 256]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
KEYS_PER_DEPTH = 2
NEW_TOKENS = 8
SEED = 0
CALIBRATION_TOKENS = 2048  # share:G:cal: least-squares maps fitted on the text after the ppl tokens
UNBOUNDED_SPECS = ["full", "int8", "fp8", "fp8_e5m2", "int4", "int2", "int4+residual:64",
                   "fp8+residual:64", "share:2", "share:2:cal"]
BOUNDED_TEMPLATES = ["window:{b}", "sink:4+window:{b4}", "h2o:{half}+window:{half}",
                     "fp8+h2o:{half}+window:{half}", "tier:{quarter}:fp32,{rest}:int4",
                     "tier:{quarter}:fp32,{rest}:fp8"]

QUICK_MODEL = "tiny"
QUICK_PPL_TOKENS = 96
QUICK_PASSKEY_TOKENS = 96
QUICK_BUDGETS = [32]
QUICK_DEPTHS = [0.5]
QUICK_UNBOUNDED = ["full", "fp8"]
QUICK_TEMPLATES = ["sink:4+window:{b4}"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare)")
parser.add_argument("--ppl-tokens", type=int, default=None)
parser.add_argument("--passkey-tokens", type=int, default=None)
parser.add_argument("--budgets", nargs="+", type=int, default=None)
parser.add_argument("--specs", nargs="+", default=None, help="explicit spec list (overrides the sweep)")
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
args = parser.parse_args()

import kvjax  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK_MODEL if quick else MODEL)
ppl_tokens = args.ppl_tokens or (QUICK_PPL_TOKENS if quick else PPL_TOKENS)
passkey_tokens = args.passkey_tokens or (QUICK_PASSKEY_TOKENS if quick else PASSKEY_TOKENS)
budgets = args.budgets or (QUICK_BUDGETS if quick else BUDGETS)
depths = QUICK_DEPTHS if quick else DEPTHS
keys_per_depth = 1 if quick else KEYS_PER_DEPTH
if args.specs:
  specs = list(args.specs)
else:
  specs = list(QUICK_UNBOUNDED if quick else UNBOUNDED_SPECS)
  for b in budgets:
    for template in (QUICK_TEMPLATES if quick else BOUNDED_TEMPLATES):
      specs.append(template.format(b=b, b4=b - 4, half=b // 2, quarter=b // 4, rest=b - b // 4))
out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
tok = model.tokenizer
text, text_source = common.load_text(args.data, quick)
all_ids = tok.encode(text)
ids = np.asarray(all_ids[:ppl_tokens], np.int32)
# share:G:cal fits its maps on the text that follows the evaluated tokens (never on them).
calibration_ids = np.asarray(all_ids[ppl_tokens:ppl_tokens + CALIBRATION_TOKENS], np.int32)
print(f"model {model_name}, {len(ids)} perplexity tokens from {text_source}, passkey context "
      f"~{passkey_tokens} tokens, {len(specs)} specs")


def passkey_prompt(key: int, depth: float, target: int) -> str:
  """Filler with the needle at `depth` (0 = start, 1 = end), about `target` tokens in all."""
  fixed = len(tok.encode(INTRO + NEEDLE.format(key=key) + QUESTION))
  n_fill = max(1, (target - fixed) // len(tok.encode(FILLER)))
  before = round(depth * n_fill)
  return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_fill - before) + QUESTION


rng = np.random.default_rng(SEED)
trials = [(int(rng.integers(10000, 100000)), d) for d in depths for _ in range(keys_per_depth)]
prompts = [passkey_prompt(key, d, passkey_tokens) for key, d in trials]
prompt_lens = [len(tok.encode(p)) for p in prompts]


def storage_name(s) -> str | None:
  """A spec's storage term as written in specs ("fp8" for fp8_e4m3), or None (intN / floats)."""
  return {"fp8_e4m3": "fp8"}.get(s.storage, s.storage)


def family(spec: str) -> str:
  s = kvjax.parse_spec(spec)
  if s.share > 1:
    return "share"
  if s.tiers:  # one line per storage of the compressed tiers (int4 tiers vs fp8 tiers)
    return "tier" + ("+fp8" if any(f.startswith("fp8") for _, f in s.tiers) else "")
  if s.h2o:
    return (f"{storage_name(s)}+" if s.storage else "") + "h2o"
  if s.sink:
    return "sink+window"
  if s.window:
    return "window"
  if s.bits:  # intN, or the storage term's format (fp8, fp8_e5m2)
    return (storage_name(s) or f"int{s.bits}") + ("+residual" if s.residual else "")
  return "full"


outcomes = common.Outcomes(strict=args.strict)
rows = []
for spec in common.progress(specs, desc="specs"):
  row = {"spec": spec, "family": family(spec), "budget": kvjax.parse_spec(spec).budget}
  parsed = kvjax.parse_spec(spec)
  cache_options = {}
  if parsed.share_calibrated:
    with outcomes.guard(spec):
      cache_options["maps"] = kvjax.fit_share_maps(model, calibration_ids, parsed.share)
      row["calibration_tokens"] = int(len(calibration_ids))
      row["maps_bytes"] = common.total_bytes(kvjax.caches.base.tree_nbytes(cache_options["maps"]))
  if not outcomes.ok(spec):
    continue
  with outcomes.guard(spec):
    # Lossless kinds take chunks that divide the text, so their capacity is the text, not a
    # padded chunk multiple (the x axis compares bytes for the same number of tokens).
    lossless = kvjax.parse_spec(spec).lossless
    p = kvjax.perplexity(model, ids, cache=spec, chunk=math.gcd(len(ids), 256) if lossless else None,
                         cache_options=cache_options)
    row.update(ppl=p.ppl, nll=p.nll, ppl_tokens=p.tokens, ppl_seconds=p.seconds,
               ppl_cache_bytes=common.total_bytes(p.cache_bytes))
  if not outcomes.ok(spec):
    continue
  with outcomes.guard(spec):
    g = kvjax.generate(model, prompts, max_new_tokens=NEW_TOKENS, cache=spec, stop_at_eos=False,
                       cache_options=cache_options)
    answers = [tok.decode(t) for t in g.tokens]
    found = [re.search(r"\d{5}", a.replace(" ", "")) for a in answers]
    hits = [bool(f) and f.group(0) == str(key) for f, (key, _) in zip(found, trials)]
    by_depth = {str(d): float(np.mean([h for h, (_, dd) in zip(hits, trials) if dd == d])) for d in depths}
    row.update(passkey_accuracy=float(np.mean(hits)), passkey_by_depth=by_depth,
               passkey_cache_bytes_per_row=common.total_bytes(g.cache_bytes) / len(prompts),
               passkey_answers=answers)
  if "passkey_accuracy" not in row:
    row.update(passkey_accuracy=None)
  rows.append(row)
  print(f"  {spec:34s} ppl {row['ppl']:9.3f}  passkey {row['passkey_accuracy']}  "
        f"bytes {common.fmt_bytes(row['ppl_cache_bytes'])}", flush=True)

payload = {"experiment": "quality", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(model.dtype).name,
                        "ppl_tokens": int(len(ids)), "text": text_source,
                        "passkey_tokens_target": passkey_tokens, "passkey_prompt_lengths": prompt_lens,
                        "depths": depths, "keys_per_depth": keys_per_depth, "new_tokens": NEW_TOKENS,
                        "budgets": budgets, "specs": specs, "seed": SEED},
           "notes": ["perplexity: lossless kinds in 256-token chunks, lossy kinds token by token "
                     "(kvjax.perplexity default), batch 1",
                     "passkey: exact match of the first 5-digit number in 8 greedy tokens; "
                     "depth = fraction of the filler before the needle",
                     "x axis: bytes of the cache arrays after the run (capacity, not just used slots)",
                     f"share:G:cal: maps fitted by kvjax.fit_share_maps on the {CALIBRATION_TOKENS} "
                     "tokens after the perplexity tokens; their bytes are in maps_bytes, not on the "
                     "x axis"],
           "passkey_trials": [{"key": k, "depth": d} for k, d in trials],
           **outcomes.summary(), "rows": rows}
common.write_json(out / "quality.json", payload)
common.write_csv(out / "quality.csv", [{k: v for k, v in r.items() if k != "passkey_answers"} for r in rows])

plt = common.pyplot()
if plt is not None and rows:
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
  families = list(dict.fromkeys(r["family"] for r in rows))
  for i, fam in enumerate(families):
    mine = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["ppl_cache_bytes"])
    style = dict(color=f"C{i % 10}", marker="os^vDP*X"[i % 8], label=fam)
    ax1.plot([r["ppl_cache_bytes"] for r in mine], [r["ppl"] for r in mine], **style)
    pk = [r for r in mine if r.get("passkey_accuracy") is not None]
    ax2.plot([r["passkey_cache_bytes_per_row"] for r in pk], [r["passkey_accuracy"] for r in pk], **style)
    for r in mine:
      ax1.annotate(r["spec"], (r["ppl_cache_bytes"], r["ppl"]), fontsize=6, xytext=(3, 3),
                   textcoords="offset points")
  ax1.set(xscale="log", yscale="log", xlabel="cache bytes (arrays, batch 1)",
          ylabel=f"perplexity ({len(ids)} tokens)", title="perplexity vs memory (lower is better)")
  ax2.set(xscale="log", xlabel="cache bytes per row", ylabel="passkey exact match",
          ylim=(-0.05, 1.05), title=f"passkey retrieval, ~{passkey_tokens}-token context")
  common.bytes_axis(ax1.xaxis)
  common.bytes_axis(ax2.xaxis)
  common.plain_log_axis(ax1.yaxis)
  ax1.legend(fontsize=7)
  ax2.legend(fontsize=7)
  fig.suptitle(f"{model_name}: quality vs cache memory")
  fig.tight_layout()
  fig.savefig(out / "quality.png", dpi=120)
  print(f"wrote {out / 'quality.png'}")
