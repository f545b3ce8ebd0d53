"""Hybrid layer layouts (kvjax.layouts) and the per-group cache (kvjax.caches.hybrid).

Invariants: a layout string prints canonically and parses back equal (dicts normalize to it);
malformed layouts fail naming the problem; `layer_plan` gives Gemma 3's sliding layers window:W
unless placed explicitly; a 2-layer (sliding, global) hybrid fed ragged chunks equals a NumPy
oracle of sliding-window causal attention, for the masked full cache (`full@all`), the window
ring (the default), paged pages and int8 storage (within its error); the default layout's bytes
at 4096 tokens are what its window promises; the conformance kit holds for a HybridCache,
window rings beside full or int8 global layers included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import layouts
from kvjax.caches.full import FullCache
from kvjax.caches.hybrid import HybridCache
from kvjax.caches.paged import PagedCache
from kvjax.caches.quantized import QuantizedCache
from kvjax.caches.terms import SpecError
from kvjax.models.config import GEMMA3_270M, SMOLLM2_135M, TINY_GEMMA3
from kvjax.planning import estimate_bytes
from tests.helpers import model_logits


# ---- syntax ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, canonical", [
    ("full", "full"),
    ("int4+residual:64", "int4+residual:64"),
    ("snapkv:256+window:64@global ; window:256@sliding",
     "snapkv:256+window:64@global; window:256@sliding"),
    ("full@all", "full@all"),
    ("int8@0-8; full", "int8@0-8"),
    ("int8@5.11.17;int4", "int8@5.11.17; int4"),
    ("full@3.1.2.7", "full@1-3.7"),
])
def test_round_trip(text, canonical):
  layout = layouts.parse_layout(text)
  assert str(layout) == canonical
  assert layouts.parse_layout(str(layout)) == layout


def test_dict_normalizes_to_the_string_form():
  as_dict = layouts.parse_layout({"global": "int4", "sliding": "window:256", "*": "int8"})
  assert as_dict == layouts.parse_layout("int4@global; window:256@sliding; int8")
  assert str(as_dict) == "int4@global; window:256@sliding; int8"
  assert layouts.parse_layout({None: "full"}) == layouts.parse_layout("full")


@pytest.mark.parametrize("text, config, message", [
    ("int8@local", GEMMA3_270M, "unknown layer type 'local'"),
    ("int8@sliding", SMOLLM2_135M, "unknown layer type 'sliding'"),
    ("int8@18", GEMMA3_270M, "index 18 out of range"),
    ("int8@0-5; full@5", GEMMA3_270M, "layer 5 is placed twice"),
    ("int8@all; full@global", GEMMA3_270M, "placed twice"),
    ("@global", GEMMA3_270M, "empty spec"),
    ("int8@", GEMMA3_270M, "names no layers"),
    ("int8; full", GEMMA3_270M, "two parts without '@'"),
    ("int8@4-2", GEMMA3_270M, "runs backwards"),
    ("window:1024@sliding", GEMMA3_270M, "window:1024 is larger"),
    ("h2o:64+window:64@sliding", GEMMA3_270M, "a sliding layer takes full"),
    ("sink:4+window:64@0", GEMMA3_270M, "sink:4"),
    ("full+offload@all", GEMMA3_270M, "cannot serve it"),
])
def test_errors_name_the_problem(text, config, message):
  with pytest.raises(SpecError, match=message):
    layouts.layer_plan(text, config)


def test_specs_help_mentions_layouts(capsys):
  from kvjax import cli

  assert cli.main(["specs"]) in (0, None)
  assert "SPEC@LAYERS" in capsys.readouterr().out


# ---- resolution -----------------------------------------------------------------------------
def plan_of(spec, config):
  return {(str(s), w): layers for layers, s, w in layouts.layer_plan(spec, config)}


def test_layer_plan_gemma3_270m():
  globals_ = (5, 11, 17)
  sliding = tuple(i for i in range(18) if i not in globals_)
  assert plan_of("full", GEMMA3_270M) == {("window:512", 512): sliding, ("full", None): globals_}
  assert layouts.layer_plan(None or "full", GEMMA3_270M) == layouts.layer_plan(
      {"*": "full"}, GEMMA3_270M)
  assert plan_of("int4+residual:64", GEMMA3_270M) == {
      ("window:512", 512): sliding, ("int4+residual:64", None): globals_}
  assert plan_of("full@all", GEMMA3_270M) == {("full", 512): sliding, ("full", None): globals_}
  assert plan_of("snapkv:256+window:64@global; window:256@sliding", GEMMA3_270M) == {
      ("window:256", 512): sliding, ("snapkv:256+window:64", None): globals_}
  assert plan_of("int8@0-8; full", GEMMA3_270M) == {
      ("int8", 512): (0, 1, 2, 3, 4, 6, 7, 8), ("int8", None): (5,),
      ("window:512", 512): (9, 10, 12, 13, 14, 15, 16), ("full", None): (11, 17)}


def test_layer_plan_tiny_gemma3_and_plain_configs():
  assert plan_of("paged:4", TINY_GEMMA3) == {("window:16", 16): (0, 1, 2, 3, 4),
                                             ("paged:4", None): (5,)}
  assert plan_of("int8@5; window:8@sliding", TINY_GEMMA3) == {
      ("window:8", 16): (0, 1, 2, 3, 4), ("int8", None): (5,)}
  # a config without layer types: one group, and make_cache builds the plain cache, unchanged
  assert plan_of("int8", SMOLLM2_135M) == {("int8", None): tuple(range(30))}
  assert layouts.plan_for("int8", SMOLLM2_135M) is None
  assert type(kvjax.make_cache("full", SMOLLM2_135M.replace(n_layers=2), 1, 16)).__name__ == "FullCache"
  # every layer the same (spec, window): the plain cache of that spec, masked to the window
  all_sliding = TINY_GEMMA3.replace(n_layers=2, layer_types=("sliding", "sliding"))
  cache = kvjax.make_cache("full@all", all_sliding, 1, 32)
  assert type(cache).__name__ == "FullCache" and cache.sliding == 16


def test_bytes_of_the_default_layout_at_4096_tokens():
  small, whole = (estimate_bytes(s, GEMMA3_270M, 4096) for s in ("full", "full@all"))
  assert small <= (3 * 4096 + 15 * 512) / (18 * 4096) * whole * 1.0005
  plain = estimate_bytes("full", SMOLLM2_135M.replace(n_layers=18, n_kv_heads=1, head_dim=256), 4096)
  assert whole == plain  # one cache: the sliding layers' windows are per-layer masks


@pytest.mark.parametrize("spec", ["full", "full@all", "int4+residual:32", "paged:4", "int8@0-2"])
def test_estimate_bytes_is_what_make_cache_allocates(spec):
  cache = kvjax.make_cache(spec, TINY_GEMMA3, 2, 64)
  assert sum(cache.nbytes().values()) == estimate_bytes(spec, TINY_GEMMA3, 64, 2)


def test_merge_windows_makes_one_cache_per_masking_spec():
  """One full/quantized/paged spec over sliding and global layers is one cache with per-layer
  windows (what the engine pages); different specs, or window rings, stay separate groups."""
  from kvjax.caches import base, hybrid

  per_layer = (16,) * 5 + (None,)
  plan = layouts.layer_plan("paged:4@all", TINY_GEMMA3)
  assert hybrid.merge_windows(plan) == ((tuple(range(6)), kvjax.parse_spec("paged:4"), per_layer),)
  separate = layouts.layer_plan("paged:4", TINY_GEMMA3)  # window:16 rings beside paged:4
  assert hybrid.merge_windows(separate) == separate
  cache = kvjax.make_cache("paged:4@all", TINY_GEMMA3, 1, 32)
  assert isinstance(cache, PagedCache) and cache.sliding == per_layer
  assert base.check_sliding([8, 8], "X", 2) == 8 and base.layer_sliding(per_layer, 5) is None
  with pytest.raises(ValueError, match="entries"):
    base.check_sliding((16, None), "X", 3)
  with pytest.raises(ValueError, match="positive int"):
    base.check_sliding((16, 0), "X")


def test_slack_goes_to_window_groups_only():
  """make_cache(slack=n) (speculative decoding's main cache) widens window rings only; a plain
  kind without a ring drops it."""
  ring, full = kvjax.make_cache("full", TINY_GEMMA3, 1, 32, slack=4).groups
  assert (ring.window, ring.slack, ring.capacity, full.capacity) == (16, 4, 20, 32)
  assert kvjax.make_cache("full", SMOLLM2_135M.replace(n_layers=1), 1, 32, slack=4).capacity == 32
  assert kvjax.make_cache("window:8", SMOLLM2_135M.replace(n_layers=1), 1, 32, slack=4).ring == 12


def test_chunks_and_growth():
  from kvjax.perplexity import default_chunk

  assert default_chunk("full@all") == default_chunk("window:8@0; full") == 256
  assert default_chunk("int8@0; full") == 1
  cache = kvjax.make_cache("dynamic", TINY_GEMMA3, 1, 32)  # window on sliding, dynamic on global
  assert cache.caps.growable and kvjax.caches.base.supports(cache, "grow")
  grown = cache.grow(64)
  assert [c.capacity for c in grown.groups] == [16, 64]
  assert not kvjax.make_cache("full", TINY_GEMMA3, 1, 32).caps.growable


# ---- attention against a NumPy oracle -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TwoLayers:
  n_layers: int = 2
  n_heads: int = 2
  n_kv_heads: int = 1
  head_dim: int = 32
  layer_types: tuple = ("sliding", "global")
  sliding_window: int = 8
  dtype: str = "float32"


CONFIG = TwoLayers()
BATCH, CAPACITY = 2, 48
CHUNKS = ((5, (5, 3)), (1, (1, 0)), (5, (2, 5)), (5, (5, 5)), (1, (1, 1)), (5, (4, 0)),
          (5, (5, 5)), (1, (1, 1)), (5, (3, 5)))  # (T, n_valid per row): ragged, 27 and 25 tokens


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  out = []
  for t, n_valid in CHUNKS:
    shape = lambda heads: (CONFIG.n_layers, BATCH, t, heads, CONFIG.head_dim)
    out.append((rng.normal(size=shape(CONFIG.n_heads)).astype(np.float32),
                rng.normal(size=shape(1)).astype(np.float32),
                rng.normal(size=shape(1)).astype(np.float32), np.asarray(n_valid, np.int32)))
  return out


@functools.partial(jax.jit, static_argnames="rope")
def _step(cache, q, k, v, n_valid, rope=None):
  outs = []
  for layer in range(cache.n_layers):
    out, cache = cache.attend(layer, q[layer], k[layer], v[layer], n_valid, rope=rope)
    outs.append(out)
  return jnp.stack(outs), cache.advance(n_valid)


def _run(spec, rope=None):
  cache = kvjax.make_cache(spec, CONFIG, BATCH, CAPACITY) if isinstance(spec, str) else spec
  outs = []
  for q, k, v, n_valid in _inputs():
    out, cache = _step(cache, q, k, v, n_valid, rope=rope)
    outs.append(np.asarray(out))
  return outs, cache


def _oracle():
  """Per chunk [L, B, T, N, H]: causal attention over each row's own tokens, the sliding layer
  seeing positions p - W < j <= p only; padding queries give zeros (not compared)."""
  keys = [[[] for _ in range(BATCH)] for _ in range(CONFIG.n_layers)]
  vals = [[[] for _ in range(BATCH)] for _ in range(CONFIG.n_layers)]
  outs = []
  for q, k, v, n_valid in _inputs():
    out = np.zeros(q.shape, np.float32)
    for layer, kind in enumerate(CONFIG.layer_types):
      for b in range(BATCH):
        for t in range(n_valid[b]):
          keys[layer][b].append(k[layer, b, t, 0])
          vals[layer][b].append(v[layer, b, t, 0])
          p = len(keys[layer][b]) - 1
          low = max(0, p - CONFIG.sliding_window + 1) if kind == "sliding" else 0
          kk, vv = np.stack(keys[layer][b][low:p + 1]), np.stack(vals[layer][b][low:p + 1])
          for n in range(CONFIG.n_heads):
            s = kk @ q[layer, b, t, n] / np.sqrt(CONFIG.head_dim)
            w = np.exp(s - s.max())
            out[layer, b, t, n] = (w / w.sum()) @ vv
    outs.append(out)
  return outs


def _valid(outs):
  """The outputs of real tokens only, concatenated."""
  return np.concatenate([o[:, b, :n[b]].reshape(-1) for o, (_, _, _, n) in zip(outs, _inputs())
                         for b in range(BATCH)])


@pytest.fixture(scope="module")
def oracle():
  return _valid(_oracle())


@pytest.mark.parametrize("spec, groups, atol", [
    ("full@all", "FullCache", 1e-5),  # one spec on every layer: one cache, per-layer windows
    ("full", ("WindowCache", "FullCache"), 1e-5),
    ("paged:4", ("WindowCache", "PagedCache"), 1e-5),
    ("paged:4@all", "PagedCache", 1e-5),
    ("int8+group:4@all", "QuantizedCache", 0.05),
])
def test_matches_the_sliding_window_oracle(oracle, spec, groups, atol):
  outs, cache = _run(spec)
  if isinstance(groups, str):  # merged by `hybrid.merge_windows`
    assert type(cache).__name__ == groups and None in cache.sliding
  else:
    assert isinstance(cache, HybridCache)
    assert tuple(type(c).__name__ for c in cache.groups) == groups
  np.testing.assert_allclose(_valid(outs), oracle, atol=atol)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [27, 25])


@pytest.mark.parametrize("kind", ["full", "int8", "paged"])
def test_blocks_below_the_window_are_skipped_exactly(oracle, kind):
  """8-slot blocks, so the sliding layer's first block to read moves past 0: same answers."""
  sizes = dict(n_layers=1, batch=BATCH, kv_heads=1, head_dim=CONFIG.head_dim, capacity=CAPACITY)

  def one(sliding):
    if kind == "full":
      return FullCache.init(**sizes, block_size=8, sliding=sliding)
    if kind == "int8":
      return QuantizedCache.init(**sizes, bits=8, group=4, block_size=8, sliding=sliding)
    return PagedCache.init(**sizes, page_size=4, sliding=sliding).replace(pages_per_block=2)

  outs, _ = _run(HybridCache.of([one(None), one(CONFIG.sliding_window)], [(1,), (0,)]))
  np.testing.assert_allclose(_valid(outs), oracle, atol=1e-5 if kind != "int8" else 0.05)


def test_default_equals_full_at_all_and_views_follow_layers():
  (a, ca), (b, cb) = _run("full"), _run("full@all")
  np.testing.assert_allclose(_valid(a), _valid(b), atol=1e-5, rtol=1e-5)
  va, vb = ca.view(), cb.view()
  assert va.keys.shape == (2, BATCH, 1, CAPACITY, CONFIG.head_dim)
  # the global layer (1) holds every token in both; the sliding layer's ring its last 8
  np.testing.assert_array_equal(np.asarray(va.positions[1]), np.asarray(vb.positions[1]))
  held = np.sort(np.asarray(va.positions[0, :, 0]), axis=-1)[:, -8:]
  np.testing.assert_array_equal(held, [np.arange(19, 27), np.arange(17, 25)])
  assert ca.caps.lossless_tokens == 8 and cb.caps.lossless_tokens == CAPACITY
  assert ca.capacity == cb.capacity == CAPACITY and ca.n_layers == 2
  # crop and reorder map over the groups
  assert np.asarray(cb.crop(10).lengths).tolist() == [10, 10]
  assert np.asarray(cb.reorder(jnp.array([1, 0])).lengths).tolist() == [25, 27]


def test_default_equals_full_at_all_with_rope():
  """The ring stores keys rotated at their own positions, as the masked full cache does."""
  rope = kvjax.attention.RoPE(CONFIG.head_dim, 10_000.0)
  (a, _), (b, _) = _run("full", rope), _run("full@all", rope)
  np.testing.assert_allclose(_valid(a), _valid(b), atol=1e-5, rtol=1e-5)


def test_int8_on_the_global_layer_only(oracle):
  outs, cache = _run("int8@global")
  assert tuple(type(c).__name__ for c in cache.groups) == ("WindowCache", "QuantizedCache")
  np.testing.assert_allclose(_valid(outs), oracle, atol=0.05)
  assert not cache.caps.exact and cache.caps.error_bound > 0


# ---- the conformance kit ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", [
    "dynamic@0; full",
    pytest.param("int8+group:4@0; full", marks=pytest.mark.slow)])
def test_conformance_of_a_hybrid(check_kind, layout):
  """Two groups by index on the kit's plain 2-layer config (layer 0 one kind, layer 1 full)."""
  def factory(spec, config, *, batch, capacity, dtype):
    cache = kvjax.make_cache(layout, config, batch, max(capacity, 4), dtype)
    assert isinstance(cache, HybridCache)
    return cache

  check_kind(factory)


class _SlidingThenGlobal:
  """The kit's config seen as Gemma 3's: layer 0 sliding (window `window`), the others global."""

  def __init__(self, config, window):
    self._config, self.sliding_window = config, window
    self.layer_types = ("sliding",) + ("global",) * (config.n_layers - 1)

  def __getattr__(self, name):
    return getattr(self._config, name)


@pytest.mark.parametrize("layout, window, groups", [
    ("full", 3, ("WindowCache", "FullCache")),  # Gemma 3's default: a ring + full
    ("int8+group:16", 3, ("WindowCache", "QuantizedCache")),  # quantized global layers
    pytest.param("full", 12, ("WindowCache", "FullCache"), marks=pytest.mark.slow),  # ring > cap
])
def test_conformance_of_a_window_group_beside_a_full_group(check_kind, layout, window, groups):
  """The default Gemma layout's shape: window:W rings on the sliding layer, a limited group on
  the global one. The kit judges each layer by its group (the ring evicts, the full layer fills
  up and overflows)."""
  def factory(spec, config, *, batch, capacity, dtype):
    cache = kvjax.make_cache(layout, _SlidingThenGlobal(config, window), batch, capacity, dtype)
    assert isinstance(cache, HybridCache)
    assert tuple(type(c).__name__ for c in cache.groups) == groups
    return cache

  check_kind(factory)


def test_resolve_sizes_global_groups_by_the_rows_and_windows_by_their_budget():
  cfg = TINY_GEMMA3.replace(sliding_window=64)
  cache, plan = kvjax.runtime.resolve(cfg, "paged:4", lengths=[10, 3], extra=5, dtype=jnp.float32)
  window, pages = cache.groups
  assert window.capacity == 64 and pages.capacity == 16  # bucket(15) = 16, not the window's 64
  assert pages.n_pages == 4 + 2  # the rows' own pages: ceil(15 / 4) + ceil(8 / 4)
  assert plan.label == "paged:4" and plan.capacity == 64
  assert str(kvjax.runtime.resolve(cfg, {"global": "int8"}, lengths=[4], dtype=jnp.float32)[1]
             .label) == "int8@global"


# ---- options per group ------------------------------------------------------------------------
# TINY_GEMMA3 with three global layers that are not neighbours (1, 3, 5), as Gemma 3's 5, 11, 17:
# a share:2 group over them pairs layers 1 and 3 (layer 3 reads layer 1's cache), 5 alone.
SPREAD = TINY_GEMMA3.replace(layer_types=("sliding", "global") * 3)
FEATURES = TINY_GEMMA3.n_kv_heads * TINY_GEMMA3.head_dim


def _layer_maps(n_layers=6):
  """Identity maps whose bias k_b[l] is l everywhere, so a slice shows which rows it took."""
  from kvjax.caches.shared import ShareMaps

  ident = ShareMaps.identity(n_layers, FEATURES)
  return ident.replace(k_b=jnp.tile(jnp.arange(n_layers, dtype=jnp.float32)[:, None], (1, FEATURES)))


@pytest.mark.parametrize("config, layers", [(TINY_GEMMA3, (5,)), (SPREAD, (1, 3, 5))])
def test_share_maps_go_to_the_share_group_cut_to_its_layers(config, layers):
  """maps= is fitted per model layer: the share:2:cal group gets the rows of its own layers; the
  window group gets no maps (its kind reads none)."""
  from kvjax.caches.shared import SharedCache

  cache = kvjax.make_cache("share:2:cal", config, 1, 32, maps=_layer_maps())
  ring, shared = cache.groups
  assert type(ring).__name__ == "WindowCache" and isinstance(shared, SharedCache)
  assert cache.group_layers()[1] == layers and shared.model_layers == len(layers)
  assert shared.inner.n_layers == -(-len(layers) // 2)  # (1, 3) share one layer, 5 has its own
  np.testing.assert_array_equal(np.asarray(shared.maps.k_b[:, 0]), layers)
  assert shared.maps.k_w.shape == (len(layers), FEATURES, FEATURES)


def test_share_cal_with_identity_maps_equals_share_on_gemma3(tiny_gemma3):
  """Identity maps reproduce uncalibrated sharing (SharedCache's invariant), through a layout:
  prefill then decode on the model with spread global layers; layer 3 really reads layer 1's
  cache (its logits differ from a full cache's)."""
  from kvjax.caches.shared import ShareMaps
  from kvjax.loading import Model

  model = Model("spread", SPREAD, tiny_gemma3.params, tiny_gemma3.tokenizer)
  ids = np.arange(3, 23, dtype=np.int32) % SPREAD.vocab_size
  chunks = [8] + [1] * 12
  maps = ShareMaps.identity(SPREAD.n_layers, FEATURES)
  plain, _ = model_logits(model, kvjax.make_cache("share:2", SPREAD, 1, 32), ids, chunks)
  cal, cache = model_logits(model, kvjax.make_cache("share:2:cal", SPREAD, 1, 32, maps=maps),
                            ids, chunks)
  full, _ = model_logits(model, kvjax.make_cache("full", SPREAD, 1, 32), ids, chunks)
  np.testing.assert_allclose(cal, plain, atol=1e-4, rtol=1e-4)
  assert not np.allclose(plain, full, atol=1e-3)
  assert np.asarray(cache.lengths).tolist() == [20]


def test_options_no_group_reads_are_errors_naming_them():
  with pytest.raises(TypeError, match=r"option 'bogus' \(layers 0-4: window:16 reads absolute, block, slack; "
                                      r"layer 5: full reads sliding\)"):
    kvjax.make_cache("full", TINY_GEMMA3, 1, 32, bogus=1)
  with pytest.raises(TypeError, match="options 'bogus', 'maps'"):
    kvjax.make_cache("int8", TINY_GEMMA3, 1, 32, bogus=1, maps=_layer_maps())
  # a kind that reads the option says what is wrong with it
  with pytest.raises(SpecError, match="takes no maps; use share:2:cal"):
    kvjax.make_cache("share:2", TINY_GEMMA3, 1, 32, maps=_layer_maps())
  with pytest.raises(SpecError, match="needs calibration maps"):
    kvjax.make_cache("share:2:cal", TINY_GEMMA3, 1, 32)
  with pytest.raises(ValueError, match=r"6 rows \(the model's layers\) to pick layer 5"):
    kvjax.make_cache("share:2:cal", TINY_GEMMA3, 1, 32, maps=_layer_maps(3))
  # soft options (slack) are dropped where nothing reads them, as before
  assert kvjax.make_cache("int8@all", TINY_GEMMA3, 1, 32, slack=4).capacity == 32


def test_kinds_declare_the_options_they_read():
  from kvjax.caches import registry

  takes = lambda text: registry.lookup(kvjax.parse_spec(text).kind).options_for(kvjax.parse_spec(text))
  assert takes("full") == {"sliding"} and takes("paged:4") == {"pages", "sliding"}
  assert takes("window:8") == {"absolute", "block", "slack"} and takes("tier:8:int8") == set()
  assert takes("share:2:cal") == {"maps", "sliding"}
  assert takes("share:2+window:8") == {"maps", "absolute", "block", "slack"}
  assert takes("snapkv:4+window:4") == {"observe", "kernel", "pooling"}
  assert takes("lowrank:4") == {"maps", "keys"}


def test_a_registered_kind_gets_the_options_no_declared_group_reads():
  """A user kind whose factory takes **options without declaring them gets the rest, as before."""
  from kvjax.caches import full, registry

  seen = {}

  def factory(spec, config, *, batch, capacity, dtype, **options):
    seen.update(options)
    return full.FullCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                               head_dim=config.head_dim, capacity=capacity, dtype=dtype)

  registry.register_kind("routetest", factory)
  try:
    assert registry.lookup("routetest").options_for(None) is None
    kvjax.make_cache("routetest@global", TINY_GEMMA3, 1, 32, slack=2, color="red")
    assert seen == {"color": "red"}  # slack went to the window ring, not here
  finally:
    registry.unregister_kind("routetest")


def test_fit_share_maps_pairs_the_layers_that_share(tiny_gemma3):
  """On Gemma 3 a share:2:cal group pairs its own layers (global 1 and 3 here), so the fit maps
  layer 1's K/V to layer 3's, not layer 2's (a sliding layer) to 3's; rows of leaders, of layer 5
  (alone) and of sliding layers stay the identity; the maps then build the layout's cache."""
  from kvjax.calibrate import fit_share_maps
  from kvjax.loading import Model

  model = Model("spread", SPREAD, tiny_gemma3.params, tiny_gemma3.tokenizer)
  ids = np.arange(5, 45, dtype=np.int32)  # 40 tokens: past the sliding layers' 16-token window
  maps = fit_share_maps(model, ids, 2, window=40)
  eye = np.eye(FEATURES, dtype=np.float32)
  for layer in (0, 1, 2, 4, 5):
    np.testing.assert_array_equal(np.asarray(maps.k_w[layer]), eye)
  assert not np.allclose(np.asarray(maps.k_w[3]), eye)
  odd = fit_share_maps(model, ids, 2, window=40, layers=(0, 2, 4))  # a layout's own layers
  assert not np.allclose(np.asarray(odd.k_w[2]), eye)
  np.testing.assert_array_equal(np.asarray(odd.k_w[3]), eye)
  with pytest.raises(ValueError, match="increasing model layers"):
    fit_share_maps(model, ids, 2, window=40, layers=(3, 1))
  cache = kvjax.make_cache("share:2:cal", SPREAD, 1, 32, maps=maps)
  np.testing.assert_array_equal(np.asarray(cache.groups[1].maps.k_w), np.asarray(maps.k_w)[[1, 3, 5]])


def test_bytes_keep_the_maps_apart():
  """kv_nbytes + maps_nbytes = nbytes, the maps being the share group's 3 rows, not 6."""
  cache = kvjax.make_cache("share:2:cal", SPREAD, 1, 32, maps=_layer_maps())
  assert cache.maps_nbytes() == 2 * 3 * (FEATURES * FEATURES + FEATURES) * 4
  assert sum(cache.kv_nbytes().values()) + cache.maps_nbytes() == sum(cache.nbytes().values())
  plain = kvjax.make_cache("share:2", SPREAD, 1, 32)
  assert plain.kv_nbytes() == cache.kv_nbytes() and plain.maps_nbytes() == 0


def test_share_maps_of_the_wrong_width_are_refused_in_the_groups_terms():
  from kvjax.caches.shared import ShareMaps

  with pytest.raises(ValueError, match=r"\(3, 32, 32\) \(the 3 layers this cache serves"):
    kvjax.make_cache("share:2:cal", SPREAD, 1, 32, maps=ShareMaps.identity(6, 16))
