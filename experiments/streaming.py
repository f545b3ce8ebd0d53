"""Streaming a long text through sink, window and full caches: memory, step time, rolling perplexity.

The text (tinyshakespeare, 20k+ tokens) is fed one token per step, the way decoding feeds a
stream: a jitted `lax.scan` over `CHUNK` single-token steps, the cache on the carry (donated), one
call per chunk. Per chunk the script records the wall time (compile excluded: each executable is
built ahead of time), the bytes of the cache arrays, and the per-token negative log-likelihood.

  * sink:4+window:1020  StreamingLLM: the first 4 tokens stay forever beside the 1020 latest
  * window:1024         only the 1024 latest tokens
  * dynamic             every token, full precision; capacity doubles when full (between chunks),
                        so its bytes over time are the real allocation. It stops at `--full-max`
                        tokens (default 8192, SmolLM2's trained context: beyond it full attention
                        is outside what the model was trained for, and memory keeps growing).

Rolling perplexity: exp(mean NLL) over consecutive windows of 256 tokens. The script checks its
own loop against `kvjax.perplexity(...).token_nll` on the first tokens (recorded as
`check_max_abs_nll_diff`).

Outputs (in --out): streaming.json, streaming.csv (per chunk), streaming.png (if matplotlib).

  python experiments/streaming.py            # SmolLM2-135M, 20480 tokens
  python experiments/streaming.py --quick    # tiny random model, 512 tokens, budget 64
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import common

# ---- settings -------------------------------------------------------------------------------
MODEL = "smollm2-135m"
STREAM_TOKENS = 20480
SPECS = ["sink:4+window:1020", "window:1024", "dynamic"]
FULL_MAX = 8192
CHUNK = 64
ROLLING = 256
CHECK_TOKENS = 256

QUICK_MODEL = "tiny"
QUICK_STREAM_TOKENS = 512
QUICK_SPECS = ["sink:4+window:60", "window:64", "dynamic"]
QUICK_CHUNK = 32
QUICK_ROLLING = 64
QUICK_CHECK_TOKENS = 96

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model, 512 tokens (smoke run)")
parser.add_argument("--out", default=str(common.DOCS), help="output folder (default docs/)")
parser.add_argument("--model", default=None)
parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare)")
parser.add_argument("--tokens", type=int, default=None, help="stream length")
parser.add_argument("--specs", nargs="+", default=None)
parser.add_argument("--full-max", type=int, default=None,
                    help=f"stop unbounded caches after this many tokens (default {FULL_MAX}; 0: never)")
parser.add_argument("--strict", action="store_true", help="raise on a failing cache kind")
args = parser.parse_args()

import kvjax  # noqa: E402

quick = args.quick
model_name = args.model or (QUICK_MODEL if quick else MODEL)
n_tokens = args.tokens or (QUICK_STREAM_TOKENS if quick else STREAM_TOKENS)
specs = args.specs or (QUICK_SPECS if quick else SPECS)
full_max = args.full_max if args.full_max is not None else (0 if quick else FULL_MAX)
chunk = QUICK_CHUNK if quick else CHUNK
rolling = QUICK_ROLLING if quick else ROLLING
check_tokens = QUICK_CHECK_TOKENS if quick else CHECK_TOKENS
out = common.out_dir(args.out)
info = common.run_info(args)
model = common.load_model(model_name)
text, text_source = common.load_text(args.data, quick)
ids = np.asarray(model.tokenizer.encode(text), np.int32)
while len(ids) < n_tokens + 1:  # a short text is repeated (and said so) to reach the length
  print(f"note: the text has {len(ids)} tokens; repeating it to reach {n_tokens + 1}")
  ids = np.concatenate([ids, ids])
ids = ids[: n_tokens + 1]  # +1: the last step's target
n_chunks = n_tokens // chunk
print(f"model {model_name}, {n_chunks * chunk} tokens from {text_source} in chunks of {chunk}, "
      f"specs {specs}, unbounded kinds stop at {full_max or 'the end'}")
dtype = model.dtype


@functools.partial(jax.jit, static_argnames=("step",), donate_argnames=("cache",))
def run_chunk(params, cache, tokens, targets, *, step):
  """Feeds tokens [C] one at a time through the model's step; returns (nll [C], cache)."""
  one = jnp.ones((1,), jnp.int32)

  def body(cache, pair):
    token, target = pair
    logits, cache = step.step(params, token.reshape(1, 1), cache, one)
    logp = jax.nn.log_softmax(logits[0, 0].astype(jnp.float32))
    return cache, -logp[target]

  cache, nll = jax.lax.scan(body, cache, (tokens, targets))
  return nll, cache


step_fn = kvjax.static_step(model)  # the model's step as a static jit argument


outcomes = common.Outcomes(strict=args.strict)
results, csv_rows = {}, []
for spec in specs:
  parsed = kvjax.parse_spec(spec)
  limit = n_chunks if (parsed.bounded or not full_max) else min(n_chunks, full_max // chunk)
  print(f"\n== {spec}: {limit * chunk} tokens", flush=True)
  with outcomes.guard(spec):
    capacity = parsed.budget or max(2 * chunk, 256)
    cache = kvjax.make_cache(spec, model.config, 1, capacity, dtype)
    nll_all, step_ms, cache_bytes, positions, compile_s = [], [], [], [], 0.0
    for c in common.progress(range(limit), desc=spec, total=limit):
      if not parsed.bounded and not bool(jnp.all(cache.has_room(chunk))):
        cache = kvjax.grow(cache)
      tokens = jnp.asarray(ids[c * chunk:(c + 1) * chunk])
      targets = jnp.asarray(ids[c * chunk + 1:(c + 1) * chunk + 1])
      before = kvjax.compile_stats()["compile_s"]
      start = time.perf_counter()
      nll, cache = run_chunk(model.params, cache, tokens, targets, step=step_fn)
      nll = np.asarray(nll)  # waits for the chunk
      built = kvjax.compile_stats()["compile_s"] - before  # nonzero on a new cache shape only
      compile_s += built
      elapsed = time.perf_counter() - start - built
      nll_all.append(nll)
      step_ms.append(1e3 * elapsed / chunk)
      cache_bytes.append(kvjax.total_bytes(cache))
      positions.append((c + 1) * chunk)
    nll_all = np.concatenate(nll_all)
    n_roll = len(nll_all) // rolling
    roll = np.exp(nll_all[: n_roll * rolling].reshape(n_roll, rolling).mean(axis=1))
    # Cross-check the loop against the library's perplexity on the first tokens.
    n_check = min(check_tokens, len(nll_all))
    ref = kvjax.perplexity(model, ids[: n_check + 1], cache=spec).token_nll
    diff = float(np.max(np.abs(ref[:n_check] - nll_all[:n_check])))
    results[spec] = {
        "tokens": int(len(nll_all)), "ppl": float(np.exp(nll_all.mean())),
        "ppl_last_window": float(roll[-1]) if len(roll) else None,
        "median_step_ms": float(np.median(step_ms)), "last_step_ms": float(step_ms[-1]),
        "final_cache_bytes": int(cache_bytes[-1]), "peak_cache_bytes": int(max(cache_bytes)),
        "compile_s": compile_s, "check_max_abs_nll_diff": diff, "check_tokens": n_check,
        "positions": positions, "step_ms": step_ms, "cache_bytes": cache_bytes,
        "rolling_ppl": roll.tolist(), "rolling_end": [(i + 1) * rolling for i in range(n_roll)],
    }
    for pos, ms, nb in zip(positions, step_ms, cache_bytes):
      csv_rows.append({"spec": spec, "position": pos, "step_ms": ms, "cache_bytes": nb})
    r = results[spec]
    print(f"  ppl {r['ppl']:.3f}  last-window ppl {r['ppl_last_window']}  median step {r['median_step_ms']:.2f} ms"
          f"  cache {common.fmt_bytes(r['final_cache_bytes'])}  loop vs kvjax.perplexity max |dNLL| {diff:.2e}",
          flush=True)

payload = {"experiment": "streaming", "quick": quick, **info,
           "settings": {"model": model_name, "dtype": np.dtype(dtype).name, "tokens": n_chunks * chunk,
                        "text": text_source, "specs": specs, "full_max": full_max, "chunk": chunk,
                        "rolling_window": rolling, "batch": 1},
           "notes": ["one token per step (lax.scan of single-token steps, CHUNK steps per call); "
                     "step_ms = chunk wall time / chunk, compile excluded (jax.jit, once per cache shape)",
                     "dynamic: full-precision cache whose capacity doubles between chunks; its bytes "
                     "are the allocation at that point; it stops at full_max tokens",
                     "rolling_ppl: exp(mean NLL) over consecutive windows of rolling_window tokens"],
           **outcomes.summary(), "results": results}
common.write_json(out / "streaming.json", payload)
common.write_csv(out / "streaming.csv", csv_rows)

plt = common.pyplot()
if plt is not None and results:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for i, (spec, r) in enumerate(results.items()):
    style = dict(color=f"C{i}", label=spec)
    axes[0].plot(r["positions"], np.array(r["cache_bytes"]) / 2**20, **style)
    axes[1].plot(r["positions"], r["step_ms"], **style)
    axes[2].plot(r["rolling_end"], r["rolling_ppl"], **style)
  axes[0].set(xlabel="tokens streamed", ylabel="cache MiB", title="cache memory")
  axes[1].set(xlabel="tokens streamed", ylabel="ms per token", title="step time", yscale="log")
  axes[2].set(xlabel="tokens streamed", ylabel=f"perplexity (windows of {rolling})", yscale="log",
              title="rolling perplexity")
  common.plain_log_axis(axes[1].yaxis)
  common.plain_log_axis(axes[2].yaxis)
  for ax in axes:
    ax.legend(fontsize=8)
  fig.suptitle(f"{model_name}: streaming {n_chunks * chunk} tokens")
  fig.tight_layout()
  fig.savefig(out / "streaming.png", dpi=120)
  print(f"wrote {out / 'streaming.png'}")
