"""Hybrid layer layouts on Gemma 3 270M: cache bytes, perplexity and needle retrieval per layout.

Gemma 3 has 15 sliding layers (each attends to the 512 most recent positions) and 3 global ones.
Layouts compared (`LAYOUTS`; `{b}` is a quarter of the context, less the 64-token window):

  all-full         full@all        every layer holds the whole context (sliding layers masked)
  hybrid           full            kvjax's default for Gemma 3: a 512-token ring on sliding layers,
                                   the whole context on global ones (exact: equals all-full)
  hybrid+int8      int8@global     ... global layers in int8
  hybrid+int4      int4+residual:64@global
  hybrid+snapkv    snapkv:{b}+window:64@global

Perplexity: `kvjax.perplexity` on the first N tokens of tinyshakespeare for N in `--lengths`
(default 1024 4096 8192). Exact layouts feed 256-token chunks (exact for them); lossy ones feed
`--lossy-chunk` tokens per step (default 64: a chunk's tokens see each other before they are
compressed, which token-by-token decoding would not allow; 1 gives decode semantics and is slow).
Bytes: `cache.nbytes()` of the cache built for N tokens (batch 1), and the ratio to all-full.
Needles: a 5-digit pass key hidden at depths 0.1/0.5/0.9 of about `--needle-tokens` tokens of
filler (default 4096), asked for at the end; greedy `kvjax.generate`, all depths as one batch;
score = exact match of the first 5-digit number answered.

Outputs (in --out): hybrid.json and hybrid.csv.

  python experiments/hybrid.py                    # Gemma 3 270M (a long run on 2 CPU cores)
  python experiments/hybrid.py --lengths 1024     # a shorter run
  python experiments/hybrid.py --quick            # tiny-gemma3, short texts (numbers meaningless)
"""

import argparse
import re
import time

import numpy as np

import common

MODEL = "gemma3-270m"
LENGTHS = [1024, 4096, 8192]
NEEDLE_TOKENS = 4096
DEPTHS = [0.1, 0.5, 0.9]
WINDOW = 64
LAYOUTS = {
    "all-full": "full@all",
    "hybrid": "full",
    "hybrid+int8": "int8@global",
    "hybrid+int4": "int4+residual:64@global",
    "hybrid+snapkv": "snapkv:{b}+window:64@global",
}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
QUICK = dict(model="tiny-gemma3", lengths=[96], needle=96)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, short texts (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--lengths", nargs="+", type=int, default=None)
parser.add_argument("--layouts", nargs="+", default=None, choices=list(LAYOUTS))
parser.add_argument("--lossy-chunk", type=int, default=64)
parser.add_argument("--needle-tokens", type=int, default=None)
parser.add_argument("--no-needles", action="store_true")
parser.add_argument("--strict", action="store_true", help="raise on a failing layout")
args = parser.parse_args()

import kvjax  # noqa: E402  (after argparse: --help needs no JAX)
from kvjax.perplexity import default_chunk  # noqa: E402

model_name = args.model or (QUICK["model"] if args.quick else MODEL)
lengths = args.lengths or (QUICK["lengths"] if args.quick else LENGTHS)
needle_tokens = args.needle_tokens or (QUICK["needle"] if args.quick else NEEDLE_TOKENS)
layouts = {name: LAYOUTS[name] for name in (args.layouts or LAYOUTS)}
model = common.load_model(model_name)
text, text_source = common.load_text(quick=args.quick)
ids = np.asarray(model.tokenizer.encode(text[: 8 * max(lengths) + 1000]), np.int32)
if ids.size < max(lengths):
  raise SystemExit(f"the text gives only {ids.size} tokens, fewer than {max(lengths)}")
failures = common.Outcomes(strict=args.strict)


def spec_of(template: str, context: int) -> str:
  return template.format(b=max(context // 4 - WINDOW, 16))


def exact(spec: str) -> bool:
  """Whether chunked feeding is exact for this layout (perplexity's own default)."""
  return default_chunk(spec) > 1


rows = []
for n in lengths:
  for name, template in common.progress(layouts.items(), desc=f"perplexity {n}"):
    spec = spec_of(template, n)
    with failures.guard(spec):
      chunk = 256 if exact(spec) else args.lossy_chunk
      start = time.perf_counter()
      result = kvjax.perplexity(model, ids[:n], cache=spec, chunk=chunk)
      rows.append(dict(part="perplexity", layout=name, spec=spec, tokens=n, chunk=chunk,
                       ppl=float(result.ppl), cache_bytes=common.total_bytes(result.cache_bytes),
                       seconds=round(time.perf_counter() - start, 1)))
for n in lengths:
  full = next((r["cache_bytes"] for r in rows if r["tokens"] == n and r["layout"] == "all-full"), None)
  for r in rows:
    if r["tokens"] == n and full:
      r["bytes_vs_all_full"] = round(r["cache_bytes"] / full, 4)


def needle_prompt(depth: float, key: int, length: int) -> str:
  filler_ids = len(model.tokenizer.encode(FILLER))
  repeats = max(1, length // filler_ids)
  cut = int(repeats * depth)
  return FILLER * cut + NEEDLE.format(key=key) + FILLER * (repeats - cut) + QUESTION


if not args.no_needles:
  rng = np.random.RandomState(0)
  keys = [int(rng.randint(10000, 100000)) for _ in DEPTHS]
  prompts = [needle_prompt(d, k, needle_tokens) for d, k in zip(DEPTHS, keys)]
  for name, template in common.progress(layouts.items(), desc=f"needles {needle_tokens}"):
    spec = spec_of(template, needle_tokens)
    with failures.guard(spec):
      out = kvjax.generate(model, prompts, max_new_tokens=8, cache=spec)  # greedy
      answers = [model.tokenizer.decode(t) for t in out.tokens]
      found = [re.search(r"\d{5}", a) for a in answers]
      hits = [bool(f) and int(f.group()) == k for f, k in zip(found, keys)]
      rows.append(dict(part="needles", layout=name, spec=spec, tokens=needle_tokens,
                       retrieved=sum(hits), trials=len(hits), answers=answers))

out = common.out_dir(args.out)
payload = {"experiment": "hybrid", "quick": args.quick, **common.run_info(args),
           "model": model_name, "text": text_source, "rows": rows, **failures.summary()}
common.write_json(out / "hybrid.json", payload)
common.write_csv(out / "hybrid.csv", [{k: v for k, v in r.items() if k != "answers"} for r in rows])
for r in rows:
  print({k: v for k, v in r.items() if k != "answers"})
