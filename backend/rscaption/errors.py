"""Errors a user can cause. The CLI prints these as one line (no traceback); anything else is a bug."""


class RscaptionError(Exception):
    """Base class for user-facing errors: bad input, missing files, unsupported options."""


class RasterError(RscaptionError):
    """The raster cannot be opened or tiled as asked (corrupt, unsupported, empty extent...)."""


class ModelError(RscaptionError):
    """A model name or checkpoint cannot be resolved or loaded."""


class StoreError(RscaptionError):
    """An output GeoPackage is missing, corrupt, or was written by an incompatible run."""


class TrainError(RscaptionError):
    """A training config is invalid or a run dir is in a state the command cannot continue from."""


class Cancelled(RscaptionError):
    """The run was cancelled by the user; finished work has been kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, or a SIGTERM (``kill``, a service manager's stop, a batch system's time limit) that
    the CLI and the worker turn into the same cancel: finished tiles kept, run lock removed, resume
    works. A KeyboardInterrupt, so every place that already cancels on Ctrl-C cancels on it too;
    ``signum`` gives the exit status (128 + signum: 130, 143)."""

    def __init__(self, signum: int = 2):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    """The signal handler the CLI installs for SIGINT and SIGTERM."""
    raise Interrupted(signum)
