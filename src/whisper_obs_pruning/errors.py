"""One base class for every failure a user can cause or fix (bad params, data, artifacts, models).

The command line catches exactly this class (plus ``OSError`` for full disks and read-only
folders) and prints one ``error:`` line with exit status 2, so a new error type is covered
by subclassing it: there is no hand-kept list of classes to forget one in.
"""


class WhisperObsError(Exception):
    """A user-facing failure whose message says what is wrong and where (key, file, clip)."""


class PruningError(WhisperObsError, ValueError):
    """Invalid pruning arguments (bad sparsity, pattern, shapes, targets)."""
