"""Continuous batching over a paged cache: `Engine`, `serve`, and what they take and give.

  engine.py      Engine (insert / step / free / run / audit) and serve
  requests.py    Request, Event, collect, and the checks a request passes before admission
  page_index.py  PageIndex: full prompt pages by the hash chain of their tokens (prefix caching);
                 WindowPages: the same keys' pages in a sliding layers' window pool
  admission.py   the page accounting, as pure functions of the engine's state
  steps.py       the jitted prefill, decode step and page surgery
  pools.py       one pool, or a global pool and window pools on a model with sliding layers

`from kvjax.engine import Engine, ...` and `kvjax.Engine` name the same objects.
"""

from kvjax.engine.engine import Engine, serve
from kvjax.engine.page_index import PageIndex, WindowPages
from kvjax.engine.requests import Event, Request, collect

__all__ = ["Engine", "Event", "PageIndex", "Request", "WindowPages", "collect", "serve"]
