"""Replays of historical topic ranges into an isolated run id (backfills, what-if runs, incident review)."""

from pipeline.replay.core import ReplayResult, default_run_id, diff_runs, parse_time, resolve_model, run_replay

__all__ = ["ReplayResult", "default_run_id", "diff_runs", "parse_time", "resolve_model", "run_replay"]
