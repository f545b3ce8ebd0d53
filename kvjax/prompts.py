"""Prompts as token ids: the one place that turns what a user passes into int32 rows.

`generate`, `perplexity`, `beam_search` and the `Engine` all read prompts here, so they accept
the same things and refuse the same things with the same messages:

  a string                    one row, encoded by the model's tokenizer
  a sequence of ints          one row (Python ints or NumPy integers; a 1-D integer array)
  a sequence of rows          several rows, each a string or a sequence of ints (ragged is fine)
  a 2-D integer array         several rows, cut by `prompt_lengths` and `padding` if given

Token ids must be integers: a float array (or a float in a list) is refused, never truncated.
"""

from __future__ import annotations

import numpy as np


def is_int(x) -> bool:
  """An integer (Python or NumPy), not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def token_row(prompt, tokenizer=None, *, what: str = "prompt") -> np.ndarray:
  """One prompt -> int32 [n] token ids (n >= 1). `what` names the prompt in errors."""
  if isinstance(prompt, str):
    if tokenizer is None:
      raise TypeError(f"{what} is text, which needs a model with a tokenizer; pass token ids instead")
    ids = np.asarray(tokenizer.encode(prompt), np.int64)
  elif isinstance(prompt, (list, tuple)):
    bad = [x for x in prompt if not is_int(x)]
    if bad:
      raise TypeError(f"{what} must hold integer token ids, got {type(bad[0]).__name__} {bad[0]!r}")
    ids = np.asarray(prompt, np.int64)
  elif hasattr(prompt, "__array__"):  # NumPy or JAX arrays
    ids = np.asarray(prompt)
    if ids.ndim != 1:
      raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"{what} token ids must be integers, got dtype {ids.dtype}")
  else:
    raise TypeError(f"{what} must be a string or a sequence of int token ids, "
                    f"got {type(prompt).__name__}")
  if ids.size == 0:
    raise ValueError(f"{what} is empty: give at least one token")
  if ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max:
    raise ValueError(f"{what} has token ids outside int32")
  return ids.astype(np.int32)


def token_rows(prompts, tokenizer=None, *, prompt_lengths=None, padding: str = "right",
               what: str = "prompt") -> tuple[list[np.ndarray], bool]:
  """(rows, batched): the prompts as int32 rows, and whether a batch was given (False for one
  prompt). See the module docstring for what is accepted."""
  if padding not in ("left", "right"):
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
  if isinstance(prompts, str):
    return [token_row(prompts, tokenizer, what=what)], False
  if isinstance(prompts, (list, tuple)):
    if not prompts:
      raise ValueError(f"empty {what} batch: give at least one {what}")
    if all(isinstance(p, (int, float, np.number)) for p in prompts):  # one row (ints only)
      return [token_row(prompts, tokenizer, what=what)], False
    if not all(isinstance(p, (str, list, tuple)) or hasattr(p, "__array__") for p in prompts):
      raise TypeError(f"{what}s must be a string, a list of ints, a list of strings or of lists "
                      "of ints, or a 2-D integer array")
    return [token_row(p, tokenizer, what=f"{what} {i}") for i, p in enumerate(prompts)], True
  if not hasattr(prompts, "__array__"):
    raise TypeError(f"{what}s must be a string, a list of ints, a list of strings or of lists of "
                    f"ints, or a 2-D integer array; got {type(prompts).__name__}")
  arr = np.asarray(prompts)
  if arr.ndim == 1 and prompt_lengths is None:
    return [token_row(arr, what=what)], False
  batched = arr.ndim == 2
  arr = arr[None] if arr.ndim == 1 else arr
  if arr.ndim != 2:
    raise ValueError(f"{what} array must be [batch, length], got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{what} token ids must be integers, got dtype {arr.dtype}")
  if arr.shape[0] == 0:
    raise ValueError(f"empty {what} batch: give at least one {what}")
  if prompt_lengths is None:
    lengths = np.full(arr.shape[0], arr.shape[1])
  else:
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (arr.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"prompt_lengths must be integers of shape [batch]=({arr.shape[0]},), "
                       f"got {lengths.dtype} {lengths.shape}")
    if (lengths > arr.shape[1]).any() or (lengths < 1).any():
      raise ValueError(f"prompt_lengths must lie in [1, {arr.shape[1]}], got {lengths.tolist()}")
  cut = (lambda b, n: arr[b, :n]) if padding == "right" else (lambda b, n: arr[b, arr.shape[1] - n:])
  return [token_row(cut(b, int(n)), what=f"{what} {b}") for b, n in enumerate(lengths)], batched


def pad_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [B, P] right-padded with 0, lengths int32 [B]) of ragged rows."""
  lengths = np.array([r.size for r in rows], np.int32)
  ids = np.zeros((len(rows), int(lengths.max())), np.int32)
  for b, row in enumerate(rows):
    ids[b, :row.size] = row
  return ids, lengths


def check_vocab(ids: np.ndarray, vocab: int, what: str = "prompt") -> None:
  """Raises ValueError unless every id lies in [0, vocab)."""
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"{what} token ids must lie in [0, {vocab}), got min {ids.min()} max {ids.max()}")
