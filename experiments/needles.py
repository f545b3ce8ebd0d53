"""Needles in long prompts: which compressed caches keep what the question needs.

Single passkey: a random 5-digit key hidden at several depths of filler text, contexts of
`--lengths` tokens, asked for at the end. Multi-key: two or three keys, each with its own name,
only one of them asked for. Greedy `kvjax.generate` continues the question; the score is exact
match of the first 5-digit number in its answer.

Each compressing kind (`--kinds`; default sink+window, h2o, snapkv, snapkv+adakv,
snapkv+pyramid) runs at budgets of `--fractions` of each context (5%, 10%, 25%): its spec is built
from the budget, e.g. `snapkv:{b - 64}+window:64`. The full cache is the reference. `--append`
adds rows to an existing needles.json (e.g. a 4k context measured with fewer kinds).
Perplexity: the first `--ppl-tokens` tokens of tinyshakespeare fed one token per step (decode
semantics: every token sees what the cache holds), budgets as fractions of `--ppl-tokens`.
Bytes: the cache arrays after the run, per row.

Outputs (in --out): needles.json, needles.csv, needles.png (bytes on x, retrieval on y).

  python experiments/needles.py             # SmolLM2-135M, contexts 1k/2k/4k, every default kind
  python experiments/needles.py --lengths 1024 2048 && \
    python experiments/needles.py --lengths 4096 --append --no-ppl   # the same in two sittings
  python experiments/needles.py --quick     # tiny random model (numbers meaningless)
"""

import argparse
import json
import re

import numpy as np

import common

MODEL = "smollm2-135m"
LENGTHS = [1024, 2048, 4096]
FRACTIONS = [0.05, 0.10, 0.25]
DEPTHS = [0.1, 0.5, 0.9]
MULTI_KEYS = [2, 3]
PPL_TOKENS = 512
NEW_TOKENS = 8
SEED = 0
WINDOW = 64  # the recent window of the scored kinds (h2o, snapkv)
TEMPLATES = {  # budget b -> spec
    "sink+window": "sink:4+window:{b4}",
    "h2o": "h2o:{heavy}+window:{w}",
    "snapkv": "snapkv:{heavy}+window:{w}",
    "snapkv+int8": "int8+snapkv:{heavy}+window:{w}",
    "snapkv+pyramid": "snapkv:{heavy}+window:{w}+pyramid",
    "snapkv+adakv": "snapkv:{heavy}+window:{w}+adakv",
}
DEFAULT_KINDS = ["sink+window", "h2o", "snapkv", "snapkv+adakv", "snapkv+pyramid"]
QUICK = dict(model="tiny", lengths=[96], fractions=[0.25], depths=[0.5], multi=[2], ppl=48)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n")
NEEDLE = "The {name} pass key is {key}. Remember it. {key} is the {name} pass key. "
QUESTION = "\nWhat is the {name} pass key? The {name} pass key is"
NAMES = ["red", "blue", "green"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, short contexts (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--lengths", nargs="+", type=int, default=None)
parser.add_argument("--fractions", nargs="+", type=float, default=None)
parser.add_argument("--kinds", nargs="+", default=None, choices=list(TEMPLATES))
parser.add_argument("--ppl-tokens", type=int, default=None)
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
parser.add_argument("--append", action="store_true",
                    help="keep the rows of an existing needles.json in --out (a row measured again "
                         "replaces its old one), e.g. to add a longer context with fewer kinds")
parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity part")
parser.add_argument("--replot", action="store_true",
                    help="only redraw needles.png from the needles.json in --out (runs nothing)")
args = parser.parse_args()


def plot(rows: list[dict], model_name: str, out) -> None:
  """needles.png: cache bytes per row on x (log), retrieval on y; one line per kind and length."""
  plt = common.pyplot()
  if plt is None or not rows:
    return
  fig, ax = plt.subplots(figsize=(9.5, 4.8))
  lengths = sorted({r["length"] for r in rows})
  for i, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
    for j, length in enumerate(lengths):
      mine = sorted((r for r in rows if r["kind"] == kind and r["length"] == length),
                    key=lambda r: r["bytes_per_row"])
      ax.plot([r["bytes_per_row"] for r in mine], [r["retrieval"] for r in mine],
              color=f"C{i}", marker="os^"[j % 3], label=f"{kind}, {length} tokens")
  ax.set(xscale="log", xlabel="cache bytes per row", ylabel="retrieval (exact match)",
         ylim=(-0.05, 1.05), title=f"{model_name}: needles vs cache memory")
  common.bytes_axis(ax.xaxis)
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(out / "needles.png", dpi=120)
  print(f"wrote {out / 'needles.png'}")


if args.replot:
  out = common.out_dir(args.out)
  saved = json.loads((out / "needles.json").read_text())
  plot(saved["rows"], saved["settings"]["model"], out)
  raise SystemExit(0)


import kvjax  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK["model"] if quick else MODEL)
lengths = args.lengths or (QUICK["lengths"] if quick else LENGTHS)
fractions = args.fractions or (QUICK["fractions"] if quick else FRACTIONS)
depths = QUICK["depths"] if quick else DEPTHS
multi = QUICK["multi"] if quick else MULTI_KEYS
ppl_tokens = args.ppl_tokens or (QUICK["ppl"] if quick else PPL_TOKENS)
kinds = args.kinds or DEFAULT_KINDS
out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
tok = model.tokenizer
text, text_source = common.load_text(None, quick)
ppl_ids = np.asarray(tok.encode(text)[:ppl_tokens], np.int32)
rng = np.random.default_rng(SEED)


def prompt(needles: list[tuple[str, int, float]], asked: str, target: int) -> str:
  """Filler of about `target` tokens with each (name, key, depth) needle at its depth."""
  fixed = len(tok.encode(INTRO + "".join(NEEDLE.format(name=n, key=k) for n, k, _ in needles)
                         + QUESTION.format(name=asked)))
  n_fill = max(1, (target - fixed) // len(tok.encode(FILLER)))
  cuts = sorted((round(d * n_fill), NEEDLE.format(name=n, key=k)) for n, k, d in needles)
  body, at = "", 0
  for cut, needle in cuts:
    body += FILLER * (cut - at) + needle
    at = cut
  return INTRO + body + FILLER * (n_fill - at) + QUESTION.format(name=asked)


def trials_for(length: int) -> list[dict]:
  """Single-key trials at every depth, then multi-key trials (keys spread, one asked)."""
  trials = []
  for d in depths:
    key = int(rng.integers(10000, 100000))
    trials.append(dict(task="single", depth=d, key=key, prompt=prompt([("red", key, d)], "red", length)))
  for m in multi:
    keys = [int(k) for k in rng.integers(10000, 100000, m)]
    spread = np.linspace(0.15, 0.85, m)
    asked = int(rng.integers(m))
    needles = [(NAMES[i], keys[i], float(spread[i])) for i in range(m)]
    trials.append(dict(task=f"multi{m}", depth=float(spread[asked]), key=keys[asked],
                       prompt=prompt(needles, NAMES[asked], length)))
  return trials


def spec_for(kind: str, budget: int) -> str:
  w = min(WINDOW, budget // 2)
  return TEMPLATES[kind].format(b4=budget - 4, heavy=budget - w, w=w)


def score(answers: list[str], trials: list[dict]) -> list[bool]:
  found = [re.search(r"\d{5}", a.replace(" ", "")) for a in answers]
  return [bool(f) and f.group(0) == str(t["key"]) for f, t in zip(found, trials)]


outcomes = common.Outcomes(strict=args.strict)
rows = []
for length in lengths:
  trials = trials_for(length)
  prompts = [t["prompt"] for t in trials]
  n_tokens = [len(tok.encode(p)) for p in prompts]
  configs = [("full", "full", None)]
  for fraction in fractions:
    budget = max(8, int(round(fraction * length)))
    configs += [(kind, spec_for(kind, budget), fraction) for kind in kinds]
  for kind, spec, fraction in common.progress(configs, desc=f"{length} tokens"):
    with outcomes.guard(spec):
      g = kvjax.generate(model, prompts, max_new_tokens=NEW_TOKENS, cache=spec, stop_at_eos=False)
      answers = [tok.decode(t) for t in g.tokens]
      hits = score(answers, trials)
      row = dict(length=length, kind=kind, spec=spec, fraction=fraction,
                 budget=kvjax.parse_spec(spec).budget, prompt_tokens=n_tokens,
                 retrieval=float(np.mean(hits)),
                 single=float(np.mean([h for h, t in zip(hits, trials) if t["task"] == "single"])),
                 multi=float(np.mean([h for h, t in zip(hits, trials) if t["task"] != "single"])),
                 hits=hits, answers=answers,
                 bytes_per_row=common.total_bytes(g.cache_bytes) / len(prompts),
                 prefill_s=g.prefill_s)
      rows.append(row)
      print(f"  {length:5d} {spec:34s} retrieval {row['retrieval']:.2f} (single {row['single']:.2f},"
            f" multi {row['multi']:.2f})  {common.fmt_bytes(row['bytes_per_row'])}/row", flush=True)
    kvjax.clear_caches()  # a 32-spec sweep ran out of memory maps without this

ppl_rows = []
for fraction in ([] if args.no_ppl else [None] + fractions):
  budget = None if fraction is None else max(8, int(round(fraction * ppl_tokens)))
  for kind in (["full"] if fraction is None else kinds):
    spec = "full" if fraction is None else spec_for(kind, budget)
    with outcomes.guard("ppl " + spec):
      p = kvjax.perplexity(model, ppl_ids, cache=spec, chunk=1 if fraction is not None else None)
      ppl_rows.append(dict(kind=kind, spec=spec, fraction=fraction, ppl=p.ppl, tokens=p.tokens,
                           bytes=common.total_bytes(p.cache_bytes)))
      print(f"  ppl {spec:34s} {p.ppl:9.3f}", flush=True)
    kvjax.clear_caches()

if args.append and (out / "needles.json").is_file():
  old = json.loads((out / "needles.json").read_text())
  mine = {(r["length"], r["spec"]) for r in rows}
  rows = [r for r in old["rows"] if (r["length"], r["spec"]) not in mine] + rows
  rows.sort(key=lambda r: (r["length"], r["fraction"] or 0))
  done = {r["spec"] for r in ppl_rows}
  ppl_rows = [r for r in old["ppl_rows"] if r["spec"] not in done] + ppl_rows
  info["earlier_runs"] = old.get("earlier_runs", []) + [{k: old[k] for k in ("date", "command")}]
  lengths = sorted({r["length"] for r in rows})

payload = {"experiment": "needles", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(model.dtype).name, "lengths": lengths,
                        "fractions": fractions, "depths": depths, "multi_keys": multi,
                        "new_tokens": NEW_TOKENS, "window": WINDOW, "templates": TEMPLATES,
                        "ppl_tokens": int(len(ppl_ids)), "text": text_source, "seed": SEED},
           "notes": ["retrieval: exact match of the first 5-digit number in 8 greedy tokens",
                     "budget = fraction x context length; scored kinds keep a recent window of "
                     f"min({WINDOW}, budget/2) and give the rest to the scorer",
                     "perplexity: token by token (decode semantics); snapkv then decodes as h2o, "
                     "its difference is in how a prompt is compressed"],
           **outcomes.summary(), "rows": rows, "ppl_rows": ppl_rows}
common.write_json(out / "needles.json", payload)
common.write_csv(out / "needles.csv", [{k: v for k, v in r.items() if k not in ("answers", "hits",
                                                                                  "prompt_tokens")}
                                       for r in rows])

plot(rows, model_name, out)
