"""Self-speculative decoding vs plain decoding as the context grows.

For each context length (`--contexts`, default 1k/4k/8k tokens of tinyshakespeare) SmolLM2 decodes
`--new-tokens` greedy tokens with the full cache alone, then with each draft spec drafting
`--draft-tokens` tokens per round (one verification pass of k + 1 tokens over the full cache).
Greedy output is the same token for token (checked and recorded); what changes is the time:
decode tok/s (compile and prefill excluded; the best of `--repeats` runs), the draft's acceptance
rate (accepted / drafted tokens) and the speed-up.

Outputs (in --out): speculative.json, speculative.csv.

  python experiments/speculative.py           # SmolLM2-135M, contexts 1024/4096/8192
  python experiments/speculative.py --quick   # tiny random model (numbers meaningless)
"""

import argparse

import numpy as np

import common

MODEL = "smollm2-135m"
CONTEXTS = [1024, 4096, 8192]
DRAFTS = ["sink:4+window:252", "int4+residual:64"]
DRAFT_TOKENS = 4
NEW_TOKENS = 64
REPEATS = 2
QUICK = dict(model="tiny", contexts=[64], drafts=["sink:4+window:28"], new=16)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true")
parser.add_argument("--out", default=str(common.DOCS))
parser.add_argument("--model", default=None)
parser.add_argument("--contexts", nargs="+", type=int, default=None)
parser.add_argument("--drafts", nargs="+", default=None)
parser.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS)
parser.add_argument("--new-tokens", type=int, default=None)
parser.add_argument("--repeats", type=int, default=REPEATS)
args = parser.parse_args()

import kvjax  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK["model"] if quick else MODEL)
contexts = args.contexts or (QUICK["contexts"] if quick else CONTEXTS)
drafts = args.drafts or (QUICK["drafts"] if quick else DRAFTS)
new_tokens = args.new_tokens or (QUICK["new"] if quick else NEW_TOKENS)
out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
text, text_source = common.load_text(None, quick)
if getattr(model, "tokenizer", None) is not None:
  all_ids = model.tokenizer.encode(text)
else:
  all_ids = np.random.default_rng(0).integers(0, model.config.vocab_size, max(contexts)).tolist()


def best_run(context: int, draft):
  best = None
  for _ in range(args.repeats):
    r = kvjax.generate(model, [all_ids[:context]], max_new_tokens=new_tokens, stop_at_eos=False,
                       draft=draft, draft_tokens=args.draft_tokens)
    if best is None or r.decode_tok_per_s > best.decode_tok_per_s:
      best = r
  return best


rows = []
for context in contexts:
  plain = best_run(context, None)
  rows.append(dict(context=context, draft=None, decode_tok_per_s=plain.decode_tok_per_s,
                   ms_per_token=1e3 / plain.decode_tok_per_s, acceptance=None, speedup=1.0,
                   same_tokens=True))
  print(f"  {context:6d} plain {plain.decode_tok_per_s:7.1f} tok/s", flush=True)
  for draft in drafts:
    r = best_run(context, draft)
    row = dict(context=context, draft=draft, draft_tokens=args.draft_tokens,
               decode_tok_per_s=r.decode_tok_per_s, ms_per_token=1e3 / r.decode_tok_per_s,
               acceptance=r.draft_acceptance, speedup=r.decode_tok_per_s / plain.decode_tok_per_s,
               same_tokens=bool(np.array_equal(r.tokens, plain.tokens)))
    rows.append(row)
    print(f"  {context:6d} {draft:24s} {r.decode_tok_per_s:7.1f} tok/s  acceptance "
          f"{r.draft_acceptance:.2f}  x{row['speedup']:.2f}  same tokens {row['same_tokens']}",
          flush=True)

payload = {"experiment": "speculative", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(model.dtype).name,
                        "contexts": contexts, "drafts": drafts, "draft_tokens": args.draft_tokens,
                        "new_tokens": new_tokens, "repeats": args.repeats, "text": text_source},
           "notes": ["greedy; decode tok/s excludes compile and prefill (the draft cache's prefill "
                     "is counted in prefill); best of the repeats",
                     "same_tokens: greedy output equal to plain decoding token for token"],
           "rows": rows}
common.write_json(out / "speculative.json", payload)
common.write_csv(out / "speculative.csv", rows)
