"""llama.cpp side of experiments/peers.py: greedy decode throughput of the same GGUF on the CPU.

Runs with the python of a separate venv that has llama-cpp-python (built from source, CPU only) and
never imports kvjax: peers.py starts it as a subprocess with that python, exactly like hf_peer.py.
Input: the GGUF path and the prompt token ids (kvjax's tokenization, so every framework sees the
very same ids). Output: one JSON file.

Formats (`--formats`):
  * q4_1: the GGUF as given (SmolLM2-135M-Instruct.Q4_1.gguf), llama.cpp's quantized kernels;
  * f32: the same GGUF converted to all-float32 by llama.cpp itself (`llama_model_quantize` with
    LLAMA_FTYPE_ALL_F32 and allow_requantize), i.e. the weights kvjax and HF decode with. The
    converted file is written once into `--work-dir` (default: a temporary folder) and reused when
    it is already there.

For each format the model is loaded once (`llama_cpp.Llama`, n_ctx 2048, n_batch 512, logits for
the last position only), then batch 1 is decoded greedily with the low-level API: `reset()`,
`eval(prompt ids)` plus the argmax of the last logits is the prefill (it yields the first token);
then N - 1 times `eval([token])` and argmax is the decode loop, timed as a whole. Decode tok/s =
(N - 1) / decode time, the count kvjax and hf_peer.py report (tokens made after the prefill's
first). Best of `--repeats` after one short warm-up run (which also pages in the mmapped weights).

  /work/llamacpp-venv/bin/python experiments/llamacpp_peer.py --gguf PATH --ids ids.json \
      --out llamacpp.json [--new-tokens 128] [--threads 2] [--formats f32 q4_1] [--work-dir DIR]
"""

import argparse
import ctypes
import json
import os
import pathlib
import platform
import resource
import tempfile
import time

import llama_cpp
import numpy as np

N_CTX = 2048
N_BATCH = 512
FORMATS = ("f32", "q4_1")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--gguf", required=True, help="the Q4_1 GGUF (used as is for format q4_1)")
parser.add_argument("--ids", required=True, help="JSON file with a list of prompt token ids")
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (decode and batch)")
parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
parser.add_argument("--work-dir", default=None,
                    help="folder for the converted F32 GGUF, reused if present (default: a temp dir)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

gguf = pathlib.Path(args.gguf).resolve()
ids = [int(i) for i in json.loads(pathlib.Path(args.ids).read_text())]
if args.new_tokens < 2:
  raise SystemExit("--new-tokens must be at least 2 (the decode loop starts after the first token)")
if len(ids) + args.new_tokens > N_CTX:
  raise SystemExit(f"prompt ({len(ids)}) + new tokens ({args.new_tokens}) exceed n_ctx {N_CTX}")
llama_cpp.llama_backend_init()


def convert_to_f32(src: pathlib.Path, folder: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """All-float32 copy of `src` made by llama.cpp's quantize API; reused if already in `folder`."""
  dst = folder / f"{src.stem}.F32.gguf"
  if dst.exists() and dst.stat().st_size > 0:
    return dst, {"converted_now": False, "convert_s": None}
  folder.mkdir(parents=True, exist_ok=True)
  partial = dst.with_name(dst.name + ".partial")  # renamed only once complete
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
  params.allow_requantize = True
  params.nthread = args.threads
  start = time.perf_counter()
  rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
  seconds = time.perf_counter() - start
  if rc != 0:
    partial.unlink(missing_ok=True)
    raise SystemExit(f"llama_model_quantize({src} -> F32) returned {rc}")
  partial.rename(dst)
  return dst, {"converted_now": True, "convert_s": seconds}


def greedy(llm: llama_cpp.Llama, new_tokens: int):
  """Prefill + `new_tokens` - 1 decode steps at batch 1; (prefill s, decode s, tokens)."""
  n_vocab = llm.n_vocab()

  def argmax_last() -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(np.argmax(logits))

  llm.reset()
  start = time.perf_counter()
  llm.eval(ids)
  token = argmax_last()
  prefill = time.perf_counter() - start
  tokens = [token]
  start = time.perf_counter()
  for _ in range(new_tokens - 1):
    llm.eval([token])
    token = argmax_last()
    tokens.append(token)
  return prefill, time.perf_counter() - start, tokens


def measure(fmt: str, path: pathlib.Path) -> dict:
  start = time.perf_counter()
  llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                        n_ctx=N_CTX, n_batch=N_BATCH, verbose=False, logits_all=False)
  load_s = time.perf_counter() - start
  desc = ctypes.create_string_buffer(256)
  llama_cpp.llama_model_desc(llm.model, desc, ctypes.sizeof(desc))
  greedy(llm, 2)  # warm-up: buffers allocated, mmapped weights paged in
  runs = [greedy(llm, args.new_tokens) for _ in range(args.repeats)]
  prefill = min(r[0] for r in runs)
  _, decode, tokens = min(runs, key=lambda r: r[1])
  row = {"format": fmt, "framework": f"llama.cpp {fmt}", "batch": 1, "new_tokens": args.new_tokens,
         "gguf": str(path), "file_bytes": path.stat().st_size,
         "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
         "n_params": int(llama_cpp.llama_model_n_params(llm.model)),
         "model_desc": desc.value.decode(errors="replace"), "load_s": load_s,
         "prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
         "decode_tok_per_s": (args.new_tokens - 1) / decode, "tokens_row0": tokens}
  llm.close()
  print(f"llama.cpp {fmt} batch 1: {row['decode_tok_per_s']:.1f} decode tok/s "
        f"({row['model_desc']}, {row['file_bytes'] / 2**20:.0f} MiB)", flush=True)
  return row


with tempfile.TemporaryDirectory(prefix="llamacpp_peer_") as tmp:
  work = pathlib.Path(args.work_dir) if args.work_dir else pathlib.Path(tmp)
  conversion = None
  results = []
  for fmt in args.formats:
    if fmt == "f32":
      path, conversion = convert_to_f32(gguf, work)
      conversion.update({"source": str(gguf), "output": str(path), "ftype": "LLAMA_FTYPE_ALL_F32",
                         "allow_requantize": True, "kept": args.work_dir is not None})
    else:
      path = gguf
    results.append(measure(fmt, path))

pathlib.Path(args.out).write_text(json.dumps({
    "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
    "threads": args.threads, "n_ctx": N_CTX, "n_batch": N_BATCH, "batch": 1,
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    "sampling": "numpy argmax of llama_get_logits_ith(ctx, -1) after each eval",
    "decode": "time of the N - 1 single-token evals after the prompt eval (best of repeats)",
    "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GGML_", "LLAMA_"))},
    "f32_conversion": conversion,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "results": results}, indent=1))
