"""ternpool.cluster."""
