"""kvjax: KV caches as immutable pytrees, a Flax Llama decoder and a jitted decode loop.

Public API:
  load(name_or_path)                       -> Model (config, params, tokenizer)
  generate(model, prompts, max_new_tokens=, cache=, sampler=, ...)
  perplexity(model, ids, cache=)
  make_cache(spec, config, batch, capacity), parse_spec(spec), CacheSpec
  append / view / reset / crop / reorder / grow / nbytes       (any cache kind)
"""

from kvjax import bench
from kvjax.caches.api import append, crop, grow, nbytes, reorder, reset, total_bytes, view
from kvjax.caches.base import CacheView, CapacityError
from kvjax.caches.full import FullCache
from kvjax.decode import GenerateResult, compile_stats, generate
from kvjax.loading import Model, load
from kvjax.models.config import SMOLLM2_135M, TINY, LlamaConfig
from kvjax.perplexity import perplexity
from kvjax.sampling import GREEDY, Sampler
from kvjax.spec import CacheSpec, SpecError, make_cache, parse_spec

__version__ = "0.1.0"

__all__ = [
    "append", "crop", "grow", "nbytes", "reorder", "reset", "total_bytes", "view",
    "CacheView", "CapacityError", "FullCache", "GenerateResult", "compile_stats", "generate",
    "Model", "load", "SMOLLM2_135M", "TINY", "LlamaConfig", "perplexity", "GREEDY", "Sampler",
    "CacheSpec", "SpecError", "make_cache", "parse_spec",
]
