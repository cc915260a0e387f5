"""One error tree for the core library.

The CLI turns any ``RegradError`` (and bank_format's ``BankFormatError``) into one plain line on
stderr and exit status 1; anything else is a bug and keeps its traceback.
"""


class RegradError(Exception):
    """Root of every error the core raises on purpose."""


class ConfigError(RegradError):
    """The workspace configuration or a command option is invalid."""


class ModelLoadError(RegradError):
    """A language model or embedder could not be loaded."""


class IngestError(RegradError):
    """Nothing could be ingested, or the documents table could not be written."""


class NoBankError(RegradError):
    """The workspace has no gradient bank for the current learner checkpoint."""


class DatasetError(RegradError):
    """A dataset spec or file could not be read."""


class FieldError(RegradError):
    """One field of a request or one command option is invalid; ``field`` names it.

    The message starts with the field's name ("top_k: must be ...") as it always did; callers
    that map errors (the HTTP server: 422 naming the field) read ``field``, never the text."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class OptionError(ConfigError):
    """A command-line option has an invalid value: a usage error (exit status 2), one line."""
