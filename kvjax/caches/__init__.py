"""Cache kinds and the pure functions that operate on any of them."""
