"""Evaluations of KV-cache compression: `ruler`, RULER-style synthetic long-context tasks."""

from kvjax.evals import ruler

__all__ = ["ruler"]
