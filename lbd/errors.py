"""The one small set of exceptions LBD uses, and their mapping to errnos.

- :class:`LBDError` is the base of everything LBD raises on purpose.
- :class:`ConfigError` is a user-facing problem (bad flag, wrong-size file,
  change file on the wrong base); the CLI prints its message without a
  traceback and exits with :attr:`exit_code`.
- :class:`IOFailure` is an I/O request that failed; it carries an errno that
  the frontends translate (NBD error code, FUSE errno) in one place each.
- :class:`CorruptionError` says a change file failed a checksum or structure
  check; it is never served as data.
"""

from __future__ import annotations

import errno as _errno


class LBDError(Exception):
    """Base class of LBD's own exceptions."""


class ConfigError(LBDError):
    """A configuration or usage problem the user can fix."""

    exit_code = 2


class CorruptionError(LBDError):
    """A change file (or other on-disk structure) failed validation."""

    exit_code = 3


class IOFailure(LBDError):
    """A request failed with an errno (EIO, EPERM, ENOSPC, EINVAL, ...)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def from_oserror(cls, exc: OSError, what: str) -> IOFailure:
        code = exc.errno if exc.errno in _PASS_THROUGH else _errno.EIO
        return cls(code, f"{what}: {exc.strerror or exc}")


class WouldBlock(LBDError):
    """A non-blocking read found data outside the page cache.

    The caller repeats the request in a worker thread.
    """


# errnos that keep their meaning on the way to a client; anything else is EIO
_PASS_THROUGH = {_errno.EIO, _errno.ENOSPC, _errno.EDQUOT, _errno.EPERM, _errno.EROFS,
                 _errno.EINVAL, _errno.ENOTSUP, _errno.EOVERFLOW, _errno.ENOMEM}
