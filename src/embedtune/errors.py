"""User-facing errors: the CLI prints their message on one line and exits non-zero, never a traceback."""


class EmbedtuneError(Exception):
    """An error caused by the user's input or environment, with a one-line message that says how to fix it."""


class DataError(EmbedtuneError):
    """A data file that can't be read or holds no usable training pairs."""


class SaveError(EmbedtuneError):
    """A save target that would be overwritten or corrupted."""


class SettingError(EmbedtuneError, ValueError):
    """A model setting that can't apply (e.g. checkpointing a model that has no way to): still a
    ValueError for callers that catch one, and one line on the command line."""
