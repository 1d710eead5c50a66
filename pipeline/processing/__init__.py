"""The processing path, stage by stage (pipeline.processor.Processor runs it):

decode (decode.py) -> align payments with their labels (labels.py) -> featurize with the partition's state,
score, threshold, build alerts, incident lifecycle (scoring.py, alerts.py) -> one checkpoint batch
(pipeline.checkpointing) -> commit. Partition restores and the offset-reset policy: recovery.py; state
snapshots: snapshots.py; dead letters: dead_letters.py; the database-retry policy: retry.py."""
