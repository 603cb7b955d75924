"""The one error type checkpoint code raises for bad input."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of an unknown format, or does not match its model config;
    the message names what is wrong and how to fix it."""
