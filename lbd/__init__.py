"""LBD: a Layered Block Device server."""

__version__ = "0.2.0"
SECTOR = 512
