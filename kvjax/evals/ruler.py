"""RULER-style synthetic long-context tasks: generators and the scorer.

After "RULER: What's the Real Context Size of Your Long-Context Language Models?" (Hsieh et al.,
2024), the benchmark kvpress's leaderboard runs at 4k tokens to compare KV-cache compression. The
tasks are synthetic, so every sample is generated here from a seed; nothing is downloaded or read
from disk (a text haystack is passed in as a string). Prompts and templates are kvjax's own
wording, not RULER's.

A generator is `make_<task>(tokenizer, length, rng, **options) -> Sample`. The tokenizer is
anything with `encode(str) -> list[int]` and `decode(list[int]) -> str` (a kvjax model's
`model.tokenizer`). The sample's `context` is what a cache compresses; `question` is asked after
it (query-agnostic evaluation, as in kvpress: compress the context alone, then ask). Invariants
the tests check:

  * len(ids) + len(question_ids) <= length, and within 5% of it once the haystack has room to
    grow (fitted with a few encodes: estimate the haystack size, then correct it);
  * every answer is in the context (a niah value exactly once);
  * the same seed gives the same sample, other seeds other samples.

Tasks (`TASKS`), with RULER's 4k settings as defaults:
  niah_single      one key -> one value needle; haystack "noise" (two sentences repeated) or
                   "text" (consecutive lines of `haystack_text`, from a random start); values
                   "number" (7 digits), "word" (a hyphenated word pair) or "uuid".
  niah_multikey    `n_keys` needles with distinct keys, one asked.
  niah_multivalue  one key with `n_values` needles, every value asked.
  niah_multiquery  `n_queries` needles, every key asked at once.
                   Every niah task takes haystack= and value=; the haystack defaults to noise
                   (RULER hides all but niah_single_1 in essays: `suite` with haystack_text does).
  vt               variable tracking: `n_chains` chains of `n_hops` assignments
                   (VAR B = VAR A ...) from a 5-digit value, hidden in the haystack in order;
                   asked which variables hold the first chain's value.
  cwe              common words extraction: a numbered list where `n_common` words occur
                   `freq_common` times each and the rest `freq_rare` times; asked for the
                   common ones.
  fwe              frequent words extraction: coined words with Zipf counts floor(c / r**alpha)
                   for rank r (c fitted to the length); asked for the 3 most frequent.

Scoring (`score`) is RULER's string match: each answer counts as found when it occurs in the
generated text, case-insensitively. "all" (RULER's string_match_all) scores the fraction of
answers found; "part" (string_match_part) scores 1.0 when any answer is found. RULER uses "all"
for every task here (niah, vt, cwe, fwe) and "part" only for its QA tasks, which are not included;
`Sample.metric` carries the choice.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

# ---- tokenizer and sample ----------------------------------------------------------------------


class Tokenizer(Protocol):
  """What the generators need from a tokenizer (a kvjax model's `model.tokenizer` has both)."""

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


METRICS = ("all", "part")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One task instance.

  task: the registry name. context: the long text a cache compresses (instructions, haystack and
  needles). question: asked after the context, ending with an answer prefix the model continues.
  answers: strings that must all occur in the generated text (see `score`). max_new_tokens: how
  many tokens to generate (RULER's per-task setting). ids, question_ids: `tokenizer.encode` of
  context and question; len(ids) + len(question_ids) <= the length asked for. metric: "all" or
  "part" (module docstring).
  """

  task: str
  context: str
  question: str
  answers: tuple[str, ...]
  max_new_tokens: int
  ids: tuple[int, ...]
  question_ids: tuple[int, ...]
  metric: str = "all"

  @property
  def n_tokens(self) -> int:
    """len(ids) + len(question_ids): the prompt's length in tokens."""
    return len(self.ids) + len(self.question_ids)


def score(sample: Sample, text: str) -> float:
  """RULER's string match of `text` against `sample.answers`, in [0, 1].

  "all": the fraction of answers that occur in `text` (case-insensitive substring); "part": 1.0 if
  any does, else 0.0.
  """
  found = [a.lower() in text.lower() for a in sample.answers]
  if sample.metric == "all":
    return sum(found) / len(found)
  if sample.metric == "part":
    return float(any(found))
  raise ValueError(f"unknown metric {sample.metric!r}; expected one of {METRICS}")


# ---- word material -----------------------------------------------------------------------------

ADJECTIVES = tuple("""
amber ancient brave bright calm clever cold curious dark eager early empty fancy fierce frosty
gentle giant glad golden grand green happy heavy hidden humble jolly kind large lazy little lively
mellow mighty modest noble noisy odd pale patient plain polite proud purple quick quiet rapid rare
rich rough round royal rusty sandy shiny silent silver simple sleepy slow smooth soft solid sour
spicy steady sticky strong sunny sweet swift tall tender tidy tiny vast velvet warm wild wise witty
young zesty
""".split())

NOUNS = tuple("""
acorn anchor apple autumn badge bakery balloon bamboo banjo barrel basket beacon bicycle blanket
bottle bracelet bridge bucket butter button cabin cactus camera candle canoe canyon carpet castle
cellar chair cherry chimney circus cliff clock cloud comet compass cookie copper cottage crayon
cricket crystal cushion daisy desert diamond dolphin donkey dragon drum eagle easel elbow engine
falcon feather fiddle forest fountain fox garden garlic glacier globe goose granite guitar hammer
harbor harvest helmet honey horizon island ivory jacket jungle kettle kitten ladder lantern lemon
library lighthouse lizard lobster magnet mango marble meadow mirror mitten monkey mountain muffin
museum needle noodle oasis ocean olive onion orchard otter owl paddle palace panda parrot peach
pebble pencil pepper piano pillow pirate planet pocket pony potato pumpkin puzzle quilt rabbit
radio raft rainbow raven ribbon river rocket saddle sailor salmon sandal scarf shadow shell shovel
skate sparrow spider spoon squirrel statue stove sugar sunset swan sweater table teapot temple
thimble thunder tiger tomato tower tractor trumpet tulip tunnel turtle umbrella valley violin
volcano wagon walnut walrus whistle window wizard yogurt zebra
""".split())

WORDS = ADJECTIVES + NOUNS  # no word is a substring of another (tested)

NOISE = ("The hills stay quiet and the river keeps running.", "Morning comes and goes again.")
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def coined_words(rng: np.random.Generator, count: int, syllables: int = 3,
                 avoid: Sequence[str] = ()) -> list[str]:
  """`count` distinct made-up words of `syllables` consonant-vowel pairs (so all the same length,
  none a substring of another), none in `avoid`."""
  out, seen = [], set(avoid)
  while len(out) < count:
    word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))
    if word not in seen:
      seen.add(word)
      out.append(word)
  return out


def word_pairs(rng: np.random.Generator, count: int) -> list[str]:
  """`count` distinct "adjective-noun" keys, e.g. "quiet-harbor"."""
  total = len(ADJECTIVES) * len(NOUNS)
  if count > total:
    raise ValueError(f"asked for {count} word pairs; there are only {total}")
  picks = rng.choice(total, size=count, replace=False)
  return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]


def draw_values(rng: np.random.Generator, kind: str, count: int) -> list[str]:
  """`count` distinct needle values: "number" 7 digits, "word" a word pair, "uuid" 8-4-4-4-12
  hex digits."""
  if kind == "word":
    return word_pairs(rng, count)
  out: list[str] = []
  while len(out) < count:
    if kind == "number":
      value = str(int(rng.integers(1_000_000, 10_000_000)))
    elif kind == "uuid":
      digits = "".join("0123456789abcdef"[i] for i in rng.integers(16, size=32))
      value = "-".join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
    else:
      raise ValueError(f"unknown value kind {kind!r}; expected 'number', 'word' or 'uuid'")
    if value not in out:
      out.append(value)
  return out


# ---- fitting a context to a token budget -------------------------------------------------------


def fit(tokenizer: Tokenizer, budget: int, build: Callable[[int], str], task: str,
        low: int = 0, high: int | None = None) -> tuple[str, list[int]]:
  """The text build(n) with the largest n found whose encoding fits `budget` tokens.

  build(n) grows with n (haystack units). Starts from build(low), which must fit (else a
  ValueError naming the task and the tokens it needs), estimates tokens per unit from a probe, then
  corrects the estimate with the encoding of each guess (secant steps, bisection if they stall)
  until the text fills 98-100% of the budget or no n is left between the bounds. A handful of
  encodes of the whole text; never one per unit. `high` (optional) is an n known not to be
  wanted. Returns (text, ids).
  """
  text = build(low)
  ids = tokenizer.encode(text)
  if len(ids) > budget:
    raise ValueError(f"length too short for {task}: its instructions and needles alone take "
                     f"{len(ids)} tokens, over the {budget} left after the question")
  best, fixed = (text, ids), len(ids)
  n_fit, n_over = low, high  # build(n_fit) fits; build(n_over), when known, is over or unwanted
  goal = budget - max(1, budget // 100)  # aim a little under, so most guesses fit
  guess = low + 8
  for step in range(24):
    if n_over is not None:
      if step >= 8:  # the secant steps stall: bisect
        guess = (n_fit + n_over) // 2
      guess = min(guess, n_over - 1)
    guess = max(guess, n_fit + 1)
    if n_over is not None and guess >= n_over:
      break
    text = build(guess)
    ids = tokenizer.encode(text)
    if len(ids) <= budget:
      n_fit, best = guess, (text, ids)
      if len(ids) >= 0.98 * budget:
        break
    else:
      n_over = guess
    rate = max(len(ids) - fixed, 1) / (guess - low)  # tokens per unit
    guess = low + int((goal - fixed) / rate)
  return best


def weave(units: Sequence[str], needles: Sequence[tuple[float, str]], sep: str) -> str:
  """Join `units` with `sep`, each (depth, needle) inserted before unit round(depth * len(units));
  needles at the same place keep their order."""
  at = sorted(((round(d * len(units)), i, s) for i, (d, s) in enumerate(needles)))
  parts, j = [], 0
  for k, unit in enumerate(units):
    while j < len(at) and at[j][0] <= k:
      parts.append(at[j][2])
      j += 1
    parts.append(unit)
  parts += [s for _, _, s in at[j:]]
  return sep.join(parts)


def haystack_units(rng: np.random.Generator, haystack: str,
                   haystack_text: str | None) -> tuple[Callable[[int], list[str]], str]:
  """(units(n) -> n haystack pieces, separator). "noise": the NOISE sentences in turn; "text":
  n consecutive non-empty lines of `haystack_text` from a random start, wrapping around."""
  if haystack == "noise":
    return (lambda n: [NOISE[i % len(NOISE)] for i in range(n)]), " "
  if haystack != "text":
    raise ValueError(f"unknown haystack {haystack!r}; expected 'noise' or 'text'")
  if not haystack_text or not haystack_text.strip():
    raise ValueError("haystack='text' needs haystack_text (a long text, e.g. tinyshakespeare's)")
  lines = [line.strip() for line in haystack_text.splitlines() if line.strip()]
  start = int(rng.integers(len(lines)))
  return (lambda n: [lines[(start + i) % len(lines)] for i in range(n)]), "\n"


def finish(task: str, tokenizer: Tokenizer, length: int, question: str,
           build: Callable[[int], str], answers: Sequence[str], max_new_tokens: int,
           low: int = 0, high: int | None = None) -> Sample:
  """Fit build(n) into `length` minus the question's tokens and wrap the result as a Sample."""
  if length < 1:
    raise ValueError(f"length must be a positive number of tokens, got {length}")
  question_ids = tokenizer.encode(question)
  budget = length - len(question_ids)
  if budget < 1:
    raise ValueError(f"length too short for {task}: the question alone takes "
                     f"{len(question_ids)} of {length} tokens")
  context, ids = fit(tokenizer, budget, build, task, low, high)
  return Sample(task=task, context=context, question=question, answers=tuple(answers),
                max_new_tokens=max_new_tokens, ids=tuple(ids), question_ids=tuple(question_ids))


# ---- needle in a haystack ----------------------------------------------------------------------

NIAH_INTRO = ("Some special magic {kind}s are hidden in the long text below. Memorize them: you "
              "will be asked about them afterwards.\n")
NIAH_NEEDLE = "One of the special magic {kind}s for {key} is: {value}."
NIAH_QUESTION = ("\nWhat are all the special magic {kind}s for {keys} in the text above? Answer: "
                 "The special magic {kind}s for {keys} in the text above are")
NIAH_NEW_TOKENS = 128


def _and(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _niah(task: str, tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
          n_keys: int, n_values: int, n_asked: int, haystack: str, value: str,
          haystack_text: str | None) -> Sample:
  """The four niah tasks: `n_keys` keys with `n_values` values each, the first `n_asked` keys
  asked; needles at uniform random depths of the haystack."""
  for name, count in (("n_keys", n_keys), ("n_values", n_values), ("n_asked", n_asked)):
    if count < 1:
      raise ValueError(f"{task}: {name} must be >= 1, got {count}")
  if value not in ("number", "word", "uuid"):
    raise ValueError(f"unknown value kind {value!r}; expected 'number', 'word' or 'uuid'")
  units, sep = haystack_units(rng, haystack, haystack_text)
  if value == "word":  # keys and values from one draw, so no value repeats a key
    pairs = word_pairs(rng, n_keys * (1 + n_values))
    keys, values = pairs[:n_keys], pairs[n_keys:]
  else:
    keys, values = word_pairs(rng, n_keys), draw_values(rng, value, n_keys * n_values)
  needles = [(float(rng.uniform()), NIAH_NEEDLE.format(kind=value, key=keys[i // n_values],
                                                       value=v))
             for i, v in enumerate(values)]
  answers = values[:n_asked * n_values]
  question = NIAH_QUESTION.format(kind=value, keys=_and(keys[:n_asked]))

  def build(n: int) -> str:
    return NIAH_INTRO.format(kind=value) + weave(units(n), needles, sep) + "\n"

  return finish(task, tokenizer, length, question, build, answers, NIAH_NEW_TOKENS)


def make_niah_single(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
                     haystack: str = "noise", value: str = "number",
                     haystack_text: str | None = None) -> Sample:
  """One needle (key -> value), asked for its value. RULER's niah_single_1 is noise/number,
  _2 text/number, _3 text/uuid."""
  return _niah("niah_single", tokenizer, length, rng, n_keys=1, n_values=1, n_asked=1,
               haystack=haystack, value=value, haystack_text=haystack_text)


def make_niah_multikey(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
                       n_keys: int = 4, haystack: str = "noise", value: str = "number",
                       haystack_text: str | None = None) -> Sample:
  """`n_keys` needles with distinct keys; one asked, the others distract (RULER's niah_multikey_1,
  which hides them in text)."""
  return _niah("niah_multikey", tokenizer, length, rng, n_keys=n_keys, n_values=1, n_asked=1,
               haystack=haystack, value=value, haystack_text=haystack_text)


def make_niah_multivalue(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
                         n_values: int = 4, haystack: str = "noise", value: str = "number",
                         haystack_text: str | None = None) -> Sample:
  """One key with `n_values` needles; every value must be returned."""
  return _niah("niah_multivalue", tokenizer, length, rng, n_keys=1, n_values=n_values, n_asked=1,
               haystack=haystack, value=value, haystack_text=haystack_text)


def make_niah_multiquery(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
                         n_queries: int = 4, haystack: str = "noise", value: str = "number",
                         haystack_text: str | None = None) -> Sample:
  """`n_queries` needles, all keys asked at once; every value must be returned."""
  return _niah("niah_multiquery", tokenizer, length, rng, n_keys=n_queries, n_values=1,
               n_asked=n_queries, haystack=haystack, value=value, haystack_text=haystack_text)


# ---- variable tracking -------------------------------------------------------------------------

VT_INTRO = "Keep track of the chains of variable assignments hidden in the text below.\n"
VT_QUESTION = ("\nWhich variables in the text above end up holding the value {value}, directly or "
               "through other variables? Answer: The variables that hold {value} are:")
VT_NEW_TOKENS = 30


def make_vt(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *, n_chains: int = 1,
            n_hops: int = 4, haystack: str = "noise",
            haystack_text: str | None = None) -> Sample:
  """Variable tracking: each chain is "VAR A = 12345." then `n_hops` lines "VAR B = VAR A." ...,
  names of 5 capital letters, values of 5 digits (distinct per chain); each chain's lines at
  increasing random depths. Asked: every variable holding the first chain's value (n_hops + 1)."""
  if n_chains < 1 or n_hops < 1:
    raise ValueError(f"vt: n_chains and n_hops must be >= 1, got {n_chains} and {n_hops}")
  units, sep = haystack_units(rng, haystack, haystack_text)
  haystack_sample = " ".join(units(200))
  names: list[str] = []
  while len(names) < n_chains * (n_hops + 1):
    name = "".join(chr(65 + i) for i in rng.integers(26, size=5))
    if name not in names and name not in haystack_sample:
      names.append(name)
  values = [str(v) for v in rng.choice(90_000, size=n_chains, replace=False) + 10_000]
  needles = []
  for c in range(n_chains):
    chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
    lines = [f"VAR {chain[0]} = {values[c]}."]
    lines += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    needles += zip(np.sort(rng.uniform(size=len(lines))).tolist(), lines)

  def build(n: int) -> str:
    return VT_INTRO + weave(units(n), needles, sep) + "\n"

  return finish("vt", tokenizer, length, VT_QUESTION.format(value=values[0]), build,
                names[:n_hops + 1], VT_NEW_TOKENS)


# ---- aggregation: common and frequent words ----------------------------------------------------

CWE_INTRO = ("Below is a numbered list of words. Some words occur far more often than the rest; "
             "keep count of how often each one occurs.\n")
CWE_QUESTION = ("\nWhich {n} words occur most often in the list above? Answer: The {n} words that "
                "occur most often in the list are:")
CWE_NEW_TOKENS = 120


def make_cwe(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *, n_common: int = 10,
             freq_common: int = 30, freq_rare: int = 3) -> Sample:
  """Common words extraction: `n_common` words `freq_common` times each and a fitted number of
  rare words `freq_rare` times each, shuffled into "1. word 2. word ...". Words come from WORDS,
  then coined words when the list runs out.

  If the common words would take more than half of the context (short lengths),
  freq_common is lowered to fit, but kept >= freq_rare + 2; below that a ValueError."""
  if n_common < 1 or freq_rare < 1 or freq_common <= freq_rare:
    raise ValueError(f"cwe: need n_common >= 1 and freq_common > freq_rare >= 1, got {n_common}, "
                     f"{freq_common}, {freq_rare}")
  vocab = [WORDS[i] for i in rng.permutation(len(WORDS))]
  vocab += coined_words(rng, max(0, n_common + length // freq_rare - len(vocab)), avoid=WORDS)
  common, rare = vocab[:n_common], vocab[n_common:]
  order_seed = int(rng.integers(2**32))
  question = CWE_QUESTION.format(n=n_common)
  probe = tokenizer.encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(common * 4)))
  per_entry = len(probe) / (4 * n_common)
  room = length - len(tokenizer.encode(CWE_INTRO + question))
  freq_common = min(freq_common, int(room / 2 / (per_entry * n_common)))
  if freq_common < freq_rare + 2:
    raise ValueError(f"length too short for cwe: {n_common} common words {freq_rare + 2} times "
                     f"each need about {int(2 * per_entry * n_common * (freq_rare + 2))} tokens "
                     f"of list, {length} tokens leave {room}")

  def build(n: int) -> str:
    words = common * freq_common + rare[:n] * freq_rare
    words = [words[i] for i in np.random.default_rng(order_seed).permutation(len(words))]
    return CWE_INTRO + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + "\n"

  return finish("cwe", tokenizer, length, question, build, common, CWE_NEW_TOKENS,
                high=len(rare) + 1)


FWE_INTRO = "Below is a text of coded words. Keep count of how often each coded word occurs.\n"
FWE_QUESTION = ("\nWhich three coded words occur most often in the text above? Answer: The three "
                "most frequent coded words in the text are:")
FWE_NEW_TOKENS = 50


def zipf_counts(scale: int, alpha: float) -> list[int]:
  """Counts floor(scale / r**alpha) for ranks r = 1, 2, ... while they are >= 1."""
  counts, r = [], 1
  while (c := int(scale / r**alpha)) >= 1:
    counts.append(c)
    r += 1
  return counts


def make_fwe(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *,
             alpha: float = 2.0) -> Sample:
  """Frequent words extraction: coined words (3 syllables) with counts zipf_counts(c, alpha),
  c fitted to the length, shuffled and joined by spaces; the 3 most frequent are the answers. The
  top 4 counts are kept strictly decreasing so the answer is unique."""
  if alpha <= 0:
    raise ValueError(f"fwe: alpha must be > 0, got {alpha}")
  order_seed = int(rng.integers(2**32))
  vocab = coined_words(rng, max(8, min(length, int((length + 8) ** (1 / alpha)) + 8)))

  def counts(n: int) -> list[int]:
    """Counts for scale 16 + n, the 4th lowered (if needed) to stay below the 3rd."""
    c = zipf_counts(16 + n, alpha)[:len(vocab)]
    return c[:3] + [min(x, c[2] - 1) for x in c[3:]]

  def build(n: int) -> str:
    words = [w for w, k in zip(vocab, counts(n)) for _ in range(k)]
    words = [words[i] for i in np.random.default_rng(order_seed).permutation(len(words))]
    return FWE_INTRO + " ".join(words) + "\n"

  return finish("fwe", tokenizer, length, FWE_QUESTION, build, vocab[:3], FWE_NEW_TOKENS)


# ---- registry ----------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Sample]] = {
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "vt": make_vt,
    "cwe": make_cwe,
    "fwe": make_fwe,
}
TEXT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def _generator(task: str) -> Callable[..., Sample]:
  if task not in TASKS:
    raise ValueError(f"unknown RULER task {task!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[task]


def make(task: str, tokenizer: Tokenizer, length: int, seed: int, **options) -> Sample:
  """One sample of `task` at `length` tokens; the same (task, length, seed, options) gives the
  same sample."""
  return _generator(task)(tokenizer, length, np.random.default_rng(seed), **options)


def suite(tokenizer: Tokenizer, length: int, n_per_task: int, seed: int,
          tasks: Sequence[str] | None = None,
          haystack_text: str | None = None) -> list[Sample]:
  """`n_per_task` samples of each task in `tasks` (default: all of TASKS), task by task.

  Sample i of a task is seeded by (seed, crc32 of the task name, i), so it does not change when
  other tasks are added or removed. With `haystack_text`, the niah tasks hide their needles in its
  lines (niah_single too); without it, in noise.
  """
  if n_per_task < 1:
    raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
  tasks = list(TASKS) if tasks is None else list(tasks)
  for task in tasks:
    _generator(task)
  samples = []
  for task in tasks:
    options = {}
    if task in TEXT_TASKS:
      options = ({"haystack": "text", "haystack_text": haystack_text} if haystack_text
                 else {"haystack": "noise"})
    for i in range(n_per_task):
      rng = np.random.default_rng([seed, zlib.crc32(task.encode()), i])
      samples.append(TASKS[task](tokenizer, length, rng, **options))
  return samples
