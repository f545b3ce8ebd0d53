"""kvjax: KV caches as immutable pytrees, Flax decoders (Llama, Gemma 3) and a jitted decode loop.

The public names, by purpose (each group's module says more):

  Models       load(name_or_path) -> Model; DecoderModel, static_step (the model protocol);
               LlamaConfig, SMOLLM2_135M, TINY; Gemma3Config, GEMMA3_270M, TINY_GEMMA3
  Decoding     generate(model, prompts, max_new_tokens=, cache=, sampler=, draft=, ...),
               GenerateResult, Sampler, GREEDY, perplexity(model, ids, cache=), beam_search,
               accept_drafts (speculative), generate_with_prefix / PrefixStore (prefix caching),
               clear_caches(maps_above=), memory_maps, compile_stats
  Serving      Engine / serve / Request / Event / collect: continuous batching on paged:P
  Caches       make_cache(spec, config, batch, capacity, dtype), parse_spec, CacheSpec, SpecError;
               parse_layout, Layout (a spec per group of layers: "int4@global; window:256@sliding");
               the kinds: FullCache, WindowCache, H2OCache, TieredCache, QuantizedCache,
               OffloadCache, SharedCache, LowRankCache, PagedCache, LayeredCache, HybridCache
  Cache verbs  append / attend / advance / view / reset / crop / reorder / grow / nbytes /
               total_bytes (any kind); slide, quantize, evict_topk (kind-specific); supports
  Protocol     KVCache, Limited, Evicting, CacheView, CapacityError; register_kind,
               unregister_kind, registered_kinds, KindInfo (your own kind, usable by spec string)
  Compression  compress(model, ids, press, ratio=|budget=, compat=) -> cache; score_prompt; the
               presses (kvpress's methods, `kvjax.presses`: Press, register_press, make_press)
  Calibration  fit_share_maps / ShareMaps (share:G:cal), fit_lowrank / LowRankMaps (lowrank:R)
  Planning     plan(config, max_bytes, context), estimate_bytes, PlanError
"""

# Models
from kvjax.loading import Model, load
from kvjax.models.config import (GEMMA3_270M, SMOLLM2_135M, TINY, TINY_GEMMA3, Gemma3Config,
                                 LlamaConfig)
from kvjax.models.protocol import DecoderModel, static_step

# Decoding
from kvjax import bench  # noqa: F401  (kvjax.bench.run_bench is public)
from kvjax.beam import beam_search
from kvjax.decode import GenerateResult, clear_caches, compile_stats, generate, memory_maps
from kvjax.perplexity import perplexity
from kvjax.prefix import PrefixStore, generate_with_prefix
from kvjax.sampling import GREEDY, Sampler
from kvjax.speculative import accept_drafts

# Serving
from kvjax.engine import Engine, Event, Request, collect, serve

# Caches
from kvjax.spec import CacheSpec, SpecError, make_cache, parse_spec
from kvjax.layouts import Layout, parse_layout
from kvjax.caches.hybrid import HybridCache
from kvjax.caches.full import FullCache
from kvjax.caches.scored import H2OCache, evict_topk
from kvjax.caches.layered import LayeredCache
from kvjax.caches.lowrank import LowRankCache, LowRankMaps
from kvjax.caches.offload import OffloadCache
from kvjax.caches.paged import PagedCache
from kvjax.caches.quantized import QuantizedCache, quantize
from kvjax.caches.shared import ShareMaps, SharedCache
from kvjax.caches.tiered import TieredCache
from kvjax.caches.window import WindowCache, slide

# Cache verbs
from kvjax.caches.api import (advance, append, attend, crop, grow, nbytes, reorder, reset,
                              total_bytes, view)

# Protocol and registry
from kvjax.caches.base import CacheView, CapacityError, Evicting, KVCache, Limited, supports
from kvjax.caches.registry import KindInfo, register_kind, registered_kinds, unregister_kind

# Compression (presses)
from kvjax import presses  # noqa: F401
from kvjax.presses import compress, score_prompt

# Calibration and planning
from kvjax.calibrate import fit_lowrank, fit_share_maps
from kvjax.planning import PlanError, estimate_bytes, plan

__version__ = "0.1.0"

__all__ = [
    # Models
    "Model", "load", "SMOLLM2_135M", "TINY", "LlamaConfig", "Gemma3Config", "GEMMA3_270M",
    "TINY_GEMMA3", "DecoderModel", "static_step",
    # Decoding
    "beam_search", "GenerateResult", "clear_caches", "compile_stats", "generate", "memory_maps",
    "perplexity",
    "PrefixStore", "generate_with_prefix", "GREEDY", "Sampler", "accept_drafts",
    # Serving
    "Engine", "Event", "Request", "collect", "serve",
    # Caches
    "CacheSpec", "SpecError", "make_cache", "parse_spec", "FullCache", "H2OCache", "evict_topk",
    "LayeredCache", "HybridCache", "Layout", "parse_layout", "LowRankCache", "LowRankMaps",
    "OffloadCache", "PagedCache", "QuantizedCache",
    "quantize", "ShareMaps", "SharedCache", "TieredCache", "WindowCache", "slide",
    # Cache verbs
    "advance", "append", "attend", "crop", "grow", "nbytes", "reorder", "reset", "total_bytes",
    "view",
    # Protocol and registry
    "CacheView", "CapacityError", "Evicting", "KVCache", "Limited", "supports", "KindInfo",
    "register_kind", "registered_kinds", "unregister_kind",
    # Compression
    "presses", "compress", "score_prompt",
    # Calibration and planning
    "fit_lowrank", "fit_share_maps", "PlanError", "estimate_bytes", "plan",
]
