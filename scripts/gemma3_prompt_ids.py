"""Write tests/fixtures/gemma3_prompt_ids.json: the Gemma 3 token ids of the parity prompts and of
the start of tinyshakespeare, from kvjax's tokenizer (checked against llama.cpp's by
tests/test_tokenizer_spm.py), for scripts/make_gemma3_fixtures.py to feed Transformers.

  python scripts/gemma3_prompt_ids.py [--data ../shared/data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village nestled between rolling hills and a quiet river, "
    "there lived an old clockmaker who",
    "Caf\u00e9 \u2615 ou th\u00e9? \U0001F680\nLine two:\n\t- na\u00efve r\u00e9sum\u00e9 \u2014 "
    "\u4f60\u597d\n",
]
TEXT_TOKENS = 2048
TEXT_CHARS = 16000  # comfortably more than TEXT_TOKENS tokens of tinyshakespeare


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", type=pathlib.Path,
                  default=REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
  ap.add_argument("--out", type=pathlib.Path,
                  default=REPO / "tests" / "fixtures" / "gemma3_prompt_ids.json")
  args = ap.parse_args()
  import kvjax

  tokenizer = kvjax.load("gemma3-270m").tokenizer
  text_ids = tokenizer.encode(args.data.read_text(encoding="utf-8")[:TEXT_CHARS])[:TEXT_TOKENS]
  if len(text_ids) < TEXT_TOKENS:
    raise SystemExit(f"only {len(text_ids)} tokens in the first {TEXT_CHARS} characters")
  out = {"prompts": [{"text": p, "ids": tokenizer.encode(p)} for p in PROMPTS],
         "text_source": f"first {TEXT_TOKENS} tokens of tinyshakespeare.txt (<bos> first)",
         "text_ids": text_ids}
  args.out.write_text(json.dumps(out) + "\n", encoding="utf-8")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
