"""`kvjax.kernels.route`: full and paged caches with kernel="pallas" decode through the Pallas
kernels (interpret mode on this CPU) and equal kernel="jnp" step by step, and end to end through
`kvjax.generate` on the tiny model.

Tolerances: attention outputs within 2e-5 (float32); greedy tokens identical on the tiny model
(float32). Fast lane: one paged and one full (windowed) cache
for a few decode steps; generate end to end and MQA are slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import kernels
from kvjax.caches import codec as codec_lib
from kvjax.caches.full import FullCache
from kvjax.caches.paged import PagedCache
from kvjax.kernels import route
from kvjax.kernels.select import INTERPRET, TPU_PAGED, Choice
from tests.kernels import helpers

TOL = 2e-5


@jax.jit
def _attend(cache, q, k, v, n_valid):
  out, cache = cache.attend(0, q, k, v, n_valid)
  return out, cache.advance(n_valid)


def _decode_outputs(cache, kernel, *, group=2, prompt=(5, 13), steps=3, seed=0):
  """Attention outputs [steps, B, 1, N, H] of a ragged prefill then `steps` one-token steps
  (the second row idle, n_valid 0, on the last step)."""
  cache = kernels.with_kernel(cache, kernel)
  rng = np.random.default_rng(seed)
  b, kh, h = cache.batch, cache.kv_heads, cache.head_dim

  def draw(t):
    return (jnp.asarray(rng.standard_normal((b, t, kh * group, h)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32))

  _, cache = _attend(cache, *draw(max(prompt)), jnp.asarray(prompt, jnp.int32))
  outs = []
  for s in range(steps):
    n_valid = jnp.asarray([1] + [0 if s == steps - 1 else 1] * (b - 1), jnp.int32)
    out, cache = _attend(cache, *draw(1), n_valid)
    outs.append(out)
  return np.stack(outs)


def _assert_kernel_equals_jnp(cache, **kw):
  assert not kernels.with_kernel(cache, "pallas").choice(1).is_jnp  # the kernel really runs
  np.testing.assert_allclose(_decode_outputs(cache, "pallas", **kw),
                             _decode_outputs(cache, "jnp", **kw), atol=TOL)


def test_paged_decode_steps_equal_jnp():
  cache = PagedCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=32, page_size=4)
  assert kernels.with_kernel(cache, "pallas").choice(1).name.endswith(INTERPRET)
  _assert_kernel_equals_jnp(cache)


def test_full_window_decode_steps_equal_jnp():
  cache = FullCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=32, sliding=6)
  _assert_kernel_equals_jnp(cache)


@pytest.mark.slow
def test_fp8_paged_decode_steps_equal_jnp():
  # fp8 pages (a scale per token) run the GPU kernel with its scale inputs
  fp8 = codec_lib.Codec(format="fp8_e4m3")
  _assert_kernel_equals_jnp(PagedCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16,
                                            capacity=32, page_size=4, codec=fp8))


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,group", [(1, 2), (2, 4)])
def test_mqa_and_wider_groups_equal_jnp(kv_heads, group):
  paged = PagedCache.init(n_layers=1, batch=3, kv_heads=kv_heads, head_dim=32, capacity=64,
                          page_size=8)
  full = FullCache.init(n_layers=1, batch=3, kv_heads=kv_heads, head_dim=32, capacity=64)
  for cache in (paged, full):
    _assert_kernel_equals_jnp(cache, group=group, prompt=(1, 17, 40), steps=2)


def test_a_tpu_route_runs_the_tpu_kernel_interpreted():
  # the route layer with a hand-made choice: the TPU kernel (interpret mode) over clamped tables
  rng = np.random.default_rng(0)
  q, qg = helpers.queries(rng, 2, 1, 2, 128)
  k_pages, v_pages = helpers.pool(rng, 1, 9, 4, 128, jnp.bfloat16)
  table = helpers.table_of(rng, 2, 4, 8).at[0, 2:].set(9)  # row 0 holds 2 pages: "no page" after
  lengths = jnp.asarray([7, 16], jnp.int32)
  choice = Choice(routes=(("cpu", TPU_PAGED + INTERPRET),), name=TPU_PAGED + INTERPRET)
  out = route.paged_decode(choice, qg, k_pages, v_pages, table, lengths, fallback=None)[:, 0]
  clamped = jnp.minimum(table, 8)
  want = helpers.reference(qg, helpers.dense_of_pages(k_pages, clamped).astype(jnp.float32),
                           helpers.dense_of_pages(v_pages, clamped).astype(jnp.float32), lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["full", "paged:16"])
def test_generate_on_tiny_auto_is_jnp_and_pallas_equals_it(spec):
  model = kvjax.load("tiny")
  prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
  runs = {k: kvjax.generate(model, prompts, max_new_tokens=6, cache=spec, kernel=k)
          for k in ("auto", "jnp", "pallas")}
  np.testing.assert_array_equal(runs["auto"].tokens, runs["jnp"].tokens)
  np.testing.assert_array_equal(runs["pallas"].tokens, runs["jnp"].tokens)
  assert kernels.describe(runs["pallas"].cache)["decode"].endswith(INTERPRET)
  assert runs["auto"].cache.kernel == "auto"


@pytest.mark.slow
def test_engine_perplexity_and_a_hybrid_cache_take_the_setting():
  from kvjax.engine import Engine, Request, collect

  model = kvjax.load("tiny")
  reqs = [Request(ids=[5, 6, 7, 8, 9], max_new_tokens=4, id=0), Request(ids=[3, 4], max_new_tokens=5, id=1)]
  runs = {}
  for kernel in ("jnp", "pallas"):
    engine = Engine(model, rows=2, capacity=32, cache="paged:16", kernel=kernel)
    assert kernels.describe(engine.cache)["kernel"] == kernel
    runs[kernel] = collect(engine.run(reqs))
  assert runs["pallas"] == runs["jnp"]
  # perplexity one token a chunk: every step is a decode step, through the kernel
  ids = list(range(3, 20))
  nll = {k: kvjax.perplexity(model, ids, cache="paged:16", chunk=1, kernel=k).token_nll
         for k in ("jnp", "pallas")}
  np.testing.assert_allclose(nll["pallas"], nll["jnp"], atol=1e-4)
  # a hybrid cache (sliding and global layers): every cache inside with a setting gets it
  gemma = kvjax.load("tiny-gemma3")
  hybrid = kvjax.make_cache("full", gemma, 1, 64, kernel="pallas")
  inner = [c for c in jax.tree_util.tree_leaves(hybrid, is_leaf=lambda x: hasattr(x, "kernel"))
           if hasattr(c, "kernel")]
  assert inner and all(c.kernel == "pallas" for c in inner)
  # the Engine's window pool and global pool on Gemma: the window pool stays on jnp, and says why
  engine = Engine(gemma, rows=2, capacity=32, cache="paged:16", kernel="pallas")
  pools = [c for c in jax.tree_util.tree_leaves(engine.cache, is_leaf=lambda x: hasattr(x, "kernel"))
           if hasattr(c, "kernel")]
  names = sorted(c.choice(1).name for c in pools)
  assert names == ["jnp.blockwise", "pallas.gpu.paged_attention+interpret"]
  assert any("sliding window" in c.choice(1).reason for c in pools)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["paged:8", "paged:8+fp8", "full"])
def test_conformance_kit_with_pallas(spec):
  # the kit's attention and model-forward invariants decode one token at a time, so the kernel
  # runs (interpreted) against the kit's oracle; the kit has no sliding-window oracle (a window is
  # checked against jnp above)
  from kvjax.testing import check_cache_kind

  check_cache_kind(spec, options={"kernel": "pallas"}, head_dim=16, capacity=16, quick=True)


SLOT_SHARDED = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import numpy as np, kvjax
from kvjax import sharding as ks
model = kvjax.load("tiny")
mesh = ks.make_mesh("model=2")
rules = ks.AxisRules(batch=(), kv_heads=(), slots=("model",))
runs = {k: kvjax.generate(model, [[5, 6, 7, 8, 9, 10, 11], [3, 4]], max_new_tokens=5, cache="full",
                          capacity=64, mesh=mesh, rules=rules, kernel=k) for k in ("jnp", "pallas")}
cache = runs["pallas"].cache
assert cache.slot_sharding is not None, "the slots should be split"
assert not cache.choice(1).is_jnp, cache.choice(1)
np.testing.assert_array_equal(runs["pallas"].tokens, runs["jnp"].tokens)
print("ok", cache.choice(1).name)
"""


@pytest.mark.slow
def test_slot_sharded_decode_combines_the_kernel_residuals():
  # two CPU devices (a subprocess: this process has one), slots split over them; each device's
  # statistics come from the interpreted GPU decode kernel's residuals, merged across devices
  import subprocess
  import sys

  proc = subprocess.run([sys.executable, "-c", SLOT_SHARDED], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "ok pallas.gpu.decode_attention+interpret" in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-4000:])
