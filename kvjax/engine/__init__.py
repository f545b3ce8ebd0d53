"""Continuous batching over a paged cache (see `kvjax.engine.engine`)."""

from kvjax.engine.engine import Engine, Event, PageIndex, Request, collect, serve

__all__ = ["Engine", "Event", "PageIndex", "Request", "collect", "serve"]
