"""kvpress side of experiments/press_speed.py: compress a prompt with a kvpress press, then decode.

Runs in kvpress's own environment (torch + transformers + kvpress 0.5.5, e.g. /work/kvpress-venv)
and never imports kvjax (press_speed.py starts it as a subprocess with that environment's python).
Input: the GGUF path and the prompt token ids (kvjax's tokenization, so both sides see exactly the
same ids). The model is loaded once (dequantized to float32, Transformers' default attention
implementation, sdpa, unless --attn says otherwise); then the script answers commands, one JSON
object per line on stdin, one per line on stdout (prefixed with PREFIX: other lines are logs), so
the driver can interleave kvpress and kvjax runs press by press without reloading the model:

  {"press": "snapkv" | null, "ratio": 0.5, "prompts": [0, 1, ...], "new_tokens": 32,
   "truncate": null | n}
  -> {"press": ..., "results": [{"prompt": i, "n_tokens": T, "prefill_s": ..., "decode_s": ...,
                                 "tokens": [...], "cache_len": ...}, ...]}

What is timed, per prompt at batch 1 (kvpress's pipeline compresses one context at a time):
`KVPressTextGenerationPipeline` takes a context *string* (it applies the chat template and
tokenizes itself), so it cannot be handed the ids; this does what its `_forward` does with them
instead: `with press(model): model(ids, past_key_values=DynamicCache())` (the prefill, compressed
layer by layer by the press's forward hooks; `logits_to_keep=1` gives the first token from the
uncompressed prefill's last position, as the pipeline's lm-head-less prefill + question pass
would not), then new_tokens - 1 greedy single-token steps at position_ids T, T + 1, ... (the
pipeline's `generate_answer`), without stopping at EOS. prefill_s: the compressed prefill and
the first token; decode_s: the new_tokens - 1 steps. press null: the same without a press (full
DynamicCache).

  /work/kvpress-venv/bin/python experiments/kvpress_peer.py --gguf PATH --ids ids.json
"""

import argparse
import json
import pathlib
import platform
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress
from kvpress import KnormPress, PyramidKVPress, SnapKVPress, StreamingLLMPress

PREFIX = "@@kvpress@@ "
PRESSES = {"knorm": KnormPress, "snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress,
           "pyramidkv": PyramidKVPress}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--gguf", required=True)
parser.add_argument("--ids", required=True, help="JSON file: a list of prompts (lists of ids)")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
parser.add_argument("--attn", default=None, help="attn_implementation (default: Transformers')")
args = parser.parse_args()


def send(obj):
  sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
  sys.stdout.flush()


if args.threads:
  torch.set_num_threads(args.threads)
transformers.utils.logging.disable_progress_bar()
gguf = pathlib.Path(args.gguf)
prompts = json.loads(pathlib.Path(args.ids).read_text())
start = time.perf_counter()
extra = {"attn_implementation": args.attn} if args.attn else {}
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                             dtype=torch.float32, **extra)
model.eval()
send({"ready": True, "load_s": time.perf_counter() - start, "torch": torch.__version__,
      "transformers": transformers.__version__, "kvpress": kvpress.__version__
      if hasattr(kvpress, "__version__") else "0.5.5", "torch_threads": torch.get_num_threads(),
      "attn_implementation": model.config._attn_implementation, "python": platform.python_version()})


def run(press, ids, new_tokens):
  """(prefill_s, decode_s, tokens, cache length after the prefill) of one prompt at batch 1."""
  cache = DynamicCache()
  x = torch.tensor([ids], dtype=torch.long)
  n = len(ids)
  with torch.inference_mode():
    start = time.perf_counter()
    if press is None:
      out = model(input_ids=x, past_key_values=cache, logits_to_keep=1)
    else:
      with press(model):
        out = model(input_ids=x, past_key_values=cache, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    prefilled = time.perf_counter()
    for i in range(new_tokens - 1):
      out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                  position_ids=torch.tensor([[n + i]]))
      tokens.append(int(out.logits[0, -1].argmax()))
    done = time.perf_counter()
  return prefilled - start, done - prefilled, tokens, cache.get_seq_length()


for line in sys.stdin:
  if not line.strip():
    continue
  cmd = json.loads(line)
  name = cmd.get("press")
  results = []
  for i in cmd["prompts"]:
    ids = prompts[i][:cmd["truncate"]] if cmd.get("truncate") else prompts[i]
    press = None if name is None else PRESSES[name](compression_ratio=cmd["ratio"])
    prefill_s, decode_s, tokens, cache_len = run(press, ids, cmd["new_tokens"])
    results.append({"prompt": i, "n_tokens": len(ids), "prefill_s": prefill_s,
                    "decode_s": decode_s, "tokens": tokens, "cache_len": cache_len})
  send({"press": name, "results": results})
