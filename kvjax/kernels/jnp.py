"""The jnp kernels: today's `kvjax.attention`, unchanged (CPU, and every case no Pallas kernel
takes). Named here so that every backend of the kernel layer has its module."""

from kvjax.attention import attend_prefix_blocks, prepare_queries

NAME = "jnp.blockwise"

__all__ = ["NAME", "attend_prefix_blocks", "prepare_queries"]
