"""Gemma 3 decoder (text part) in Flax: hybrid sliding/global attention, QK-norm, GeGLU.

What differs from `kvjax.models.llama` (and where it comes from in Gemma 3's architecture):

* every layer has a type (`config.layer_types`): a "sliding" layer attends to the
  `config.sliding_window` most recent positions, itself included (key j is visible to the query at
  position p iff p - W < j <= p), with RoPE base `rope_local_theta`; a "global" layer attends to the
  whole context with RoPE base `rope_theta`. With a cache, the cache alone applies the window (the
  model tells it nothing per call): kvjax builds window rings for sliding layers, or masks
  full-size storage (see kvjax.caches.hybrid);
* queries and keys are RMS-normalized over the head dim (`q_norm`, `k_norm`) before RoPE, and
  queries are scaled by `query_scale ** -0.5` (not `head_dim ** -0.5`);
* four norms per block: before and after attention, before and after the FFN; the post-norms are
  applied to the branch before it joins the residual stream;
* the FFN is GeGLU with the tanh GELU; token embeddings are multiplied by sqrt(dim); embeddings are
  tied with the LM head.

Norm scales are stored as the multiplier itself (the GGUF convention: Gemma's checkpoints store
`scale - 1`, and the GGUF conversion adds the one back), so `RMSNorm` is shared with Llama.

Param tree (per-layer arrays, projections [in, out], as in llama.py):
  embed/embedding [V, D]
  layers_i/attn_norm/scale [D]            layers_i/post_attn_norm/scale [D]
  layers_i/attn/{wq [D, N*H], wk [D, K*H], wv [D, K*H], wo [N*H, D]}
  layers_i/attn/q_norm/scale [H]          layers_i/attn/k_norm/scale [H]
  layers_i/mlp_norm/scale [D]             layers_i/post_mlp_norm/scale [D]
  layers_i/mlp/{w_gate [D, F], w_up [D, F], w_down [F, D]}
  final_norm/scale [D]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.attention import RoPE, causal_attention
from kvjax.models.config import Gemma3Config, layer_window
from kvjax.models import llama
from kvjax.models.llama import Embed, RMSNorm, linear



def layer_rope(config: Gemma3Config, layer: int) -> RoPE:
  """The rotary embedding of `layer`: the local base on sliding layers, the global one otherwise."""
  sliding = config.layer_types[layer] == "sliding"
  return RoPE(config.head_dim, config.rope_local_theta if sliding else config.rope_theta)


class Attention(nn.Module):
  config: Gemma3Config
  layer: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache, n_valid, positions):
    c = self.config
    b, t, _ = x.shape
    q, k, v, wo = llama.qkv_projections(self, x)  # [B, T, N, H], [B, T, K, H] x 2, [N*H, D]
    q = RMSNorm(c.norm_eps, self.dtype, name="q_norm")(q)
    k = RMSNorm(c.norm_eps, self.dtype, name="k_norm")(k)
    rope, scale = layer_rope(c, self.layer), c.query_scale ** -0.5
    if cache is None:
      window = layer_window(c, c.layer_types[self.layer])
      out = causal_attention(rope.apply(q, positions), rope.apply(k, positions), v, positions,
                             n_valid, scale=scale, window=window)
    else:
      out, cache = cache.attend(self.layer, q, k, v, n_valid, rope=rope, scale=scale)
    return linear(out.reshape(b, t, c.n_heads * c.head_dim), wo), cache


class MLP(nn.Module):
  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return llama.gated_ffn(self, x, functools.partial(jax.nn.gelu, approximate=True))


class Block(nn.Module):
  config: Gemma3Config
  layer: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache, n_valid, positions):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, self.dtype, name=name)
    h, cache = Attention(c, self.layer, self.dtype, name="attn")(
        norm("attn_norm")(x), cache, n_valid, positions)
    x = x + norm("post_attn_norm")(h)
    h = MLP(c, self.dtype, name="mlp")(norm("mlp_norm")(x))
    return x + norm("post_mlp_norm")(h), cache


class Gemma3(nn.Module):
  """Decoder. `__call__(tokens [B, T], cache, n_valid [B], logits_at [B]) -> (logits, cache)`,
  with the same contract as `kvjax.models.llama.Llama`."""

  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, cache=None, n_valid=None, logits_at=None):
    c = self.config
    b, t = tokens.shape
    embedding = Embed(c, self.dtype, name="embed")()  # [V, D]
    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)  # [B, T, D]
    x = x * jnp.asarray(math.sqrt(c.dim), self.dtype)
    if n_valid is None:
      n_valid = jnp.full((b,), t, jnp.int32)
    if cache is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    for i in range(c.n_layers):
      x, cache = Block(c, i, self.dtype, name=f"layers_{i}")(x, cache, n_valid, positions)
    if cache is not None:
      cache = cache.advance(n_valid)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
    x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
    logits = jnp.einsum("...d,vd->...v", x, embedding.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return logits, cache


@dataclasses.dataclass(frozen=True)
class Gemma3Decoder(llama.LlamaDecoder):
  """The step function of a `Gemma3` of one config and dtype (hashable: a static jit argument):
  `LlamaDecoder`'s step and step_last over the Gemma 3 module."""

  config: Gemma3Config

  @property
  def module(self) -> Gemma3:
    return Gemma3(self.config, self.dtype)


def init_params(config: Gemma3Config, seed: int = 0, dtype=None):
  """Random weights (normal, std 0.02; norm scales at 1) with the param tree documented above."""
  return llama.init_module_params(Gemma3Decoder, config, seed, dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def forward(config: Gemma3Config, params, tokens, n_valid=None):
  """Full causal forward without a cache (sliding layers masked): tokens [B, T] -> logits
  [B, T, V] (fp32)."""
  dtype = params["embed"]["embedding"].dtype
  logits, _ = Gemma3(config, dtype).apply({"params": params}, tokens, None, n_valid)
  return logits
