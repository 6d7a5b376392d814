"""User-facing errors. The CLI prints their message on one line and exits non-zero."""


class TrellisError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class UnsupportedSpecError(TrellisError, ValueError):
    """A trellis configuration (L, K, V, code) that this project does not implement."""


class CheckpointError(TrellisError):
    """A packed checkpoint that is missing, truncated or inconsistent."""


class SourceError(TrellisError):
    """A model source that cannot be found or whose architecture is not supported."""


class TextError(TrellisError):
    """Calibration or evaluation text that cannot be used."""
