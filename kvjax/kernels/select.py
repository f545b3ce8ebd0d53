"""The resolver: which kernel one attention call runs, per (platform, kind, shape), by name.

A cache's `kernel` field (static) is one of `KERNELS`:

* "auto" (default): the kernel kvjax picks for the platform the step is traced on
  (`jax.default_backend()`): on CPU always the jnp path (measured fastest there; the program is
  exactly the one kvjax built before the kernel layer existed), on GPU and TPU the Pallas kernel
  where one applies (and on GPU `jax.nn.dot_product_attention` for a full cache's prefill);
* "jnp": today's jnp kernels everywhere;
* "pallas": the Pallas kernel for each platform the step is lowered for (a
  `lax.platform_dependent`: `jax.export` for `cuda` or `tpu` lowers the real kernel), and on CPU the
  GPU kernel in Pallas interpret mode (slow: for checking that the kernel equals the jnp path),
  and a full cache's prefill through `dot_product_attention(implementation="xla")`.

Where no kernel applies the route is jnp and the `Choice` says why (`reason`):

* several queries per row (prefill chunks, speculative verification) go to
  `jax.nn.dot_product_attention` for the full kind on cuda (and its "xla" implementation under
  "pallas" on CPU): a full cache's layer buffer holds the cached prefix and the chunk, so the whole
  buffer is the keys under a boolean mask. The paged kind stays on jnp: the decode kernels take no
  T axis, `dot_product_attention` wants contiguous keys (a row's pages would have to be gathered
  first), and `ragged_paged_attention` (TPU) wants a [pages, page_size, 2K, H] pool with keys and
  values interleaved, not kvjax's [K, pages, page_size, H] per stream (a per-step conversion would
  copy the pool). TPU stays on jnp for prefill (splash attention wants 128-token blocks and
  128-wide heads, and its masks are static); slots split over devices too (each device would need
  its softmax statistics, which the API does not return in kvjax's form);
* kvjax's intN pages (codes with group scales and zero points): no kernel takes those. fp8 pages
  (float8 codes, one scale per token) go to the GPU paged kernel, whose `k_scales_pages` /
  `v_scales_pages` are exactly per-token scales; the TPU kernel's scales are for int8 codes, so
  fp8 stays on jnp there;
* a sliding window on the paged kind (the paged kernels mask by length only; the contiguous GPU
  kernel takes the window as its `start_idx`). Slots split over devices do take the contiguous
  GPU kernel: each device's statistics come from its residuals;
* block constraints: GPU (Triton) blocks must be powers of two of at least 16 tokens, TPU (Mosaic)
  wants a head dim that is a multiple of 128 (its lane width); the TPU has no contiguous decode
  kernel in JAX.
"""

from __future__ import annotations

import dataclasses

import jax

from kvjax.kernels import gpu, tpu
from kvjax.kernels.jnp import NAME as JNP

KERNELS = ("auto", "jnp", "pallas")
GPU_PAGED = "pallas.gpu.paged_attention"
GPU_DECODE = "pallas.gpu.decode_attention"
TPU_PAGED = "pallas.tpu.paged_attention"
DPA = "jax.nn.dot_product_attention"  # prefill on a full cache (implementation=None)
XLA = "+xla"  # the same with implementation="xla" (the CPU check route)
# dot_product_attention's XLA implementation (what implementation=None is in this JAX) builds the
# [B, N, T, S] logits at once; above T * S = 2**22 (16 MiB of fp32 per row and head) a chunk stays
# on the jnp path, which holds one block of slots at a time. Not measured on a GPU: a guard.
PREFILL_MAX_LOGITS = 2**22
INTERPRET = "+interpret"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One attention call's kernel: `routes` ((platform, route name), ...); `name`: the route of
  the platform it was chosen on (what `kvjax bench --json` reports); `reason`: why the jnp path,
  when a route is jnp. A route name ending in "+interpret" runs that kernel in Pallas interpret
  mode; "jax.nn.dot_product_attention+xla" runs that API with implementation="xla"."""

  routes: tuple
  name: str
  reason: str = ""

  @property
  def is_jnp(self) -> bool:
    return all(route == JNP for _, route in self.routes)


def check_kernel(kernel) -> str:
  """`kernel`, or a ValueError naming the allowed values."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {', '.join(repr(k) for k in KERNELS)}; got {kernel!r}")
  return kernel


def platform() -> str:
  """The platform steps are traced on now: "cpu", "cuda" (any GPU backend) or "tpu"."""
  backend = jax.default_backend()
  return "cuda" if backend in ("gpu", "cuda", "rocm") else backend


def _shared_reason(kind: str, queries: int, window, storage: str, sharded: bool = False) -> str:
  """Why no platform's kernel applies to this call ("" when one may)."""
  if queries != 1:
    if kind != "full":
      return (f"{queries} queries per row: the decode kernels take one and "
              "dot_product_attention wants contiguous keys (prefill stays on jnp)")
    if storage != "float":
      return f"{queries} queries per row over {storage} codes: no kernel takes them"
    if sharded:
      return (f"{queries} queries per row with slots split over devices: dot_product_attention "
              "returns no softmax statistics to merge")
    return ""
  if storage not in ("float", "fp8") or (storage == "fp8" and kind != "paged"):
    return f"kvjax's own {storage} codes (group scales and zero points): no kernel takes them"
  if kind == "paged" and window is not None:
    return "sliding window: the paged kernels mask by length only"
  if kind not in ("paged", "full"):
    return f"no Pallas kernel for the {kind} kind"
  return ""


def _route(target: str, kind: str, *, queries: int, head_dim: int, slots, pages_per_row,
           page_size, storage: str) -> tuple:
  """(route, reason) of one platform ("cuda", "tpu") for a call every kernel could take."""
  if queries != 1:  # a full cache's prefill chunk (the only kind `_shared_reason` lets through)
    if slots and queries * slots > PREFILL_MAX_LOGITS:
      return JNP, (f"{queries} queries x {slots} slots: dot_product_attention (XLA) would hold "
                   f"[B, N, {queries}, {slots}] logits at once; the blockwise jnp path does not")
    if target == "cuda":
      return DPA, ""
    if target == "tpu":
      return JNP, "TPU: splash attention wants 128-token blocks, 128-wide heads and static masks"
    return JNP, f"{target}: jnp"
  if target == "cuda":
    if kind == "paged":
      if gpu.paged_blocks(pages_per_row, page_size, head_dim) is None:
        return JNP, (f"GPU: no power-of-two compute block of >= 16 tokens divides {pages_per_row} "
                     f"pages of {page_size} (or head dim {head_dim} is not a power of two >= 16)")
      return GPU_PAGED, ""
    if gpu.decode_blocks(slots, head_dim) is None:
      return JNP, (f"GPU: {slots} slots do not split into power-of-two blocks of >= 16 (or head dim "
                   f"{head_dim} is not a power of two >= 16)")
    return GPU_DECODE, ""
  if target == "tpu":
    if kind == "full":
      return JNP, "TPU: JAX has no contiguous decode kernel"
    if storage == "fp8":
      return JNP, "TPU: the paged kernel's scales are for int8 codes, not fp8"
    if tpu.paged_blocks(pages_per_row, page_size, head_dim) is None:
      return JNP, f"TPU: head dim {head_dim} is not a multiple of 128 (the lane width)"
    return TPU_PAGED, ""
  return JNP, f"{target}: jnp"


def choose(kernel: str, kind: str, *, queries: int, head_dim: int, window=None,
           storage: str = "float", slots: int | None = None,
           pages_per_row: int | None = None, page_size: int | None = None,
           sharded: bool = False, on: str | None = None) -> Choice:
  """The kernel of one attention call.

  kernel: "auto" | "jnp" | "pallas" (the cache's setting). kind: "paged" or "full" (others: jnp).
  queries: T, query tokens per row of this call. head_dim: H. window: the layer's sliding window
  (None: causal). storage: how keys/values are stored: "float", "fp8" (float8 codes with a scale
  per token) or "int" (kvjax's intN codes). slots: S of a contiguous buffer (a device's share
  when its slots are split over devices). pages_per_row: M, and page_size: P, of a paged pool.
  sharded: the buffer's slots are split over devices (its prefill stays on jnp).
  on: the platform deciding "auto" and naming the choice (default `platform()`).
  """
  check_kernel(kernel)
  on = on or platform()
  facts = dict(queries=queries, head_dim=head_dim, slots=slots, pages_per_row=pages_per_row,
               page_size=page_size, storage=storage)
  shared = ("kernel='jnp'" if kernel == "jnp"
            else _shared_reason(kind, queries, window, storage, sharded))
  if shared:
    return Choice(routes=((on, JNP),), name=JNP, reason=shared)
  if kernel == "auto":
    if on not in ("cuda", "tpu"):
      return Choice(routes=((on, JNP),), name=JNP, reason=f"auto on {on}: jnp")
    route, reason = _route(on, kind, **facts)
    return Choice(routes=((on, route),), name=route, reason=reason)
  # "pallas": every platform's own kernel; CPU interprets the GPU kernel
  cuda, cuda_reason = _route("cuda", kind, **facts)
  tpu_, tpu_reason = _route("tpu", kind, **facts)
  cpu = JNP if cuda == JNP else cuda + (XLA if cuda == DPA else INTERPRET)
  routes = (("cpu", cpu), ("cuda", cuda), ("tpu", tpu_))
  name = dict(routes).get(on, JNP)
  reason = "; ".join(r for r in (cuda_reason, tpu_reason) if r)
  return Choice(routes=routes, name=name, reason=reason)


def _has_kernel(x) -> bool:
  return "kernel" in getattr(type(x), "__dataclass_fields__", {})


def with_kernel(cache, kernel: str):
  """`cache` with every cache inside it that has a kernel setting (full, paged, and those inside
  a hybrid or layered cache) set to `kernel`; others unchanged."""
  check_kernel(kernel)
  return jax.tree_util.tree_map(lambda c: c.replace(kernel=kernel) if _has_kernel(c) else c,
                                cache, is_leaf=_has_kernel)


def describe(cache, on: str | None = None) -> dict:
  """{"decode": name, "prefill": name} of the first cache inside `cache` with a kernel setting
  (layer 0; jnp names when none has one), and "kernel": its setting."""
  found = [c for c in jax.tree_util.tree_leaves(cache, is_leaf=_has_kernel) if _has_kernel(c)]
  if not found:
    return {"kernel": "jnp", "decode": JNP, "prefill": JNP}
  c = found[0]
  return {"kernel": c.kernel, "decode": c.choice(1, on=on).name,
          "prefill": c.choice(2, on=on).name}
