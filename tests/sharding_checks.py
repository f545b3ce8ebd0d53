"""Sharded-vs-unsharded checks, run in a subprocess with 8 CPU devices by tests/test_sharding.py.

  python tests/sharding_checks.py --suite tiny --out results.json

Each case decodes the same ragged batch with and without a mesh and records whether the greedy
tokens are equal, how far the perplexity NLLs are apart (fp32), the plan that was chosen, the
per-device cache bytes, and, for the decode step, the collectives in the optimized HLO and whether
the cache buffers are donated (input/output aliases). A kind that cannot be split as asked records
its error message instead.
"""

import argparse
import json
import os
import re
import sys
import time

# Keep the caller's other XLA flags (the test suite compiles at a low optimization level).
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax import decode  # noqa: E402
from kvjax import sharding as ks  # noqa: E402
from kvjax.caches.shared import ShareMaps  # noqa: E402
from kvjax.sampling import GREEDY  # noqa: E402

ALL_KINDS = ["full", "dynamic", "offload", "window:16", "sink:4+window:12", "int8",
             "int4+residual:32", "h2o:8+window:8", "int4+residual:32+h2o:8+window:32",
             "tier:8:fp32,16:int8", "share:2", "share:2+window:16", "share:2:cal"]
BATCH = ks.AxisRules(kv_heads=())
HEADS = ks.AxisRules(batch=())
SLOTS = ks.AxisRules(batch=(), kv_heads=(), slots=("model",))
BOTH = None  # the defaults: batch over data, kv heads over model


def mesh_of(text: str):
  sizes = [int(p.split("=")[1]) for p in text.split(",")]
  return ks.make_mesh(text, jax.devices()[:int(np.prod(sizes))])


def lively(model):
  """Weights scaled so that greedy decoding does not repeat one token (random init is flat)."""
  return model.with_params(jax.tree_util.tree_map(lambda p: p * 5.0 if p.ndim > 1 else p,
                                                  model.params))


def collectives(model, spec, mesh, rules, prompts, options):
  """Collectives of the compiled decode loop whose operand has the cache buffer's [.., S, H]
  trailing shape, and the number of donated (aliased) buffers."""
  batch = prompts.shape[0]
  cache = kvjax.make_cache(spec, model, batch, 64, **options)
  plan = ks.plan(mesh, model.config, batch=batch, capacity=cache.capacity, rules=rules,
                 slot_sharding_ok=ks.supports_slot_sharding(cache))
  cache = ks.shard_cache(cache, plan)
  params = ks.shard_params(model.params, plan)
  step = kvjax.static_step(model)
  tokens = ks.shard_rows(np.pad(prompts, ((0, 0), (0, 4))), plan)
  lengths = ks.shard_rows(np.full(batch, prompts.shape[1], np.int32), plan)
  state = decode._prefill(params, tokens, lengths, cache, ks.replicate(np.asarray(jax.random.PRNGKey(0)), plan),
                          np.int32(-1), model=step, sampler=GREEDY, out_size=16)
  text = decode._decode.lower(params, state, np.int32(8), np.int32(-1), np.int32(0), model=step,
                              sampler=GREEDY).compile().as_text()
  tail = f"{cache.capacity},{model.config.head_dim}]"
  big = sorted({m for op in ("all-gather", "all-to-all") for m in
                re.findall(rf"= (\S+) {op}(?:-start)?\(", text) if tail in m})
  aliases = len(re.findall(r"\{\d+\}: \(\d+, \{\}, (?:may|must)-alias\)", text))
  return big, aliases


def run_case(model, name, spec, mesh_text, rules, prompts, dense, reference, with_hlo):
  """prompts: the ragged rows generate gets; dense: [B, P] ids for the HLO check."""
  options = {}
  if spec.endswith(":cal"):
    options = {"maps": ShareMaps.identity(model.config.n_layers,
                                          model.config.n_kv_heads * model.config.head_dim)}
  row = {"model": name, "spec": spec, "mesh": mesh_text,
         "rules": None if rules is None else str(rules)}
  mesh = mesh_of(mesh_text)
  start = time.time()
  try:
    out = kvjax.generate(model, prompts, max_new_tokens=8, cache=spec, capacity=64,
                         stop_at_eos=False, mesh=mesh, rules=rules, cache_options=options)
  except ValueError as e:
    row["error"] = str(e)
    return row
  ids = np.asarray(dense[0][:10])
  ppl = kvjax.perplexity(model, ids, cache=spec, mesh=mesh, rules=rules, cache_options=options)
  row.update(tokens_equal=bool((out.tokens == reference[spec][0]).all()),
             nll_diff=float(np.abs(ppl.token_nll - reference[spec][1]).max()),
             plan=out.sharding, cache_bytes_per_device=ks.max_bytes_per_device(out.cache),
             cache_bytes=int(sum(out.cache.nbytes().values())), seconds=time.time() - start)
  if with_hlo:
    row["big_collectives"], row["aliases"] = collectives(model, spec, mesh, rules, dense, options)
  return row


def cases(suite):
  if suite == "tiny-full":  # the full cache: batch, heads, slots, both; 1, 2, 4, 8 devices
    yield from (("full", m, BOTH) for m in ("data=1", "data=2", "data=4", "data=8"))
    yield from (("full", m, HEADS) for m in ("model=2", "model=4"))
    yield from (("full", m, SLOTS) for m in ("model=2", "model=4", "model=8", "data=2,model=4"))
    yield ("full", "data=2,model=4", BOTH)
    yield ("window:16", "model=2", SLOTS)  # a kind that cannot split its slots: a clear error
  elif suite == "tiny-kinds":  # every kind: batch, heads, both
    yield from ((s, "data=8", BATCH) for s in ALL_KINDS)
    yield from ((s, "model=4", HEADS) for s in ALL_KINDS)
    yield from ((s, "data=2,model=4", BOTH) for s in ALL_KINDS)
  elif suite == "smollm2":  # 3 kv heads: every mesh falls back
    yield from (("full", m, BOTH) for m in ("data=1", "model=2", "model=4", "data=2,model=4"))
    yield from (("full", m, SLOTS) for m in ("model=2", "model=8"))
    yield from ((s, "model=4", BOTH) for s in ("sink:4+window:60", "int8", "h2o:16+window:16"))


GEMMA3_SPECS = ["full", "full@all", "int8@global"]  # the default layout: window:16 on sliding
# Gemma 3 has one kv head: nothing splits over `model`; the batch or the slots carry it.
GEMMA3_CASES = [("data=8", None),  # batch over data (10 rows padded to 16)
                ("data=2,model=4", None),  # 10 rows do not divide 8: slots over model (fallback)
                ("model=4", SLOTS),  # slots asked for: full groups split, the others stay whole
                ("data=2,model=4", ks.AxisRules(batch=("data", "model"), kv_heads=()))]  # 16 rows


def gemma3(with_hlo: bool) -> list[dict]:
  """tiny-gemma3 (5 sliding layers with a 16-token window, 1 global, 1 kv head) with its default
  layout, full@all and int8@global: a ragged batch of 10 rows of 12..30 tokens (longer than the
  window) decoded with and without a mesh, and the perplexity of 3 documents of 26..30 tokens."""
  model = lively(kvjax.load("tiny-gemma3"))
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, 250, 12 + 2 * i).astype(np.int32)) for i in range(10)]
  docs = prompts[7:]
  rows = []
  for spec in GEMMA3_SPECS:
    start = time.time()
    ref = kvjax.generate(model, prompts, max_new_tokens=8, cache=spec, capacity=64,
                         stop_at_eos=False)
    ref_ppl = kvjax.perplexity(model, docs, cache=spec)
    ref_seconds = time.time() - start
    for mesh_text, rules in GEMMA3_CASES:
      row = {"model": "tiny-gemma3", "spec": spec, "mesh": mesh_text,
             "rules": None if rules is None else str(rules), "reference_seconds": ref_seconds}
      mesh = mesh_of(mesh_text)
      start = time.time()
      try:
        out = kvjax.generate(model, prompts, max_new_tokens=8, cache=spec, capacity=64,
                             stop_at_eos=False, mesh=mesh, rules=rules)
      except ValueError as e:
        row["error"] = str(e)
        rows.append(row)
        print(json.dumps(row), flush=True)
        continue
      ppl = kvjax.perplexity(model, docs, cache=spec, mesh=mesh, rules=rules)
      groups = getattr(out.cache, "groups", (out.cache,))
      row.update(tokens_equal=bool((out.tokens == ref.tokens).all()),
                 nll_diff=max(float(np.abs(a.token_nll - b.token_nll).max())
                              for a, b in zip(ppl, ref_ppl)),
                 plan=out.sharding, slot_split=[getattr(g, "slot_sharding", None) is not None
                                                for g in groups],
                 cache_bytes_per_device=ks.max_bytes_per_device(out.cache),
                 cache_bytes=int(sum(out.cache.nbytes().values())), seconds=time.time() - start)
      rows.append(row)
      print(json.dumps(row), flush=True)
      kvjax.clear_caches()
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--suite", choices=["tiny-full", "tiny-kinds", "smollm2", "gemma3"],
                      default="tiny-full")
  parser.add_argument("--out", required=True)
  parser.add_argument("--hlo", action="store_true", help="also inspect the compiled decode loop")
  args = parser.parse_args()
  if args.suite == "gemma3":
    with open(args.out, "w") as f:
      json.dump(gemma3(args.hlo), f)
    return
  if args.suite.startswith("tiny"):
    model, name = lively(kvjax.load("tiny")), "tiny"
  else:
    model, name = kvjax.load("smollm2-135m"), "smollm2-135m"
  prompts = np.random.default_rng(1).integers(0, 250, (8, 12)).astype(np.int32)
  prompts_ragged = [list(p[: 6 + i % 6]) for i, p in enumerate(prompts)]
  reference = {}
  rows = []
  for spec, mesh_text, rules in cases(args.suite):
    if spec not in reference:
      options = {}
      if spec.endswith(":cal"):
        options = {"maps": ShareMaps.identity(model.config.n_layers,
                                              model.config.n_kv_heads * model.config.head_dim)}
      ref = kvjax.generate(model, prompts_ragged, max_new_tokens=8, cache=spec, capacity=64,
                           stop_at_eos=False, cache_options=options)
      ref_ppl = kvjax.perplexity(model, prompts[0][:10], cache=spec, cache_options=options)
      reference[spec] = (ref.tokens, ref_ppl.token_nll)
    hlo = args.hlo and spec == "full"
    rows.append(run_case(model, name, spec, mesh_text, rules, prompts_ragged, prompts, reference,
                         hlo))
    print(json.dumps(rows[-1]), flush=True)
    # Each mesh compiles its own executables and places its own copy of the weights per device;
    # dropping them between cases keeps the peak at one case's worth (SmolLM2 on 8 devices piled
    # up to 17 GB without this, and CI's second pytest worker pushed the box past 24 GB).
    kvjax.clear_caches()
  if args.suite == "tiny-full":
    rows.append(recompiles(model, prompts_ragged))
    rows.append(padded_batch(model, prompts_ragged[:3]))
  with open(args.out, "w") as f:
    json.dump(rows, f)


def recompiles(model, prompts):
  """A second generate on an equal mesh built anew (fresh Mesh and NamedSharding objects), and
  with other prompts of the same buckets, compiles nothing."""
  kvjax.generate(model, prompts, max_new_tokens=8, capacity=64, mesh=mesh_of("data=2,model=4"))
  before = kvjax.compile_stats()["n_compiles"]
  kvjax.generate(model, [p[::-1] for p in prompts], max_new_tokens=7, capacity=64,
                 mesh=mesh_of("data=2,model=4"))
  return {"check": "recompiles", "compiles": kvjax.compile_stats()["n_compiles"] - before}


def padded_batch(model, prompts):
  """3 prompts on a data=8 mesh: padded to 8 rows, each device holds one row's cache (not all
  three replicated), and the tokens and NLLs are those of one device."""
  mesh = mesh_of("data=8")
  ref = kvjax.generate(model, prompts, max_new_tokens=8, capacity=64, stop_at_eos=False)
  out = kvjax.generate(model, prompts, max_new_tokens=8, capacity=64, stop_at_eos=False, mesh=mesh)
  ref_ppl = kvjax.perplexity(model, prompts)
  ppl = kvjax.perplexity(model, prompts, mesh=mesh)
  return {"check": "padded-batch", "tokens_equal": bool((out.tokens == ref.tokens).all()),
          "shape": list(out.tokens.shape), "plan": out.sharding,
          "nll_diff": max(float(np.abs(a.token_nll - b.token_nll).max()) for a, b in zip(ppl, ref_ppl)),
          "cache_rows": out.cache.batch, "cache_bytes_per_device": ks.max_bytes_per_device(out.cache),
          "cache_bytes": int(sum(out.cache.nbytes().values()))}


if __name__ == "__main__":
  main()
