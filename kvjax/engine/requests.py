"""What goes into an engine and what comes out: `Request`, `Event`, and `collect`.

A request's prompt is text (encoded with `model.tokenizer`) or token ids, read by
`kvjax.prompts.token_row` as everywhere in kvjax. A sample ends after max_new_tokens tokens or on
the EOS id. `check` refuses, before anything is admitted, a request that no row could ever run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvjax import decode
from kvjax import prompts as prompts_lib


@dataclasses.dataclass
class Request:
  """ids: the prompt, a string (encoded with the model's tokenizer) or its token ids (a sequence
  of ints or a 1-D integer array); n: samples drawn from it (parallel sampling, sharing its pages);
  id: any label the events carry (default: the order of insertion, 0 for the first request)."""

  ids: str | Sequence[int]
  max_new_tokens: int
  id: Any = None
  n: int = 1


@dataclasses.dataclass(frozen=True)
class Event:
  """One token of one sample of a request; `done` on its last token."""

  request: Any
  sample: int
  token: int
  done: bool


@dataclasses.dataclass
class Row:
  """A running sample: the request it serves, which sample it is, and how far it has come."""

  request: Request
  sample: int
  end: int  # tokens the row holds when it finishes (prompt + max_new_tokens - 1); -1: finished
  generated: int = 0


def check(request: Request, tokenizer, vocab_size: int, *, rows: int, capacity: int) -> np.ndarray:
  """The prompt's token ids (int32 [n]); raises TypeError / ValueError for a prompt that is not
  token ids or text or holds ids past the vocabulary, ValueError for a bad max_new_tokens or n
  (n must lie in [1, rows]), and CapacityError when prompt + max_new_tokens exceed a row."""
  what = f"Engine.insert: request {request.id!r}"
  ids = prompts_lib.token_row(request.ids, tokenizer, what=what)
  prompts_lib.check_vocab(ids, vocab_size, what)
  k, n = request.max_new_tokens, request.n
  if not prompts_lib.is_int(k) or k < 1:
    raise ValueError(f"{what}: max_new_tokens must be a positive int, got {k!r}")
  if not prompts_lib.is_int(n) or not 1 <= n <= rows:
    raise ValueError(f"{what}: n must lie in [1, rows={rows}], got {n!r}")
  if ids.size + k > capacity:
    raise decode.CapacityError(f"{what} needs {ids.size} + {k} tokens, more than a row's "
                               f"capacity {capacity}")
  return ids


def collect(events: Iterable[Event]) -> dict:
  """{(request id, sample): [tokens]} from a stream of events."""
  out: dict = {}
  for event in events:
    out.setdefault((event.request, event.sample), []).append(event.token)
  return out
