"""`kvjax bench`: decode throughput of one configuration, compile and prefill excluded."""

from __future__ import annotations

import resource

import numpy as np

from kvjax import decode, kernels, sharding
from kvjax.models.protocol import model_dtype
from kvjax.sampling import GREEDY

# A fixed, ordinary English prompt; repeated to reach the requested length.
BENCH_TEXT = ("The history of the printing press begins in the fifteenth century, when craftsmen in "
              "Europe learned to cast movable metal type and to press ink onto paper with screws "
              "borrowed from wine makers. Within fifty years, books were cheaper and more numerous "
              "than ever before, and ideas travelled faster than any single scribe could copy them. ")


def bench_prompt(tokenizer, prompt_len: int, vocab_size: int | None = None) -> list[int]:
  """The bench text's first `prompt_len` token ids (repeated as needed); without a tokenizer,
  fixed pseudo-random ids below `vocab_size`."""
  if tokenizer is None:
    return np.random.default_rng(0).integers(0, vocab_size, prompt_len).tolist()
  ids: list[int] = []
  while len(ids) < prompt_len:
    ids += tokenizer.encode(BENCH_TEXT)
  return ids[:prompt_len]


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(model, *, batch: int = 1, prompt_len: int = 32, new_tokens: int = 128,
              capacity: int | None = None, cache: str = "full", repeats: int = 2, mesh=None,
              rules=None, draft: str | None = None, draft_tokens: int = 4,
              kernel: str = "auto") -> dict:
  """Runs generate `repeats` times (the first compiles) and reports the best decode run
  (`draft`: self-speculative decoding over that cache spec, `draft_tokens` per round).

  model: any model of `kvjax.models.protocol` (a tokenizer is optional). kernel: the
  attention kernel setting (`kvjax.kernels`); the result names the kernels that ran
  ("kernel_decode", "kernel_prefill")."""
  prompt = bench_prompt(getattr(model, "tokenizer", None), prompt_len, model.config.vocab_size)
  prompts = [prompt] * batch
  before = decode.compile_stats()
  best = None
  for _ in range(repeats):
    result = decode.generate(model, prompts, max_new_tokens=new_tokens, cache=cache,
                             capacity=capacity, sampler=GREEDY, stop_at_eos=False, mesh=mesh,
                             rules=rules, draft=draft, draft_tokens=draft_tokens, kernel=kernel)
    if best is None or result.decode_tok_per_s > best.decode_tok_per_s:
      best = result
  after = decode.compile_stats()
  cache_bytes, plan = best.cache_bytes, best.cache_plan  # plan: how `kvjax.runtime` sized it
  chosen = kernels.describe(best.cache)
  return {
      "model": getattr(model, "name", type(model).__name__), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "capacity": plan.capacity if plan else None, "pages": plan.pages if plan else None,
      "cache": cache,
      "dtype": str(np.dtype(model_dtype(model))),
      "kernel": kernel,
      "kernel_decode": chosen["decode"], "kernel_prefill": chosen["prefill"],
      "decode_tok_per_s": best.decode_tok_per_s,
      "decode_s": best.decode_s,
      "prefill_s": best.prefill_s,
      "compile_s": after["compile_s"] - before["compile_s"],
      "n_compiles": after["n_compiles"] - before["n_compiles"],
      "cache_bytes": sum(cache_bytes.values()),
      "cache_bytes_by_kind": cache_bytes,
      "cache_bytes_per_device": sharding.max_bytes_per_device(best.cache),
      "devices": 1 if mesh is None else int(mesh.size),
      "sharding": best.sharding,
      "peak_rss_bytes": peak_rss_bytes(),
      "draft": draft, "draft_tokens": draft_tokens if draft else None,
      "draft_acceptance": best.draft_acceptance,
  }
