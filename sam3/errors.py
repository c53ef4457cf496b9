"""User-facing errors.

Anything a user can fix (a broken dataset, a missing model file, a misspelled parameter) raises a subclass of
`Sam3Error` whose message says what is wrong, where, and what to do. The CLI prints that message on one line and
exits without a traceback; anything else is a bug and keeps its traceback.
"""


class Sam3Error(Exception):
    """A problem in the user's input or setup, explained by the message."""


class DataError(Sam3Error):
    """A dataset file cannot be read or is not in the expected layout."""


class ModelLoadError(Sam3Error):
    """A model directory is missing files or holds the wrong thing."""


class ConfigError(Sam3Error):
    """A parameter is unknown, misspelled or out of range."""


class ExportError(Sam3Error):
    """A trained model cannot be exported: its weights are unusable (NaN or infinite)."""
