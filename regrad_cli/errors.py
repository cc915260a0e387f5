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
