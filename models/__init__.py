"""LSTM autoencoders and their checkpoints (state_dict + the config that built them + a model card).

Pure: no Kafka, no database. `pipeline` turns streams into windows; this package turns windows into
reconstruction errors and scores.
"""

from models.lstm_ae import (
    Checkpoint,
    ErrorModel,
    LSTMAEConfig,
    LSTMAutoencoder,
    TrainConfig,
    bundled_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    train_autoencoder,
)

__all__ = [
    "Checkpoint",
    "ErrorModel",
    "LSTMAEConfig",
    "LSTMAutoencoder",
    "TrainConfig",
    "bundled_checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
    "train_autoencoder",
]
