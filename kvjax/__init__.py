"""kvjax: KV caches as immutable pytrees, a Flax Llama decoder and a jitted decode loop.

Public API:
  load(name_or_path)                       -> Model (config, params, tokenizer)
  generate(model, prompts, max_new_tokens=, cache=, sampler=, ...)
  perplexity(model, ids, cache=)
  make_cache(spec, config, batch, capacity), parse_spec(spec), CacheSpec
  append / view / reset / crop / reorder / grow / nbytes       (any cache kind)
  slide (window/sinks), quantize (int8/4/3/2), evict_topk (H2O)  (kind-specific verbs)
  plan(config, max_bytes, context)         -> the most faithful cache spec that fits a budget
  generate_with_prefix / PrefixStore       prefix caching
"""

from kvjax import bench  # noqa: F401  (kvjax.bench.run_bench is public)
from kvjax.caches.api import append, crop, grow, nbytes, reorder, reset, total_bytes, view
from kvjax.caches.base import CacheView, CapacityError
from kvjax.caches.full import FullCache
from kvjax.decode import GenerateResult, compile_stats, generate
from kvjax.loading import Model, load
from kvjax.models.config import SMOLLM2_135M, TINY, LlamaConfig
from kvjax.perplexity import perplexity
from kvjax.sampling import GREEDY, Sampler
from kvjax.spec import CacheSpec, SpecError, make_cache, parse_spec
from kvjax.caches.window import WindowCache, slide
from kvjax.caches.h2o import H2OCache, evict_topk
from kvjax.caches.tiered import TieredCache
from kvjax.caches.quantized import QuantizedCache, quantize
from kvjax.caches.offload import OffloadCache
from kvjax.caches.shared import ShareMaps, SharedCache
from kvjax.calibrate import fit_share_maps
from kvjax.prefix import PrefixStore, generate_with_prefix
from kvjax.planning import PlanError, estimate_bytes, plan

__version__ = "0.1.0"

__all__ = [
    "append", "crop", "grow", "nbytes", "reorder", "reset", "total_bytes", "view",
    "CacheView", "CapacityError", "FullCache", "GenerateResult", "compile_stats", "generate",
    "Model", "load", "SMOLLM2_135M", "TINY", "LlamaConfig", "perplexity", "GREEDY", "Sampler",
    "CacheSpec", "SpecError", "make_cache", "parse_spec",
    "WindowCache", "slide", "H2OCache", "evict_topk", "TieredCache", "QuantizedCache", "quantize",
    "OffloadCache", "ShareMaps", "SharedCache", "fit_share_maps", "PrefixStore",
    "generate_with_prefix", "PlanError", "estimate_bytes", "plan",
]
