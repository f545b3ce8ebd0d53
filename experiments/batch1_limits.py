"""Where a batch-1 SmolLM2 step on the CPU loses its time: rooflines and the fixes tried (issue 10).

A batch-1 decode step reads every weight once (538 MB in fp32), so its speed is set by how fast
the weights stream from memory. This script measures, in one run, on the same machine:

  1. the read roofline: `batch1/stream.c` (compiled here with the system C compiler) streams a
     buffer of the model's weight bytes with 1 and 2 threads, on 4 KiB pages and on transparent
     huge pages; the best 2-thread figure is the most a step could reach;
  2. XLA's dots alone: one jitted chain of the step's 211 matrix-vector products (the real shapes,
     weights [in, out] as kvjax stores them, and [out, in]), with no attention or norms;
  3. the kvjax step (`generate`, full cache, 32-token prompt, 128 new tokens) as it is, and with
     each fix tried:
       - `hugepages`: the weight buffers collapsed into transparent huge pages (madvise);
       - `ffi-matvec`: the layers' products through `batch1/cpu_matvec.cc`, a native kernel
         called with the XLA FFI that splits each product over the caller and XLA's thread pool.
     Each variant runs in its own process, alternating, `--rounds` times; the best and median
     decode tok/s of each are reported.

The C compiler (g++/gcc) is needed for 1 and for the ffi variant; without it those parts are
skipped with a note. Output: batch1_limits.json in --out (default docs/).

  python experiments/batch1_limits.py            # ~6 minutes on the 2-core CPU
  python experiments/batch1_limits.py --quick    # smoke run
"""

import argparse
import ctypes
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = pathlib.Path(__file__).resolve().parent
# SmolLM2-135M's matrices, as kvjax stores them: per layer q, k, v, o, gate, up, down [in, out],
# and the tied embedding used as LM head [vocab, dim].
N_LAYERS = 30
LAYER_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
HEAD_SHAPE = (49152, 576)
WEIGHT_BYTES = 4 * (N_LAYERS * sum(a * b for a, b in LAYER_SHAPES) + HEAD_SHAPE[0] * HEAD_SHAPE[1])
VARIANTS = ["xla", "hugepages", "ffi-matvec"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default=str(common.DOCS))
parser.add_argument("--rounds", type=int, default=3, help="processes per variant (alternating)")
parser.add_argument("--quick", action="store_true")
parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
args = parser.parse_args()


def compile_c(source: pathlib.Path, output: pathlib.Path, extra: list[str]) -> str | None:
  """Compiles `source`; None, or why it could not be built."""
  cc = shutil.which("g++" if source.suffix == ".cc" else "gcc")
  if cc is None:
    return f"no compiler for {source.name}"
  done = subprocess.run([cc, "-O3", "-march=native", "-pthread", *extra, str(source), "-o", str(output)],
                        capture_output=True, text=True)
  return None if done.returncode == 0 else done.stderr[-1500:]


# ---- child: one variant of the kvjax step ---------------------------------------------------
def huge_pages(arrays) -> int:
  """Asks the kernel to back each array's buffer with 2 MiB pages now; bytes covered."""
  libc = ctypes.CDLL(None, use_errno=True)
  advise_huge, collapse, page = 14, 25, 1 << 21  # MADV_HUGEPAGE, MADV_COLLAPSE (Linux >= 6.1)
  covered = 0
  for a in arrays:
    pointer = a.unsafe_buffer_pointer()
    start, end = pointer & ~(page - 1), (pointer + a.nbytes + page - 1) & ~(page - 1)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advise_huge)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), collapse) == 0:
      covered += end - start
  return covered


def ffi_linear(workdir: pathlib.Path):
  """`linear(x, w)` through batch1/cpu_matvec.cc for one fp32 row, else x @ w."""
  import jax
  import jax.numpy as jnp

  lib_path = workdir / "libcpu_matvec.so"
  error = compile_c(HERE / "batch1" / "cpu_matvec.cc", lib_path,
                    ["-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"])
  if error:
    raise SystemExit(f"ffi-matvec: build failed: {error}")
  lib = ctypes.cdll.LoadLibrary(str(lib_path))
  jax.ffi.register_ffi_target("batch1_matvec_in_out", jax.ffi.pycapsule(lib.KvjaxMatvecInOut),
                              platform="cpu")

  def linear(x, w):
    if x.dtype != jnp.float32 or x.size != x.shape[-1]:
      return x @ w.astype(x.dtype)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[1],), x.dtype)
    return jax.ffi.ffi_call("batch1_matvec_in_out", out, vmap_method="sequential")(x, w)

  return linear


def run_variant(variant: str) -> None:
  import jax

  import kvjax
  from kvjax import decode
  from kvjax.bench import bench_prompt
  from kvjax.models import llama

  note = ""
  with tempfile.TemporaryDirectory() as tmp:
    if variant == "ffi-matvec":
      llama.linear = ffi_linear(pathlib.Path(tmp))  # the Flax modules look it up per call
    model = kvjax.load("smollm2-135m")
    if variant == "hugepages":
      note = f"{huge_pages(jax.tree.leaves(model.params)) / 2**20:.0f} MiB collapsed"
    new_tokens = 16 if args.quick else 128
    prompt = bench_prompt(model.tokenizer, 32, model.config.vocab_size)
    rates = [decode.generate(model, [prompt], max_new_tokens=new_tokens, cache="full", capacity=2048,
                             stop_at_eos=False).decode_tok_per_s for _ in range(2 if args.quick else 6)]
  print(json.dumps({"variant": variant, "rates": rates[1:], "note": note}))


if args.variant:
  run_variant(args.variant)
  sys.exit(0)

# ---- parent ---------------------------------------------------------------------------------
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

out = common.out_dir(args.out)
result = {"experiment": "batch1_limits", "quick": args.quick, **common.run_info(args),
          "weight_bytes": WEIGHT_BYTES}

# 1. read roofline
with tempfile.TemporaryDirectory() as tmp:
  binary = pathlib.Path(tmp) / "stream"
  error = compile_c(HERE / "batch1" / "stream.c", binary, ["-ffast-math"])
  roofline = {}
  if error:
    print(f"note: roofline skipped ({error})")
  else:
    size = WEIGHT_BYTES // (8 if args.quick else 1)
    for threads in (1, 2):
      for huge in (0, 1):
        line = subprocess.run([str(binary), str(size), str(threads), str(huge), "10"],
                              capture_output=True, text=True, check=True).stdout.split()
        gbs = size / float(line[0]) / 1e9
        roofline[f"{threads}t_{'huge' if huge else '4k'}"] = gbs
        print(f"read roofline, {threads} thread(s), {'huge' if huge else '4 KiB'} pages: "
              f"{gbs:.1f} GB/s -> {gbs * 1e9 / WEIGHT_BYTES:.0f} tok/s if a step were only its weights")
  result["roofline_gb_per_s"] = roofline

# 2. XLA's dots alone
rng = np.random.default_rng(0)
layers = 4 if args.quick else N_LAYERS
shapes = LAYER_SHAPES * layers
weights = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
head = jnp.asarray(rng.standard_normal(HEAD_SHAPE, dtype=np.float32))
chain_bytes = sum(w.nbytes for w in weights) + head.nbytes


def dot_chain(layout: str):
  ws = weights if layout == "in_out" else [w.T.copy() for w in weights]

  @jax.jit
  def chain(ws, head, x):
    for w in ws:  # each product feeds the next, as in a step
      xi = x[:, : (w.shape[0] if layout == "in_out" else w.shape[1])]
      y = xi @ w if layout == "in_out" else xi @ w.T
      x = x.at[:, : y.shape[1]].add(y * 1e-3)  # every output element reaches a later product
    return x[:, :576] @ head.T

  x = jnp.ones((1, 1536), jnp.float32)
  chain(ws, head, x).block_until_ready()
  best = float("inf")
  for _ in range(3 if args.quick else 20):
    start = time.perf_counter()
    chain(ws, head, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


result["xla_dot_chain"] = {}
for layout in ("in_out", "out_in"):
  seconds = dot_chain(layout)
  result["xla_dot_chain"][layout] = {"seconds": seconds, "gb_per_s": chain_bytes / seconds / 1e9}
  print(f"XLA dots alone ({len(shapes) + 1} products, weights [{layout.replace('_', ', ')}]): "
        f"{seconds * 1e3:.2f} ms, {chain_bytes / seconds / 1e9:.1f} GB/s")
del weights, head

# 3. the kvjax step, each variant in its own process, alternating
rates = {v: [] for v in VARIANTS}
notes = {}
for _ in range(1 if args.quick else args.rounds):
  for variant in VARIANTS:
    done = subprocess.run([sys.executable, __file__, "--variant", variant] + (["--quick"] if args.quick else []),
                          capture_output=True, text=True)
    if done.returncode != 0:
      notes[variant] = (done.stderr or done.stdout).strip().splitlines()[-1][:300]
      continue
    row = json.loads(done.stdout.strip().splitlines()[-1])
    rates[variant] += row["rates"]
    notes[variant] = row["note"]
result["step_tok_per_s"] = {}
for variant, values in rates.items():
  if not values:
    print(f"kvjax step, {variant}: skipped ({notes.get(variant)})")
    continue
  best, median = max(values), statistics.median(values)
  result["step_tok_per_s"][variant] = {"best": best, "median": median, "runs": values,
                                       "note": notes.get(variant, "")}
  print(f"kvjax step, {variant}: best {best:.1f} tok/s, median {median:.1f} "
        f"({len(values)} runs){' — ' + notes[variant] if notes.get(variant) else ''}")

path = out / "batch1_limits.json"
common.write_json(path, result)
