"""Data sources a device stacks: null, flat, expandable (and later nbd)."""
