"""HF transformers side of experiments/peers.py: greedy decode throughput of the same GGUF.

Runs in an environment with torch + transformers + gguf and never imports kvjax (peers.py starts it
as a subprocess with that environment's python). Input: the GGUF path and the prompt token ids
(kvjax's tokenization, so both sides see exactly the same ids). Output: one JSON file.

For each batch size: the model is loaded once (dequantized to float32, `dtype=torch.float32`),
`generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)` with its default dynamic cache is
timed, and so is the same call with N = 1 (prefill plus the first token). Decode time is the
difference; decode tok/s = batch * (N - 1) / decode time, the same count kvjax reports (tokens
made by the decode loop after the prefill's first). Best of `--repeats` after one warm-up.

  /work/hfvenv/bin/python experiments/hf_peer.py --gguf PATH --ids ids.json --out hf.json
"""

import argparse
import json
import pathlib
import platform
import resource
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--gguf", required=True)
parser.add_argument("--ids", required=True, help="JSON file with a list of prompt token ids")
parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

if args.threads:
  torch.set_num_threads(args.threads)
gguf = pathlib.Path(args.gguf)
ids = json.loads(pathlib.Path(args.ids).read_text())
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
model.eval()
load_s = time.perf_counter() - start
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
pad = model.generation_config.eos_token_id
pad = pad[0] if isinstance(pad, list) else pad


def timed_generate(batch: int, new_tokens: int):
  input_ids = torch.tensor([ids] * batch, dtype=torch.long)
  mask = torch.ones_like(input_ids)
  start = time.perf_counter()
  with torch.inference_mode():
    out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad)
  return time.perf_counter() - start, out[:, len(ids):]


results = []
for batch in args.batches:
  timed_generate(batch, 2)  # warm-up
  prefill = min(timed_generate(batch, 1)[0] for _ in range(args.repeats))
  runs = [timed_generate(batch, args.new_tokens) for _ in range(args.repeats)]
  total, tokens = min(runs, key=lambda r: r[0])
  decode = total - prefill
  results.append({"batch": batch, "new_tokens": args.new_tokens, "prefill_s": prefill,
                  "total_s": total, "decode_s": decode,
                  "decode_tok_per_s": batch * (args.new_tokens - 1) / decode,
                  "tokens_row0": tokens[0].tolist()})
  print(f"HF batch {batch}: {results[-1]['decode_tok_per_s']:.1f} decode tok/s", flush=True)

pathlib.Path(args.out).write_text(json.dumps({
    "transformers": transformers.__version__, "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
    "dtype": "float32", "load_s": load_s, "weight_bytes": weight_bytes,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cache": "transformers default (DynamicCache)", "results": results}, indent=1))
