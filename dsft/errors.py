"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class DsftError(Exception):
    """Base class: a one-line message that names the field, file or file:line at fault."""


class ConfigError(DsftError):
    """A recipe, DeepSpeed config, override or CLI flag is invalid."""


class DataError(DsftError):
    """A dataset file is missing or malformed."""


class CheckpointError(DsftError):
    """A checkpoint or adapter directory is missing, incomplete or incompatible."""


class TrainingError(DsftError):
    """Training cannot go on (a non-finite loss, a failed checkpoint write); the message names
    the step and what the last good checkpoint is."""
