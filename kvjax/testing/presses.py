"""The conformance kit for presses: `check_press(press)` on kvjax's presses or your own.

    from kvjax.testing.presses import check_press

    def test_my_press():
      check_press(MyPress())            # or a spec string: check_press("adakv(my_press)")

Invariants checked (each failure names its invariant):

  shapes       score(x, n_kept) is float32 [B, K, T], finite on real tokens; select(...) is bool
               [B, K, T]
  padding      nothing is kept at a padding position
  budget       each (row, kv head) keeps at most n_kept tokens (a pool over the layer's heads:
               at most K x n_kept per row) — skipped for presses with `keeps_every_token`
  rows         a row's scores and selection do not depend on the other rows of the batch nor on
               how much padding follows it (row b of a ragged batch == row b alone)
  jit          jit(score/select) equals eager
  layer_kept   layer budgets are ints in [1, tokens] for every layer
  end_to_end   (with a model) compress(..., budget >= prompt) then generate equals the full cache's
               generation, score_prompt's scores equal compress's, and the kept positions in
               `cache.view()` are the ones compress says it kept (`details=True`);
               on a model with sliding layers (tiny-gemma3) one prompt row overflows the window
  budget_free  (with a model, for a press with `budget_free`) its scores are the same at two
               budgets, and compress(..., scores=) with compress's own scores keeps what it kept

The synthetic layer (`synthetic_inputs`) is GQA (4 query heads over 2 kv heads), head_dim 8, two
rows of 24 and 17 tokens, with RoPE at theta 10000 and a random output projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import RoPE
from kvjax.presses.base import LayerInputs, Press, make_press

HEADS, KV_HEADS, HEAD_DIM, DIM = 4, 2, 8, 16
LENGTHS = (24, 17)


class PressError(AssertionError):
  """A press broke an invariant of the kit; the message names it."""


def _require(ok, invariant: str, message: str):
  if not ok:
    raise PressError(f"[{invariant}] {message}")


def synthetic_inputs(lengths=LENGTHS, *, seed: int = 0, layer: int = 0, n_layers: int = 2,
                     tokens: int | None = None) -> LayerInputs:
  """A random GQA layer (`LayerInputs`) whose rows hold `lengths` real tokens, padded to `tokens`
  (default the longest) with garbage."""
  rng = np.random.default_rng(seed)
  b, t = len(lengths), tokens or max(lengths)
  rope = RoPE(HEAD_DIM, 10000.0)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  q_raw = jnp.asarray(rng.normal(size=(b, t, HEADS, HEAD_DIM)), jnp.float32)
  k_raw = jnp.asarray(rng.normal(size=(b, t, KV_HEADS, HEAD_DIM)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, KV_HEADS, t, HEAD_DIM)), jnp.float32)
  wo = jnp.asarray(rng.normal(size=(HEADS * HEAD_DIM, DIM)) * 0.1, jnp.float32)
  return LayerInputs(q=rope.apply(q_raw, positions), q_raw=q_raw,
                     k=rope.apply(k_raw, positions).swapaxes(1, 2), k_raw=k_raw.swapaxes(1, 2),
                     v=v, n_valid=jnp.asarray(lengths, jnp.int32), wo=wo, layer=layer,
                     n_layers=n_layers, scale=HEAD_DIM**-0.5, rope=rope)


def _row(x: LayerInputs, b: int) -> LayerInputs:
  """Row b of x alone, cut to its own length."""
  n = int(x.n_valid[b])
  cut = lambda a, axis: jax.lax.slice_in_dim(a[b:b + 1], 0, n, axis=axis)
  return x.replace(q=cut(x.q, 1), q_raw=cut(x.q_raw, 1), k=cut(x.k, 2), k_raw=cut(x.k_raw, 2),
                   v=cut(x.v, 2), n_valid=x.n_valid[b:b + 1])


def _run(press: Press, x: LayerInputs, n_kept):
  scores = press.score(x, n_kept)
  return scores, press.select(x, scores.astype(jnp.float32), n_kept)


def check_press(press, *, model=None, share: float = 0.5, atol: float = 1e-5) -> None:
  """Runs the invariants above on `press` (a Press or spec string); raises PressError naming the
  first one broken. With `model` (e.g. kvjax.load("tiny")) also the end-to-end check."""
  press = make_press(press)
  if _extends(press):  # it reads more than the prompt: only end to end
    _require(model is not None, "end_to_end", f"{press} extends the prompt (Press.extend), so the "
             "kit checks it through compress only: pass model=")
    _end_to_end(press, model)
    return
  x = synthetic_inputs()
  lengths = np.asarray(x.n_valid)
  every = getattr(press, "keeps_every_token", False)
  share = 0.0 if every else share
  base = np.maximum(1, (lengths * (1 - share)).astype(int))
  if press.takes_budget:  # each row's budget for this layer, as compress computes it
    base = [press.layer_kept(int(k), int(n), x.layer, x.n_layers, share)
            for k, n in zip(base, lengths)]
  n_kept = jnp.asarray(base, jnp.int32)
  scores, keep = _run(press, x, n_kept)
  b, kh, t = x.batch, x.kv_heads, x.tokens
  _require(scores.shape == (b, kh, t) and scores.dtype == jnp.float32, "shapes",
           f"score() gave {scores.dtype} {tuple(scores.shape)}, expected float32 {(b, kh, t)}")
  _require(keep.shape == (b, kh, t) and keep.dtype == jnp.bool_, "shapes",
           f"select() gave {keep.dtype} {tuple(keep.shape)}, expected bool {(b, kh, t)}")
  valid = np.asarray(x.valid)
  s, k = np.asarray(scores), np.asarray(keep)
  _require(np.isfinite(s[np.broadcast_to(valid[:, None], s.shape)]).all(), "shapes",
           "score() is not finite on real tokens")
  _require(not (k & ~valid[:, None]).any(), "padding", "a padding position was kept")
  if not every and press.takes_budget:
    counts = k.sum(-1)  # [B, K]
    if getattr(press, "shared_heads", False):
      _require((counts.sum(-1) <= kh * np.asarray(n_kept)).all(), "budget",
               f"kept {counts.sum(-1)} per row over a pooled budget of {kh} x {np.asarray(n_kept)}")
    else:
      _require((counts <= np.asarray(n_kept)[:, None]).all(), "budget",
               f"kept {counts} per (row, head), budgets {np.asarray(n_kept)}")
  for row in range(b):  # rows: alone == in the ragged batch
    alone_s, alone_k = _run(press, _row(x, row), n_kept[row:row + 1])
    n = lengths[row]
    _require(np.allclose(np.asarray(alone_s)[0], s[row, :, :n], atol=atol, rtol=1e-4), "rows",
             f"row {row}'s scores change when it is batched with padding")
    _require((np.asarray(alone_k)[0] == k[row, :, :n]).all(), "rows",
             f"row {row}'s selection changes when it is batched with padding")
  jit_s, jit_k = jax.jit(lambda x, n: _run(press, x, n))(x, n_kept)
  _require(np.allclose(np.asarray(jit_s), s, atol=atol, rtol=1e-4)
           and (np.asarray(jit_k) == k).all(), "jit", "jit(score/select) differs from eager")
  for layer in range(x.n_layers):
    got = press.layer_kept(20 if every else 8, 20, layer, x.n_layers, None)
    _require(isinstance(got, (int, np.integer)) and 1 <= got <= 20, "layer_kept",
             f"layer_kept(8, tokens=20, layer={layer}, n_layers={x.n_layers}) = {got!r}")
  if model is not None:
    _end_to_end(press, model)


def _extends(press: Press) -> bool:
  """Whether the press runs the prefill over more than the prompt (`Press.extend`, kvzip)."""
  try:
    rows, _ = press.extend([[3, 4, 5]], None)
  except Exception:  # noqa: BLE001 - it wanted a tokenizer: it extends
    return True
  return rows != [[3, 4, 5]]


def _same_tokens(a, b) -> bool:
  """Two caches hold the same positions, with keys and values equal to rounding (a press that
  extends the rows, kvzip, computes the context's keys in a longer run when it scores itself)."""
  va, vb = a.view(), b.view()
  ma, mb = np.asarray(va.mask), np.asarray(vb.mask)
  if ma.shape != mb.shape or (ma != mb).any():
    return False
  if not np.array_equal(np.asarray(va.positions)[ma], np.asarray(vb.positions)[mb]):
    return False
  return all(np.allclose(np.asarray(x)[ma], np.asarray(y)[mb], rtol=1e-4, atol=1e-5)
             for x, y in ((va.keys, vb.keys), (va.values, vb.values)))


def _end_to_end_lengths(model) -> tuple[int, int]:
  """The two prompt rows' lengths: 12 and 7 tokens, and on a model with sliding layers one row
  past the widest window and one inside it, so that the windows' eviction is checked too."""
  from kvjax.models.config import layer_windows

  windows = [w for w in layer_windows(model.config) if w is not None]
  return (12, 7) if not windows else (max(windows) + 8, max(windows) // 2 + 3)


def _end_to_end(press: Press, model) -> None:
  from kvjax.decode import generate
  from kvjax.presses.compress import compress, score_prompt

  rng = np.random.default_rng(1)
  vocab = model.config.vocab_size
  rows = [rng.integers(3, vocab, size=n).tolist() for n in _end_to_end_lengths(model)]
  rest = [[int(rng.integers(3, vocab))] for _ in rows]
  sized = press.takes_budget  # else the press sizes each layer itself (simlayerkv)
  above = max(64, max(len(r) for r in rows))  # a budget no row fills
  cache = compress(model, rows, press, room=8, **({"budget": above} if sized else {}))
  got = generate(model, rest, cache=cache, max_new_tokens=4, stop_at_eos=False).tokens
  want = generate(model, [r + s for r, s in zip(rows, rest)], max_new_tokens=4,
                  stop_at_eos=False).tokens
  if sized and not getattr(press, "changes_keys", False):
    _require((np.asarray(got) == np.asarray(want)).all(), "end_to_end",
             f"with a budget above the prompt, generation differs from the full cache: "
             f"{np.asarray(got).tolist()} vs {np.asarray(want).tolist()}")
  ratio = 0.0 if getattr(press, "keeps_every_token", False) else 0.5
  budget = {"ratio": ratio} if sized else {}
  info = score_prompt(model, rows, press, **budget)
  cache, done = compress(model, rows, press, room=8, details=True, **budget)
  # Two programs: scores agree to rounding, so near-ties (Gemma 3's RMS-normed keys all have
  # norms within 1e-5) may split differently; the cache is checked against its own selection.
  # (Leverage inverts a Gram matrix: its scores move by ~1e-4 of their range between programs.)
  a, b = np.asarray(info.scores), np.asarray(done.scores)
  scale = float(np.max(np.abs(b[np.isfinite(b)]), initial=1.0))
  _require(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale, equal_nan=True), "end_to_end",
           "score_prompt's scores differ from compress's")
  if press.budget_free and sized:
    other = score_prompt(model, rows, press, ratio=0.25 if ratio else 0.5)
    _require(np.array_equal(np.asarray(other.scores), a, equal_nan=True), "budget_free",
             f"{press} says its scores ignore the budget (budget_free), but score_prompt's "
             "differ between two ratios: set budget_free = False")
    again = compress(model, rows, press, room=8, scores=done.scores, **budget)
    _require(_same_tokens(again, cache), "budget_free",
             "compress(..., scores=) with compress's own scores keeps other tokens than compress")
  view = cache.view()
  pressed = list(done.layers)  # a hybrid model's sliding layers keep their window, unpressed
  pos, mask = np.asarray(view.positions)[pressed], np.asarray(view.mask)[pressed]
  kept = np.asarray(done.kept)  # [L pressed, B, K, T]
  if press.rerotates:  # positions were renumbered 0..n-1: compare how many each head holds
    _require((mask.sum(-1) == kept.sum(-1)).all(), "end_to_end",
             "the cache holds another number of tokens than its compress kept")
    return
  held = np.zeros(kept.shape, bool)
  for idx in zip(*np.nonzero(mask)):
    held[idx[0], idx[1], idx[2], pos[idx]] = True
  _require((held == kept).all(), "end_to_end",
           "the cache holds other positions than its compress kept (details=True)")
