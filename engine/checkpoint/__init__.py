"""Checkpoints: files (:mod:`.io`), loading through a model's filter (:mod:`.convert`), training state."""

from engine.checkpoint.convert import (
    CheckpointFit,
    CheckpointLoad,
    check_checkpoint_fit,
    load_checkpoint_into,
    load_filtered_state,
    prepare_state,
)
from engine.checkpoint.io import (
    CheckpointWriteError,
    UnsafeCheckpointError,
    check_checkpoint_format,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_on_master,
    verify_checkpoint_file,
)
from engine.checkpoint.training import (
    NonFiniteWeightsError,
    ResumePoint,
    TrainingCheckpointer,
    capture_rng_state,
    restore_rng_state,
    resume_point,
)

__all__ = [
    "CheckpointFit", "CheckpointLoad", "CheckpointWriteError", "NonFiniteWeightsError", "ResumePoint",
    "TrainingCheckpointer", "UnsafeCheckpointError", "capture_rng_state", "check_checkpoint_fit",
    "check_checkpoint_format", "checkpoint_path", "load_checkpoint", "load_checkpoint_into", "load_filtered_state",
    "prepare_state", "read_checkpoint", "restore_rng_state", "resume_point", "save_checkpoint", "save_on_master",
    "verify_checkpoint_file",
]
