"""Shared fixtures: see tests/support.py."""

from support import lbd_server  # noqa: F401  (fixture)
