"""Batched scoring of entity windows (scorer), per-entity thresholds (threshold, knobs) and the one place that
builds a stream's scorer (factory).

Nothing is re-exported here: `pipeline.config` imports the knobs, and importing this package must not import
torch (which the scorer needs)."""
