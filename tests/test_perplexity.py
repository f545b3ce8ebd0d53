"""kvjax.perplexity: chunked feeding is exact where `default_chunk` chunks, errors are clear.

A NumPy check of the NLL itself (against the oracle forward) lives here too; agreement with HF
transformers on SmolLM2 is in test_parity.py.
"""

import jax
import numpy as np
import pytest

import kvjax
from kvjax.perplexity import default_chunk
from kvjax.spec import SpecError
from kvjax.testing import oracle

IDS = np.random.default_rng(0).integers(3, 250, size=70)


@pytest.mark.parametrize("spec,chunk", [
    ("full", 256), ("offload", 256), ("window:24", 256), ("sink:2+window:16", 256),
    ("h2o:8+window:8", 256), ("int4+residual:32+h2o:8+window:32", 256),
    ("tier:8:fp32,16:int8,24:int2", 256),
    ("share:2", 256), ("share:2+window:24", 256), ("int8", 1), ("int4+residual:32", 1),
    ("share:2+int8", 1),
])
def test_default_chunk(spec, chunk):
  """The chunk follows the kind's declared `chunk_exact` (share:G: as its inner kind)."""
  assert default_chunk(spec) == chunk
  assert default_chunk(kvjax.make_cache(spec, kvjax.TINY, 1, 64)) == chunk


def test_default_chunk_of_unsupported_spec_is_an_error():
  with pytest.raises(SpecError, match="int8"):
    default_chunk("window:24+int8")


@pytest.mark.parametrize("spec,atol", [
    ("full", 2e-5), ("sink:2+window:16", 2e-5), ("h2o:8+window:8", 2e-5), ("share:2", 2e-5),
    ("share:2+sink:2+window:16", 2e-5),
    # Quantized storage: a chunk's projections differ from one token's in the last float bit,
    # which can flip a code; every token still sees the same tokens, so only rounding differs.
    ("int4+residual:32+h2o:8+window:32", 5e-3), ("tier:8:fp32,16:int8,24:int2", 5e-3),
])
def test_chunked_equals_token_by_token(tiny, spec, atol):
  """Where perplexity chunks by default, every token still sees what decoding would show it."""
  chunked = kvjax.perplexity(tiny, IDS, cache=spec, chunk=32)
  stepwise = kvjax.perplexity(tiny, IDS, cache=spec, chunk=1)
  np.testing.assert_allclose(chunked.token_nll, stepwise.token_nll, atol=atol)
  assert chunked.ppl == pytest.approx(stepwise.ppl, rel=atol / 5)
  assert chunked.tokens == stepwise.tokens == IDS.size


def test_full_matches_numpy_oracle(tiny):
  result = kvjax.perplexity(tiny, IDS, cache="full")
  logits = oracle.llama_forward(tiny.config, tiny.params, IDS)  # [T, V]
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  want = -logp[np.arange(IDS.size - 1), IDS[1:]]
  np.testing.assert_allclose(result.token_nll, want, atol=1e-4)
  assert result.ppl == pytest.approx(np.exp(want.mean()), rel=1e-4)
  assert sum(result.cache_bytes.values()) > 0


def test_lossy_spec_changes_the_result(tiny):
  full = kvjax.perplexity(tiny, IDS, cache="full")
  small = kvjax.perplexity(tiny, IDS, cache="window:8")
  assert not np.allclose(full.token_nll, small.token_nll)
  np.testing.assert_allclose(full.token_nll[:7], small.token_nll[:7], atol=2e-5)  # window not yet full


def test_errors(tiny):
  with pytest.raises(ValueError, match="at least 2 tokens"):
    kvjax.perplexity(tiny, [5])
  with pytest.raises(SpecError, match="none"):
    kvjax.perplexity(tiny, IDS, cache="none")
  with pytest.raises(SpecError, match="int5"):
    kvjax.perplexity(tiny, IDS, cache="int5")


def test_ids_are_read_like_generate_prompts(tiny):
  """Float ids are refused, never truncated (a 2-D float array was refused, a list of float
  arrays was not); text is encoded with the model's tokenizer."""
  for bad in ([np.array([1.5, 2.0, 3.0])], np.array([1.0, 2.0, 3.0]), [[1, 2], [3.0, 4.0]]):
    with pytest.raises(TypeError, match="integer"):
      kvjax.perplexity(tiny, bad)
  text = kvjax.perplexity(tiny, "hello there")
  ids = kvjax.perplexity(tiny, tiny.tokenizer.encode("hello there"))
  np.testing.assert_allclose(text.token_nll, ids.token_nll)


def test_input_not_mutated(tiny):
  ids = IDS.copy()
  kvjax.perplexity(tiny, ids, cache="window:16", chunk=8)
  np.testing.assert_array_equal(ids, IDS)


def test_compiles_once_per_shape_and_scores_batches(tiny):
  """A second call with the same shapes compiles nothing, nearby lengths share a bucket, and a
  ragged batch of documents scores each document as it would alone."""
  kvjax.perplexity(tiny, IDS, cache="full")
  before = kvjax.compile_stats()["n_compiles"]
  again = kvjax.perplexity(tiny, IDS[:-3], cache="full")  # 67 tokens: same bucket as 70
  assert kvjax.compile_stats()["n_compiles"] == before
  docs = [IDS, IDS[:30], IDS[10:55]]
  batch = kvjax.perplexity(tiny, docs, cache="full")
  assert isinstance(batch, list) and len(batch) == 3
  for doc, result in zip(docs, batch):
    alone = kvjax.perplexity(tiny, doc, cache="full")
    assert result.tokens == doc.size
    np.testing.assert_allclose(result.token_nll, alone.token_nll, atol=2e-5)
  np.testing.assert_allclose(again.token_nll, batch[0].token_nll[:66], atol=2e-5)


def test_accepts_a_cache_object_and_leaves_it_alone(tiny):
  cache = kvjax.make_cache("sink:2+window:16", tiny.config, 1, 18)
  before = [np.array(x) for x in jax.tree_util.tree_leaves(cache)]
  got = kvjax.perplexity(tiny, IDS, cache=cache)
  want = kvjax.perplexity(tiny, IDS, cache="sink:2+window:16")
  np.testing.assert_allclose(got.token_nll, want.token_nll, atol=2e-5)
  for x, y in zip(before, jax.tree_util.tree_leaves(cache)):
    np.testing.assert_array_equal(x, np.asarray(y))
