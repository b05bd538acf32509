"""The intent record of an in-place merge (``lbd-merge``; docs/tools.md).

Before ``lbd-merge`` changes a file in place (a flat base, or the change file
it merges others into), it writes ``TARGET.lbd-merge`` — what it merges,
the files' ids, the command that resumes it — and syncs it.  The record is
removed, durably, only after the merged data is synced.  While it exists the
target is half-merged: ``lbd-merge`` finishes the job when re-run, and the
layers refuse to serve the target, so a half-applied merge is never used
as if it were whole.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lbd.errors import ConfigError

from .fileio import FileIO

SUFFIX = ".lbd-merge"


def intent_path(target: str) -> str:
    return target + SUFFIX


def read_intent(target: str) -> dict[str, Any] | None:
    """The record of an unfinished merge into ``target``, or None."""
    path = intent_path(target)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError:
        # written by rename, so never torn; something else wrote it
        return {"damaged": True, "command": "?"}
    return rec


def write_intent(target: str, record: dict[str, Any], io_class: type[FileIO] = FileIO) -> None:
    """Write the record durably: a temporary file, synced, renamed into place."""
    path = intent_path(target)
    tmp = path + ".tmp"
    io_class.remove(tmp)
    io = io_class(tmp, writable=True, create=True)
    try:
        io.pwrite(json.dumps(record, indent=1).encode() + b"\n", 0)
        io.fdatasync()
    finally:
        io.close()
    io_class.replace(tmp, path)


def clear_intent(target: str, io_class: type[FileIO] = FileIO) -> None:
    io_class.remove(intent_path(target))


def refuse_if_unfinished(target: str, what: str) -> None:
    """ConfigError if an interrupted ``lbd-merge`` left ``target`` half-merged."""
    if not os.path.exists(intent_path(target)):
        return
    rec = read_intent(target) or {}
    raise ConfigError(
        f"{what} {target}: an lbd-merge into it was interrupted and it is half-merged "
        f"({intent_path(target)} exists); finish it first by re-running: "
        f"{rec.get('command', 'lbd-merge with the same arguments')}")
