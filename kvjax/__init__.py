"""kvjax: KV caches as immutable pytrees, a Flax Llama decoder and a jitted decode loop.

Public API:
  load(name_or_path)                       -> Model (params, config, step, tokenizer)
  generate(model, prompts, max_new_tokens=, cache=, sampler=, ...)   any model with a step function
  generate(..., draft=SPEC, draft_tokens=k)  self-speculative decoding (kvjax.speculative)
  perplexity(model, ids or [docs], cache=)
  make_cache(spec, config, batch, capacity, dtype), parse_spec(spec), CacheSpec
  cache.attend(layer, q, k, v, n_valid, rope=, scale=) / cache.advance(n_valid)   inside a model
  append / view / reset / crop / reorder / grow / nbytes       (any cache kind)
  slide (window/sinks), quantize (int8/4/3/2), evict_topk (H2O/SnapKV)  (kind-specific verbs)
  LayeredCache                             one cache per layer (per-layer budgets, +pyramid)
  register_kind(name, factory, ...)        a cache kind of your own, usable by spec string
  plan(config, max_bytes, context)         -> the most faithful cache spec that fits a budget
  generate_with_prefix / PrefixStore       prefix caching
  Engine / serve / Request / collect       continuous batching on a paged:P cache (kvjax.engine)
  beam_search(model, prompt, beams=)       beam search; on pages the beams share their prefix
  KVCache, DecoderModel                    the two protocols (kvjax.caches.base, kvjax.models.protocol)
"""

from kvjax import bench  # noqa: F401  (kvjax.bench.run_bench is public)
from kvjax.caches.api import (advance, append, attend, crop, grow, nbytes, reorder, reset,
                              total_bytes, view)
from kvjax.caches.base import CacheView, CapacityError, Evicting, KVCache, Limited, supports
from kvjax.caches.full import FullCache
from kvjax.caches.registry import KindInfo, register_kind, registered_kinds, unregister_kind
from kvjax.decode import GenerateResult, clear_caches, compile_stats, generate
from kvjax.loading import Model, load
from kvjax.models.protocol import DecoderModel, static_step
from kvjax.models.config import SMOLLM2_135M, TINY, LlamaConfig
from kvjax.perplexity import perplexity
from kvjax.sampling import GREEDY, Sampler
from kvjax.spec import CacheSpec, SpecError, make_cache, parse_spec
from kvjax.caches.window import WindowCache, slide
from kvjax.caches.h2o import H2OCache, evict_topk
from kvjax.caches.layered import LayeredCache
from kvjax.speculative import accept_drafts
from kvjax.caches.tiered import TieredCache
from kvjax.caches.quantized import QuantizedCache, quantize
from kvjax.caches.offload import OffloadCache
from kvjax.caches.shared import ShareMaps, SharedCache
from kvjax.caches.lowrank import LowRankCache, LowRankMaps
from kvjax.calibrate import fit_lowrank, fit_share_maps
from kvjax.prefix import PrefixStore, generate_with_prefix
from kvjax.caches.paged import PagedCache
from kvjax.engine import Engine, Event, Request, collect, serve
from kvjax.beam import beam_search
from kvjax.planning import PlanError, estimate_bytes, plan

__version__ = "0.1.0"

__all__ = [
    "advance", "append", "attend", "crop", "grow", "nbytes", "reorder", "reset", "total_bytes",
    "view", "CacheView", "CapacityError", "Evicting", "KVCache", "Limited", "supports",
    "KindInfo", "register_kind", "registered_kinds", "unregister_kind", "DecoderModel",
    "static_step", "clear_caches",
    "FullCache", "GenerateResult", "compile_stats", "generate",
    "Model", "load", "SMOLLM2_135M", "TINY", "LlamaConfig", "perplexity", "GREEDY", "Sampler",
    "CacheSpec", "SpecError", "make_cache", "parse_spec",
    "WindowCache", "slide", "H2OCache", "evict_topk", "LayeredCache", "accept_drafts", "TieredCache", "QuantizedCache", "quantize",
    "OffloadCache", "ShareMaps", "SharedCache", "fit_share_maps", "LowRankCache", "LowRankMaps", "fit_lowrank",
    "PrefixStore", "PagedCache", "Engine", "Event", "Request", "collect", "serve", "beam_search",
    "generate_with_prefix", "PlanError", "estimate_bytes", "plan",
]
