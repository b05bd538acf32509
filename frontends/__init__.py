"""Frontends: translate a protocol (NBD, management, FUSE) into engine calls."""
