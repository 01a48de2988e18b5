"""ternpool.engine."""
