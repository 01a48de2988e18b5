"""ternpool.jobs."""
