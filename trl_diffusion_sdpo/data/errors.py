"""The data's errors, importing nothing: the command line ends on them with one line and exit status 1, and may
raise them before the data's readers (and ``datasets``) are imported (:mod:`.names`)."""

from __future__ import annotations

__all__ = ["DataError", "DatasetNotFoundError"]


class DataError(ValueError):
    """The data cannot be trained on (a bad row or image, no pairs, a dataset that does not exist): the user fixes
    the data or the name. The command line ends on it with one line and exit status 1."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """``dataset_name`` is neither a local file or folder nor a dataset the Hub has (or can be asked about)."""
