"""Shared fixtures: see tests/support.py."""

from remotes import remotes  # noqa: F401  (fixture; the NBD-layer tests)
from support import lbd_server  # noqa: F401  (fixture)
