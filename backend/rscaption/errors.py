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
