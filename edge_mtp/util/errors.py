"""The one exception type a user sees: one sentence saying what is wrong, where, and what to do."""


class EdgeMtpError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback needed)."""


class UnsupportedModelError(EdgeMtpError):
    """The checkpoint is of a model family or configuration that edge-mtp does not export."""


class CheckpointError(EdgeMtpError):
    """A checkpoint file or tensor is missing, malformed, or of the wrong shape."""


class PairMismatchError(EdgeMtpError):
    """The assistant was not built for this target (widths, heads, window or vocabulary differ)."""
