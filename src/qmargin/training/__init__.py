"""Training: the trainer, RandBET error-injection training, weight clipping, run directories, resume.

See :func:`train` (one resumable run from a :class:`TrainConfig` into a run directory) and
:func:`load_run` (rebuild a finished run's model). Imports ``losses``, ``faults``, ``quant``,
``models`` and ``data`` of qmargin; never prints.
"""

from qmargin.training.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    INTEGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    TrainerState,
    load_checkpoint,
    load_run,
    read_run_config,
    save_checkpoint,
)
from qmargin.training.config import TrainConfig, resolve_defaults
from qmargin.training.factory import (
    lr_factor,
    make_loss,
    make_model,
    make_optimizer,
    make_scheduler,
    quant_spec,
    resolve_device,
)
from qmargin.training.randbet import (
    RandBET,
    RandBETOutput,
    clip_weights_,
    corrupted_weights,
    fault_injector,
    straight_through,
    substituted_weights,
)
from qmargin.training.trainer import (
    ProgressCallback,
    TrainingData,
    TrainingDivergedError,
    TrainResult,
    epoch_permutation,
    evaluate_accuracy,
    objective,
    seed_everything,
    train,
)

__all__ = [
    "TrainConfig",
    "resolve_defaults",
    "train",
    "TrainResult",
    "TrainingDivergedError",
    "ProgressCallback",
    "TrainingData",
    "load_run",
    "read_run_config",
    "evaluate_accuracy",
    "objective",
    "seed_everything",
    "epoch_permutation",
    "RandBET",
    "RandBETOutput",
    "corrupted_weights",
    "substituted_weights",
    "straight_through",
    "fault_injector",
    "clip_weights_",
    "quant_spec",
    "make_model",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "lr_factor",
    "resolve_device",
    "TrainerState",
    "save_checkpoint",
    "load_checkpoint",
    "CONFIG_FILE",
    "MODEL_FILE",
    "INTEGER_FILE",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "STATE_FILE",
]
