"""Shared fixtures: see tests/support.py."""

from ceph_cluster import ceph  # noqa: F401  (fixture)
from support import lbd_server  # noqa: F401  (fixture)
