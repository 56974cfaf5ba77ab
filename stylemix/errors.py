"""The one exception type that carries a message meant for the user (CLI line, app banner)."""


class StyleMixError(Exception):
    """A user-facing error: bad input, missing model, unusable file.  str(e) is the message."""


class ModelLoadError(StyleMixError):
    """The requested base model could not be loaded; the message says what was tried and what to do."""
