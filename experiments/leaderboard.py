"""RULER-style leaderboard of KV-cache presses, query-agnostic and query-aware, as kvpress reports it.

For each press (`kvjax.presses.press_names()` by default; a wrapper gets a default inner press,
e.g. "adakv(snapkv)") at each compression ratio (share of the prompt dropped, kvpress's
`compression_ratio`), on RULER-style samples (`kvjax.evals.ruler`: niah single / multikey /
multivalue / multiquery, vt, cwe, fwe) at each context length, two settings:

  query_agnostic  the context alone is compressed (`kvjax.compress`), then the question is asked
                  of the compressed cache (`kvjax.generate(..., cache=cache)`). Several questions
                  are asked of one compressed context (KVzip's point): besides the sample's own
                  question, each needle key of the niah_multikey / niah_multiquery contexts is
                  asked on its own (`cache.reorder` replicates the row), scored as "each_key".
  query_aware     context + question are compressed together; the first answer token is the
                  argmax of the uncompressed prefill's last logits (`details=True`), the rest is
                  generated from the compressed cache.

The full cache (ratio 0, every token kept) is the ceiling; it is the same for both settings and is
run once (through `compress` at ratio 0, so it takes the same path as the presses). Scores are
RULER's string match (`ruler.score`), per task the mean over samples; "average" is the mean over
tasks (each_key is reported beside it, not in it). Greedy decoding, the task's max_new_tokens
(capped by --max-new-tokens), stopping at EOS.

Cost: the model runs once per batch of samples and setting (`kvjax.presses.prefill`: every
layer's queries, keys and values kept), and every (press, ratio) compresses that prefill
(`kvjax.compress(model, prefilled, ...)`, which only scores, selects and writes). A press whose
scores ignore the budget (`Press.budget_free`: all but a few) scores once per setting: its first
ratio keeps the scores and the later ones pass them back (`compress(..., scores=)`), so they only
select and write. kvzip repeats contexts over 2048 tokens chunk by chunk after the plain
prefill (as kvpress does), scored like any budget-free press; on shorter rows (--quick) it scores
an extension of the prompt, once per setting (`kvjax.presses.score_prompt`, with --prefill-dir
kept on disk) and compresses the plain prefill like every other press; its query-aware first
token is the plain prefill's, as for every press.
`--resume` keeps the rows of an earlier run's JSON and
runs only the missing configurations (a long grid in several sittings); `--prefill-dir` keeps the
prefills too (`kvjax.presses.save_prefilled`, ~0.5 GB per 4096-token row on SmolLM2), named by a
digest of the model, its weights, kvjax's version and the rows, so a later sitting loads them
instead of running the model again.

Outputs (in --out): leaderboard.json (written after every configuration, so an interrupted run
keeps what it measured), leaderboard.svg (average score vs compression ratio, one line per press,
one panel per setting and length; hand-made SVG, no matplotlib needed). A model other than
SmolLM2 (or --quick's tiny one) writes leaderboard_<model>.json and .svg: each model's board
resumes on its own.

  python experiments/leaderboard.py                       # SmolLM2-135M at 4k, every press
  python experiments/leaderboard.py --presses snapkv knorm --ratios 0.5 --n-per-task 2
  python experiments/leaderboard.py --model gemma3-270m   # Gemma 3 270M (leaderboard_gemma3-270m.*)
  python experiments/leaderboard.py --quick               # tiny random model (numbers meaningless)
  python experiments/leaderboard.py --replot              # redraw the SVG from the JSON
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import re
import time

import numpy as np

import common

MODEL = "smollm2-135m"
LENGTHS = [4096]
RATIOS = [0.25, 0.5, 0.75, 0.875]
N_PER_TASK = 1
SEED = 0
BATCH = 8  # samples per compress call
EACH_KEY = 4  # needle keys asked one at a time per multikey / multiquery context (0: none)
# Wrappers need an inner press: the one kvpress's leaderboard pairs them with (snapkv where it
# has none); when that inner press is not registered, snapkv is used.
DEFAULT_INNER = {"adakv": "snapkv", "chunkkv": "snapkv", "criticalkv": "snapkv",
                 "block": "keydiff", "key_rerotation": "knorm"}
FALLBACK_INNER = "snapkv"
SKIP = {  # not a prompt-compression press on its own, or not comparable at a ratio
    "per_layer": "wraps a press per layer (needs one press per layer)",
    "composed": "composes several presses (needs a list of presses)",
    "decoding": "compresses during decoding, not the prompt",
    "think": "prunes key channels, not tokens (no token ratio to compare)",
    "simlayerkv": "chooses each layer's budget itself (lazy layers keep a window): no ratio",
}
QUICK = dict(model="tiny", lengths=[1024], ratios=[0.5, 0.75], presses=["knorm", "snapkv"],
             n_per_task=1, each_key=2, max_new_tokens=8,
             tasks=["niah_single", "niah_multiquery", "vt", "fwe"])
QUICK_SMOLLM2_LENGTH = 1024
NEEDLE = re.compile(r"One of the special magic (number|word|uuid)s for ([a-z]+-[a-z]+) is: "
                    r"(\S+?)\.(?=\s|$)")
SETTINGS = ("query_agnostic", "query_aware")
MAPS_ABOVE = 30000  # memory maps (of vm.max_map_count's 65530) past which compiled code is dropped
FULL = "full"

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true",
                    help="tiny model, 1024 tokens, 2 presses, 2 ratios, 4 tasks, 1 sample each")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None, help=f"default {MODEL} (--quick: tiny)")
parser.add_argument("--lengths", nargs="+", type=int, default=None,
                    help="context lengths in tokens (default 4096; 8192 is SmolLM2's limit)")
parser.add_argument("--ratios", nargs="+", type=float, default=None,
                    help=f"compression ratios (default {RATIOS})")
parser.add_argument("--presses", nargs="+", default=None,
                    help="press names or specs (default: every registered press)")
parser.add_argument("--tasks", nargs="+", default=None, help="ruler tasks (default: all)")
parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
parser.add_argument("--n-per-task", type=int, default=None, help=f"samples per task ({N_PER_TASK})")
parser.add_argument("--batch", type=int, default=BATCH, help="samples per compress call")
parser.add_argument("--each-key", type=int, default=None,
                    help=f"keys asked one at a time per multi-key context ({EACH_KEY}; 0: none)")
parser.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap on each task's max_new_tokens (default: the task's own)")
parser.add_argument("--seed", type=int, default=SEED)
parser.add_argument("--noise", action="store_true",
                    help="hide niah needles in noise sentences, not tinyshakespeare's lines")
parser.add_argument("--time-limit", type=float, default=None,
                    help="minutes: start no configuration after this; the rest is listed under "
                         "not_run in the JSON")
parser.add_argument("--defer", nargs="+", default=[], metavar="PRESS",
                    help="presses (labels) left for a later sitting: listed under not_run, like "
                         "--time-limit's")
parser.add_argument("--strict", action="store_true", help="raise on a failing press")
parser.add_argument("--resume", action="store_true",
                    help="keep the rows of the model's JSON in --out and run only the "
                         "missing configurations")
parser.add_argument("--prefill-dir", default=None,
                    help="keep each prefill here and load it in later sittings (several GB)")
parser.add_argument("--replot", action="store_true",
                    help="only redraw the model's SVG from its JSON in --out")
args = parser.parse_args()


# ---- the plot ----------------------------------------------------------------------------------
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
          "#e6550d", "#31a354", "#756bb1", "#636363", "#9c9ede", "#cedb9c", "#e7ba52", "#e7969c"]


def svg_plot(payload: dict, path) -> None:
  """leaderboard.svg: average score vs compression ratio, a panel per (length, setting), a line
  per press starting at the full cache's score (ratio 0), the full cache dashed."""
  averages = payload["averages"]
  panels = [(length, s) for length in averages for s in SETTINGS if s in averages[length]]
  presses = list(dict.fromkeys(p for length in averages for s in averages[length]
                               for p in averages[length][s] if p != FULL))
  if not panels:
    return
  values = [v for length in averages for s in averages[length]
            for p in averages[length][s].values() for v in p.values()]
  top = max(0.1, float(np.ceil(max(values + [0.0]) * 10 + 0.5) / 10))
  top = min(top, 1.0) if max(values + [0.0]) <= 1.0 else top
  pw, ph, left, right, upper, lower = 330, 240, 55, 15, 35, 45
  legend_w = 190
  width = len(panels) * (pw + left + right) + legend_w
  height = max(ph + upper + lower, 30 + 16 * (len(presses) + 1))
  x_max = 1.0
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
  color = {p: COLORS[i % len(COLORS)] for i, p in enumerate(presses)}
  for i, (length, setting) in enumerate(panels):
    x0 = i * (pw + left + right) + left
    sx = lambda r: x0 + pw * r / x_max  # noqa: E731
    sy = lambda v: upper + ph * (1 - v / top)  # noqa: E731
    parts.append(f'<text x="{x0 + pw / 2}" y="20" text-anchor="middle" font-size="13">'
                 f'{setting.replace("_", "-")}, {length} tokens</text>')
    parts.append(f'<rect x="{x0}" y="{upper}" width="{pw}" height="{ph}" fill="none" '
                 f'stroke="#444"/>')
    for k in range(6):
      v = top * k / 5
      parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" '
                   f'stroke="#ddd"/><text x="{x0 - 5}" y="{sy(v) + 4:.1f}" '
                   f'text-anchor="end">{v:.2f}</text>')
    for r in (0.0, 0.25, 0.5, 0.75, 0.875):
      parts.append(f'<line x1="{sx(r):.1f}" x2="{sx(r):.1f}" y1="{upper}" y2="{upper + ph}" '
                   f'stroke="#eee"/><text x="{sx(r):.1f}" y="{upper + ph + 15}" '
                   f'text-anchor="middle">{r:g}</text>')
    parts.append(f'<text x="{x0 + pw / 2}" y="{upper + ph + 32}" text-anchor="middle">'
                 'compression ratio (share of the prompt dropped)</text>')
    parts.append(f'<text x="{x0 - 40}" y="{upper + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 {x0 - 40} {upper + ph / 2})">average score</text>')
    lines = averages[length][setting]
    full = lines.get(FULL, {}).get("0.0")
    if full is not None:
      parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{sy(full):.1f}" y2="{sy(full):.1f}" '
                   'stroke="black" stroke-dasharray="5,4"/>')
    for press in presses:
      points = sorted((float(r), v) for r, v in lines.get(press, {}).items())
      if full is not None:
        points = [(0.0, full)] + points
      if not points:
        continue
      xy = " ".join(f"{sx(r):.1f},{sy(v):.1f}" for r, v in points)
      parts.append(f'<polyline points="{xy}" fill="none" stroke="{color[press]}" '
                   'stroke-width="1.8"/>')
      parts += [f'<circle cx="{sx(r):.1f}" cy="{sy(v):.1f}" r="2.8" fill="{color[press]}"/>'
                for r, v in points]
  lx = len(panels) * (pw + left + right) + 5
  parts.append(f'<text x="{lx}" y="{upper - 8}" font-size="12">{payload["settings"]["model"]}'
               '</text>')
  entries = [(FULL + " cache", "black", True)] + [(color_key, color[color_key], False)
                                                 for color_key in presses]
  for j, (label, c, dashed) in enumerate(entries):
    y = upper + 8 + 16 * j
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{y}" y2="{y}" stroke="{c}" '
                 f'stroke-width="1.8"{dash}/><text x="{lx + 28}" y="{y + 4}">{_xml(label)}</text>')
  parts.append("</svg>")
  path.write_text("\n".join(parts) + "\n")
  print(f"wrote {path}")


def _xml(text: str) -> str:
  return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def stem(model_name: str) -> str:
  """The output files' name: leaderboard for SmolLM2 (and --quick's tiny model),
  leaderboard_<model> for any other model."""
  return "leaderboard" if model_name in (MODEL, QUICK["model"]) else f"leaderboard_{model_name}"


if args.replot:
  out = common.out_dir(args.out)
  name = stem(args.model or MODEL)
  svg_plot(json.loads((out / f"{name}.json").read_text()), out / f"{name}.svg")
  raise SystemExit(0)


import jax  # noqa: E402
import kvjax  # noqa: E402
from kvjax.evals import ruler  # noqa: E402
from kvjax.presses import make_press, press_names, wraps_presses  # noqa: E402


# ---- which presses, with which specs -----------------------------------------------------------
def press_specs(requested, notes: dict) -> dict:
  """{label: spec} for the presses to run; `notes` gets {name: why} for those left out."""
  names = requested or press_names()
  known = set(press_names())
  specs = {}
  for name in names:
    if "(" in name:  # a full spec given by the user
      specs[name] = name
      continue
    if name in SKIP and not requested:
      notes[name] = SKIP[name]
      continue
    if name not in known:
      notes[name] = "not registered in this build"
      continue
    if wraps_presses(name):
      inner = DEFAULT_INNER.get(name, FALLBACK_INNER)
      inner = inner if inner in known else FALLBACK_INNER
      specs[f"{name}({inner})"] = f"{name}({inner})"
    else:
      specs[name] = name
  for label, spec in list(specs.items()):
    try:
      make_press(spec)
    except Exception as e:  # noqa: BLE001  (recorded: the run goes on without it)
      notes[label] = f"cannot build {spec!r}: {type(e).__name__}: {e}"
      del specs[label]
  return specs


# ---- samples and questions ---------------------------------------------------------------------
@dataclasses.dataclass
class Question:
  """One question asked of one sample's compressed context: the sample index in its batch, the
  ids to feed after the context, what is scored, and under which task label."""

  sample: int
  task: str
  ids: list
  answers_of: ruler.Sample  # the sample carrying answers / metric / max_new_tokens


def each_key_questions(sample: ruler.Sample, tokenizer, limit: int) -> list[ruler.Sample]:
  """A multi-key niah context asked about each of its first `limit` keys, one key at a time."""
  if limit <= 0 or sample.task not in ("niah_multikey", "niah_multiquery"):
    return []
  values: dict[str, list[str]] = {}
  kind = None
  for m in NEEDLE.finditer(sample.context):
    kind = m.group(1)
    values.setdefault(m.group(2), []).append(m.group(3))
  if len(values) < 2:
    return []
  out = []
  for key in list(values)[:limit]:
    question = ruler.NIAH_QUESTION.format(kind=kind, keys=key)
    out.append(dataclasses.replace(sample, task="each_key", question=question,
                                   question_ids=tuple(tokenizer.encode(question)),
                                   answers=tuple(values[key])))
  return out


def make_samples(tokenizer, length: int, tasks, n_per_task: int, seed: int, haystack_text,
                 notes: dict) -> list[ruler.Sample]:
  """ruler.suite task by task; a task that does not fit the length is left out with a note."""
  samples = []
  for task in tasks:
    try:
      samples += ruler.suite(tokenizer, length, n_per_task, seed, tasks=[task],
                             haystack_text=haystack_text)
    except ValueError as e:
      notes[f"{task}@{length}"] = str(e)
  return samples


def max_new(sample: ruler.Sample) -> int:
  cap = args.max_new_tokens
  return sample.max_new_tokens if cap is None else min(cap, sample.max_new_tokens)


# ---- one configuration -------------------------------------------------------------------------
def answer_texts(tokens_rows, questions) -> list[str]:
  """Each question's generated text, cut at its task's max_new_tokens."""
  return [tok.decode([int(t) for t in row[:max_new(q.answers_of)]])
          for row, q in zip(tokens_rows, questions)]


def batches(samples):
  return [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]


def prompt_rows(batch, setting: str) -> list[list[int]]:
  """What is compressed: the contexts (query_agnostic) or context + question (query_aware)."""
  return [list(s.ids) + (list(s.question_ids) if setting == "query_aware" else []) for s in batch]


def prefills(samples, setting: str) -> list:
  """One `kvjax.presses.prefill` per batch of samples, run once and compressed by every press and
  ratio."""
  return [(batch, kept_prefill(prompt_rows(batch, setting))) for batch in batches(samples)]


def kept_folder(*key) -> pathlib.Path | None:
  """--prefill-dir's folder for `key` and this model, weights and kvjax (None without one)."""
  if args.prefill_dir is None:
    return None
  key = json.dumps([model_name, weights_digest(), kvjax.__version__, *key])
  return pathlib.Path(args.prefill_dir) / hashlib.sha256(key.encode()).hexdigest()[:20]


def kept_prefill(rows):
  """`kvjax.presses.prefill` of the rows, or with --prefill-dir the one an earlier sitting saved
  for the same model, weights, kvjax and rows (saved here when there is none)."""
  folder = kept_folder(None, rows)
  if folder is not None and (folder / "prefilled.pkl").is_file():
    return kvjax.presses.load_prefilled(folder)
  prefilled = kvjax.presses.prefill(model, rows)
  if folder is not None:
    kvjax.presses.save_prefilled(prefilled, folder)
  return prefilled


def extension_scores(rows, spec: str) -> np.ndarray:
  """float32 [L, B, K, T]: the scores of a press that extends the rows (kvzip), from one run of
  the extension (`score_prompt`), or with --prefill-dir the ones an earlier sitting kept."""
  folder = kept_folder("scores", spec, rows)
  if folder is not None and (folder / "scores.npy").is_file():
    return np.load(folder / "scores.npy")
  t0 = time.perf_counter()
  scores = np.asarray(kvjax.presses.score_prompt(model, rows, spec, ratio=0.5).scores)
  print(f"  {spec} scored its extension of {len(rows)} rows ({time.perf_counter() - t0:.0f} s)",
        flush=True)
  if folder is not None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "scores.npy", scores)
  return scores


# Scores of the presses with `budget_free` scores, per (press, setting, batch), kept over the
# ratios of one length: the first ratio scores, the later ones only select and write.
scored: dict = {}


def compress_batch(pre, i: int, label: str, spec: str, ratio: float, setting: str):
  """(cache, Compressed) of batch i's prefill `pre`, scoring only where no scores are kept (an
  extending press's were kept before the prefills were loaded: `extension_scores`)."""
  key = (label, setting, i)
  free = make_press(spec).budget_free
  cache, info = kvjax.compress(model, pre, spec, ratio=ratio, details=True,
                               scores=scored.get(key) if free else None)
  if free and key not in scored:
    scored[key] = info.scores
  return cache, info


@functools.cache
def weights_digest() -> str:
  """A digest of the model's weights: every array's shape and dtype and a strided sample of
  its values (enough to tell checkpoints apart; cheap on 135M parameters)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(model.params):
    a = np.asarray(leaf).reshape(-1)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a[::max(1, a.size // 4096)]).tobytes())
  return h.hexdigest()


def run_agnostic(prefilled, label: str, spec: str, ratio: float) -> list[tuple[Question, str]]:
  """Compress each batch's contexts, then ask every question of the compressed cache."""
  done = []
  for i, (batch, pre) in enumerate(prefilled):
    cache, _ = compress_batch(pre, i, label, spec, ratio, "query_agnostic")
    questions = []
    for i, s in enumerate(batch):
      questions.append(Question(i, s.task, list(s.question_ids), s))
      questions += [Question(i, "each_key", list(q.question_ids), q)
                    for q in each_key_questions(s, tok, each_key)]
    rows = cache.reorder(np.array([q.sample for q in questions], np.int32))
    del cache
    g = kvjax.generate(model, [q.ids for q in questions], cache=rows,
                       max_new_tokens=max(max_new(q.answers_of) for q in questions))
    done += list(zip(questions, answer_texts(g.rows(), questions)))
  return done


def run_aware(prefilled, label: str, spec: str, ratio: float) -> list[tuple[Question, str]]:
  """Compress context + question together; first token from the prefill's logits, then generate."""
  done = []
  eos = getattr(tok, "eos_id", None)
  for i, (batch, pre) in enumerate(prefilled):
    cache, info = compress_batch(pre, i, label, spec, ratio, "query_aware")
    first = np.asarray(np.argmax(np.asarray(info.logits), axis=-1), np.int64)
    questions = [Question(i, s.task, [int(first[i])], s) for i, s in enumerate(batch)]
    longest = max(max_new(s) for s in batch)
    rest = [[] for _ in batch]
    if longest > 1:
      g = kvjax.generate(model, [q.ids for q in questions], cache=cache, max_new_tokens=longest - 1)
      rest = g.rows()
    texts = []
    for q, r in zip(questions, rest):
      ids = [] if eos is not None and q.ids[0] == eos else q.ids + [int(t) for t in r]
      texts.append(tok.decode(ids[:max_new(q.answers_of)]))
    done += list(zip(questions, texts))
  return done


def summarize(answered) -> dict:
  """Per-task mean scores, counts, the average over the RULER tasks and each_key."""
  by_task: dict[str, list[float]] = {}
  for q, text in answered:
    by_task.setdefault(q.task, []).append(ruler.score(q.answers_of, text))
  scores = {t: float(np.mean(v)) for t, v in by_task.items()}
  main = [v for t, v in scores.items() if t != "each_key"]
  return dict(scores={t: v for t, v in scores.items() if t != "each_key"},
              n={t: len(v) for t, v in by_task.items()},
              average=float(np.mean(main)) if main else None,
              each_key=scores.get("each_key"),
              answers=[dict(task=q.task, text=text[:160], answers=list(q.answers_of.answers),
                            score=ruler.score(q.answers_of, text)) for q, text in answered])


# ---- the run -----------------------------------------------------------------------------------
quick = args.quick
model_name = args.model or (QUICK["model"] if quick else MODEL)
if args.lengths:
  lengths = args.lengths
elif quick:
  lengths = QUICK["lengths"] if model_name == QUICK["model"] else [QUICK_SMOLLM2_LENGTH]
else:
  lengths = LENGTHS
ratios = args.ratios or (QUICK["ratios"] if quick else RATIOS)
n_per_task = args.n_per_task or (QUICK["n_per_task"] if quick else N_PER_TASK)
each_key = args.each_key if args.each_key is not None else (QUICK["each_key"] if quick
                                                            else EACH_KEY)
if quick and args.max_new_tokens is None:
  args.max_new_tokens = QUICK["max_new_tokens"]
tasks = args.tasks or (QUICK["tasks"] if quick else list(ruler.TASKS))
out = common.out_dir(args.out)
json_path, svg_path = (out / f"{stem(model_name)}{ext}" for ext in (".json", ".svg"))
info = common.run_info(args)
press_notes: dict[str, str] = {}
specs = press_specs(args.presses or (QUICK["presses"] if quick else None), press_notes)
for name, why in press_notes.items():
  print(f"  skip press {name}: {why}", flush=True)
model = common.load_model(model_name)
tok = model.tokenizer
haystack, haystack_source = (None, "noise") if args.noise else common.load_text(None, quick)
sample_notes: dict[str, str] = {}
samples = {length: make_samples(tok, length, tasks, n_per_task, args.seed, haystack, sample_notes)
           for length in lengths}
for what, why in sample_notes.items():
  print(f"  skip task {what}: {why}", flush=True)
# finch scores the tokens against a question of window_size tokens at the end of each row: the
# shortest question, so that in the query-aware setting the window holds question tokens only
# (query-agnostic: the context's last tokens, as snapkv's window).
shortest = min((len(s.question_ids) for ss in samples.values() for s in ss), default=0)
specs = {label: f"finch(window_size={shortest})" if spec == "finch" and shortest else spec
         for label, spec in specs.items()}
if set(args.defer) - set(specs):
  parser.error(f"--defer: {sorted(set(args.defer) - set(specs))} are not among this run's presses "
               f"({', '.join(specs)})")

def extends(spec: str, rows) -> bool:
  """True for a press that scores an extension of these rows (kvzip up to its chunk size):
  `extension_scores`. kvzip repeats longer rows chunk by chunk after their plain prefill, which
  `compress` does from the prefill like any press's scoring."""
  return make_press(spec).extend(rows, tok)[0] != rows


# One prefill per (length, setting) serves every (press, ratio). Both settings' prefills are held
# together and the configurations go ratio by ratio (in the order given), press by press, setting
# by setting: an interrupted run holds every press at the first ratios.
plan = []  # (length, [(label, spec, ratio, setting), ...])
ceiling_setting = "query_agnostic" if "query_agnostic" in args.settings else args.settings[0]
for length in lengths:
  todo = [(FULL, "knorm", 0.0, ceiling_setting)]  # the full cache (ratio 0), once
  todo += [(label, spec, ratio, setting) for ratio in ratios for label, spec in specs.items()
           for setting in args.settings]
  plan.append((length, todo))
configs = [(length, label, spec, ratio, setting) for length, todo in plan
           for label, spec, ratio, setting in todo]

outcomes = common.Outcomes(strict=args.strict)
results = []
not_run = []  # configurations past --time-limit
started = time.perf_counter()


def averages_of(results) -> dict:
  """{length: {setting: {press: {ratio: average}}}} (the full cache under both settings)."""
  table: dict = {}
  for r in results:
    if r["average"] is None:
      continue
    settings = args.settings if r["setting"] == "both" else [r["setting"]]
    for s in settings:
      table.setdefault(str(r["length"]), {}).setdefault(s, {}).setdefault(r["press"], {})[
          str(r["ratio"])] = r["average"]
  return table


def describe_pressed_layers() -> str:
  """Which layers a press compresses: all, or a hybrid model's global ones (its sliding layers
  keep their own window whatever the ratio)."""
  from kvjax.models.config import layer_windows

  windows = layer_windows(model.config)
  sliding = [w for w in windows if w is not None]
  if not sliding:
    return f"all {len(windows)}"
  return (f"the {len(windows) - len(sliding)} global layers of {len(windows)}; the "
          f"{len(sliding)} sliding layers keep their {max(sliding)}-token window at any ratio")


PRESSED_LAYERS = describe_pressed_layers()


def payload() -> dict:
  return {"experiment": "leaderboard", "quick": quick, **info, "figure": svg_path.name,
          "settings": {"model": model_name, "lengths": lengths, "ratios": ratios, "tasks": tasks,
                       "n_per_task": n_per_task, "seed": args.seed, "batch": args.batch,
                       "each_key": each_key, "max_new_tokens_cap": args.max_new_tokens,
                       "haystack": haystack_source, "settings": args.settings,
                       "presses": specs, "presses_left_out": press_notes,
                       "tasks_left_out": sample_notes, "full_cache": "compress(..., 'knorm', "
                       "ratio=0): every token kept, asked like query_agnostic",
                       "room": 256, "pressed_layers": PRESSED_LAYERS},
          "notes": ["score: RULER string match (fraction of the answers found in the greedy "
                    "answer), per task the mean over samples; average: mean over tasks",
                    "query_agnostic: context compressed alone, then asked; each_key: every key "
                    "of a multikey/multiquery context asked on its own of one compressed cache",
                    "query_aware: context + question compressed together, first token from the "
                    "uncompressed prefill's logits",
                    "full cache (ratio 0) run once: its numbers are the ceiling of both settings",
                    "small model: absolute scores are low; compare presses to the full cache"],
          "samples": {str(length): [dict(task=s.task, context_tokens=len(s.ids),
                                         question_tokens=len(s.question_ids),
                                         answers=list(s.answers), max_new_tokens=max_new(s))
                                    for s in ss] for length, ss in samples.items()},
          **outcomes.summary(), "not_run": not_run,
          "wall_s": round(time.perf_counter() - started, 1),
          "averages": averages_of(results), "results": results}


done_keys = set()
if args.resume and json_path.is_file():  # merge: keep what an earlier run measured
  earlier = json.loads(json_path.read_text())
  if earlier.get("settings", {}).get("model") == model_name:
    results += earlier["results"]
    done_keys = {(r["length"], r["setting"], r["press"], r["ratio"]) for r in results}
    print(f"  resume: {len(results)} rows kept from {json_path}", flush=True)

bar = common.progress_bar(len(configs), desc="leaderboard")
for length, todo in plan:
  todo = [(label, spec, ratio, setting) for label, spec, ratio, setting in todo
          if (length, "both" if label == FULL else setting, label, ratio) not in done_keys
          and outcomes.ok(f"{label}/{setting}")]
  deferred = [c for c in todo if c[0] in args.defer]
  not_run += [f"{label}@{ratio}/{setting}/{length}" for label, _, ratio, setting in deferred]
  todo = [c for c in todo if c[0] not in args.defer]
  bar.update(len(deferred))
  if not samples[length] or not todo:
    bar.update(len(todo))
    continue
  if args.time_limit is not None and time.perf_counter() - started > 60 * args.time_limit:
    not_run += [f"{label}@{ratio}/{setting}/{length}" for label, _, ratio, setting in todo]
    continue
  # A press that extends the prompt (kvzip) scores its extension before the plain prefills are
  # held (at 8192 tokens the two of them take ~13 GB): its later ratios reuse the scores.
  for label, spec, setting in dict.fromkeys((c[0], c[1], c[3]) for c in todo):
    for i, batch in enumerate(batches(samples[length])):
      rows = prompt_rows(batch, setting)
      if extends(spec, rows):
        with outcomes.guard(f"{label}/{setting}"):
          scored[(label, setting, i)] = extension_scores(rows, spec)
  prefilled = {}
  for setting in dict.fromkeys(setting for *_, setting in todo):
    t0 = time.perf_counter()
    with outcomes.guard(f"prefill/{setting}"):
      prefilled[setting] = prefills(samples[length], setting)
      print(f"  prefill {setting} ({time.perf_counter() - t0:.0f} s)", flush=True)
  last_ratio = None
  for label, spec, ratio, setting in todo:
    bar.update(1)
    key = f"{label}@{ratio}/{setting}/{length}"
    if setting not in prefilled or (
        args.time_limit is not None and time.perf_counter() - started > 60 * args.time_limit):
      not_run.append(key)
      continue
    if ratio != last_ratio:  # each ratio's cache sizes compile their own programs: bound memory
      kvjax.clear_caches()
      last_ratio = ratio
    with outcomes.guard(f"{label}/{setting}"):
      t0 = time.perf_counter()
      both = label == FULL
      run = run_aware if setting == "query_aware" else run_agnostic
      answered = run(prefilled[setting], label, spec, ratio)
      row = dict(length=length, press=label, spec=spec, ratio=ratio,
                 setting="both" if both else setting,
                 **summarize(answered), wall_s=round(time.perf_counter() - t0, 1))
      results.append(row)
      each = "" if row["each_key"] is None else f", each_key {row['each_key']:.2f}"
      print(f"  {key:40s} average {row['average']:.3f}{each}  ({row['wall_s']:.0f} s)",
            flush=True)
      common.write_json(json_path, payload())
    # Each press compiles its own replay (and a cache layout its own decode): at 4096 tokens the
    # executables of one ratio's presses ran out of the process's memory maps (LLVM: "Cannot
    # allocate memory" with RAM free), so they are dropped whenever the maps pile up.
    kvjax.clear_caches(maps_above=MAPS_ABOVE)
  del prefilled
  scored.clear()
  kvjax.clear_caches()
bar.close()

final = payload()
common.write_json(json_path, final)
svg_plot(final, svg_path)
print(f"done in {final['wall_s']:.0f} s")
