"""Offline maintenance tools for change files."""
