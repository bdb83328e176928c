"""Errors of the codec."""


class CodecError(ValueError):
    """Any bad input to the codec: corrupt, truncated, mismatched or foreign data, unknown levels, bad tensors."""
