"""Shared fixtures: see tests/support.py."""

from ceph_cluster import ceph  # noqa: F401  (fixture)
from fuse_support import fuse  # noqa: F401  (fixture: real FUSE mounts, loop devices)
from remotes import remotes  # noqa: F401  (fixture; the NBD-layer tests)
from support import lbd_server  # noqa: F401  (fixture)
