"""Replays of historical topic ranges into an isolated run id (backfills, what-if runs, incident review).

The entry points live in `pipeline.replay.core`; nothing is imported here, so registering `pipeline replay`
with the CLI (and so `pipeline --help`) does not import torch.
"""
