"""The kernel layer: which attention kernel a cache's step runs, per (platform, kind, shape).

kvjax's attention is plain `jnp` (`kvjax.attention`, unchanged). On accelerators JAX ships Pallas
kernels for the decode step of two of kvjax's layouts, and this package routes to them:

* `choose` (`kvjax.kernels.select`): the resolver. It maps a cache's `kernel` setting ("auto",
  "jnp" or "pallas") and the static facts of one attention call (kind, queries per row, head dim,
  window, storage) to a named `Choice`: one route per platform the step may be lowered for.
* one module per backend: `jnp` (today's kernels), `gpu` (`pallas.ops.gpu.paged_attention`,
  `pallas.ops.gpu.decode_attention`, and a full cache's prefill chunks through
  `jax.nn.dot_product_attention`), `tpu` (`pallas.ops.tpu.paged_attention`).
* `route`: runs a `Choice` (a `lax.platform_dependent` over its routes when there are several).

"auto" on CPU is always the jnp path and adds nothing to the program; see docs/kernels.md for the
table of what runs where and why the rest stays on jnp.
"""

from kvjax.kernels.select import (KERNELS, Choice, check_kernel, choose, describe, platform,
                                  with_kernel)
from kvjax.kernels.route import (contiguous_decode, contiguous_decode_stats, contiguous_prefill,
                                 paged_decode)

__all__ = ["KERNELS", "Choice", "check_kernel", "choose", "contiguous_decode",
           "contiguous_decode_stats", "contiguous_prefill", "describe", "paged_decode", "platform",
           "with_kernel"]
