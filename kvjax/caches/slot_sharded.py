"""Flash-decoding over devices: a full cache whose slots are split over mesh axes.

`kvjax.sharding.shard_cache` may split a `FullCache`'s slot axis S over the mesh axes its plan
names (`FullCache.with_slot_sharding`); its writes and attention then come here. Device d of the
`n` along the slot axes holds slots [d * S/n, (d + 1) * S/n) of every row.

  write   each device stores the new tokens whose slots it owns; the others drop them (a token's
          slot is its position, as in the full cache).
  attend  each device attends over its own filled blocks, keeping the softmax statistics (running
          max, sum of weights, weighted values); the statistics are merged across the slot axes
          (max, then rescaled sums), so the result equals attention over the whole row. A decode
          step under a Pallas `kernel` takes each device's statistics from the GPU decode
          kernel's residuals (`kvjax.kernels.gpu.contiguous_decode_stats`) instead.

Both run under `jax.shard_map` over the cache's mesh; buffers are [L, B, K, S, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax import attention as attn
from kvjax import kernels
from kvjax.caches import base


def write(k_buf, v_buf, lengths, layer: int, k, v, ss):
  """k_buf, v_buf [L, B, K, S, H] split over `ss.slots`; k, v [B, T, K, H] new tokens at each
  row's next positions. Returns the new (k_buf, v_buf)."""
  buf, tok, rows = ss.buffer_spec(), ss.tokens_spec(), ss.rows_spec()

  def local(kbuf, vbuf, lengths, k_new, v_new):
    s_loc = kbuf.shape[3]
    slots = base.row_slots(lengths, k_new.shape[1]) - ss.offset(s_loc)  # [B', T]
    slots = jnp.where((slots >= 0) & (slots < s_loc), slots, s_loc)  # not ours: dropped
    r = jnp.arange(kbuf.shape[1])[:, None]
    return (kbuf.at[layer, r, :, slots, :].set(k_new.astype(kbuf.dtype), mode="drop"),
            vbuf.at[layer, r, :, slots, :].set(v_new.astype(vbuf.dtype), mode="drop"))

  return jax.shard_map(local, mesh=ss.mesh, in_specs=(buf, buf, rows, tok, tok),
                       out_specs=(buf, buf), check_vma=False)(k_buf, v_buf, lengths, k, v)


def attend(k_buf, v_buf, layer: int, qg, positions, kv_len, ss, block_size: int,
           window: int | None = None, choice=None):
  """Attention of queries qg [B, T, K, G, H] (at `positions` [B, T]) over the first kv_len [B]
  slots of `layer`, merged across devices; with a sliding `window` W a query also sees only its
  W most recent positions (slot = position, so the local mask just shifts both by the device's
  offset). choice: a `kvjax.kernels.Choice` for the local statistics of a decode step (the GPU
  kernel's residuals), or None / a jnp choice (blockwise). Returns [B, T, N, H] in fp32."""
  part = ss._part
  q_spec = jax.sharding.PartitionSpec(part(ss.batch), None, part(ss.kv_heads), None, None)
  pos_spec = jax.sharding.PartitionSpec(part(ss.batch), None)

  def local(kbuf, vbuf, q_l, pos, lens):
    s_loc = kbuf.shape[3]
    offset = ss.offset(s_loc)
    local_len = jnp.clip(lens - offset, 0, s_loc)
    shape = (1,) + kbuf.shape[1:3] + (block_size, kbuf.shape[4])

    def load_block(start):
      idx = (layer, 0, 0, start, 0)
      return jax.lax.dynamic_slice(kbuf, idx, shape)[0], jax.lax.dynamic_slice(vbuf, idx, shape)[0]

    def jnp_stats():
      return attn.blockwise_stats(
          q_l, load_block, attn.causal_visibility(pos - offset, local_len, window),
          attn.n_filled_blocks(local_len, block_size), block_size)

    if choice is None or choice.is_jnp:
      peak, total, acc = jnp_stats()
    else:  # one query per row: slots [start, local_len) of this device
      start = None if window is None else jnp.clip(pos[:, 0] - window + 1 - offset, 0, s_loc)
      peak, total, acc = kernels.contiguous_decode_stats(choice, q_l, kbuf[layer], vbuf[layer],
                                                         local_len, start, jnp_stats)
    top = jax.lax.pmax(peak, ss.slots)
    weight = jnp.exp(peak - top)
    total = jax.lax.psum(total * weight, ss.slots)
    acc = jax.lax.psum(acc * weight[..., None], ss.slots)
    return attn.finish_stats((top, total, acc), jnp.float32)

  return jax.shard_map(local, mesh=ss.mesh,
                       in_specs=(ss.buffer_spec(), ss.buffer_spec(), q_spec, pos_spec, ss.rows_spec()),
                       out_specs=ss.tokens_spec(), check_vma=False)(k_buf, v_buf, qg, positions, kv_len)
