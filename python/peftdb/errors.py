"""The exceptions peftdb raises: one class per kind of failure (the library's ``ErrorKind``).

Every exception keeps the library's message, which names the file and says what to do. Catch
:class:`Error` for any of them. Where a Python built-in exception means the same thing, the class also
derives from it (a missing store is a ``FileNotFoundError``, an unknown task a ``LookupError``, bad input
a ``ValueError``), so generic handlers keep working.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "Error",
    "StoreLockedError",
    "SchemaVersionError",
    "StoreNotFoundError",
    "AlreadyExistsError",
    "NotAStoreError",
    "NeedsRecoveryError",
    "ReadOnlyError",
    "NotFoundError",
    "InvalidAdapterError",
    "InvalidTaskError",
    "ModelError",
    "InvalidInputError",
    "NoCandidatesError",
    "StorageError",
    "CorruptError",
    "InterruptedError",
]


class Error(Exception):
    """Any error peftdb raises. ``str(e)`` is the library's message."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreLockedError(Error):
    """Another process holds the store open for writing (one writer at a time).

    ``pid`` is the holder's process id when the store's ``.owner`` file names it, else ``None``.
    Open read-only (``Store(path, read_only=True)``) to read while it writes.
    """

    @property
    def pid(self) -> Optional[int]:
        m = re.search(r"pid (\d+)", self.message)
        return int(m.group(1)) if m else None


class SchemaVersionError(Error):
    """The store was written by a newer peftdb (upgrade), or by an older one (open it for writing once)."""


class StoreNotFoundError(Error, FileNotFoundError):
    """No store at the path: create one with ``Store(path, create=True)``."""


class AlreadyExistsError(Error, FileExistsError):
    """A store, or an output folder that is not empty, already exists where a new one was asked for."""


class NotAStoreError(Error):
    """The file is not a peftdb store."""


class NeedsRecoveryError(Error):
    """The last writer crashed; open the store for writing once to recover it."""


class ReadOnlyError(Error):
    """A write on a store opened with ``read_only=True``."""


class NotFoundError(Error, LookupError):
    """No such task, object, embedding or space in the store."""


class InvalidAdapterError(Error, ValueError):
    """An adapter folder that cannot be read, or does not fit the model or store it is used with."""


class InvalidTaskError(Error, ValueError):
    """Task data that breaks the task format (labels, verbalizers, splits)."""


class ModelError(Error):
    """A base model folder that cannot be loaded, or a device that cannot be used."""


class InvalidInputError(Error, ValueError):
    """An option or argument out of its range."""


class NoCandidatesError(Error):
    """The store has no candidate adapters for this task and method: ingest some first."""


class StorageError(Error, OSError):
    """Reading or writing files failed (a full disk, permissions); what is stored is kept."""


class CorruptError(Error):
    """A stored record or derived file is damaged."""


class InterruptedError(Error):  # noqa: A001 - peftdb.errors.InterruptedError, not the built-in
    """The operation was stopped on request; everything it committed is kept."""
