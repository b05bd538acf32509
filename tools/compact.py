"""``lbd-compact``: rewrite a change file without dead space, or convert a v1 file.

    lbd-compact FILE                       rewrite FILE with its live data only
    lbd-compact FILE -o NEW                write the compacted copy to NEW
    lbd-compact --to-native -s SIZE OLD    convert the original's version-1 file

The new file keeps the old one's id, parent and creation time, so files
created on top of it still fit.  It is written to ``FILE.lbd-tmp``, synced,
checked and renamed over FILE (then the directory is synced): killed at any
moment, FILE is the old file or the new one, whole.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import click
from lbd.layers.changefile import ChangeFile
from lbd.layers.fileio import FileIO
from lbd.layers.intent import refuse_if_unfinished

from lbd.errors import ConfigError, LBDError
from lbd.layer import Identity

from .common import (
    EXIT_ERROR,
    ToolCommand,
    ToolError,
    die,
    drop_cache,
    human,
    open_file,
    overlay_of,
    size_option,
)
from .progress import Progress
from .transfer import apply_to_change_file, make_plan, ranges_of, read_change_file

TMP_SUFFIX = ".lbd-tmp"


@dataclass
class CompactOptions:
    path: str
    output: str | None = None
    to_native: bool = False
    size: int | None = None
    below: str | None = None  # the layer a converted v1 file sits on (its parent id)
    verify: bool = True
    progress: bool | None = None
    report: list[str] = field(default_factory=list)


def compact(opts: CompactOptions, io_class: type[FileIO] = FileIO) -> list[str]:
    path = opts.path
    out = opts.output or path
    if opts.output is not None and os.path.exists(opts.output):
        raise ToolError(f"{opts.output} exists; give a new name (nothing is overwritten)")
    try:
        refuse_if_unfinished(path, "change file")
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    below = None
    size = opts.size
    if opts.below is not None:
        below = open_file(opts.below, size=size, io_class=io_class)
        size = size or below.size
    try:
        # exclusive: nothing may open the file while it is being replaced
        src = open_file(path, size=size, exclusive=True, raw_ok=False, io_class=io_class)
    except BaseException:
        if below is not None:
            below.close()
        raise
    tmp = out + TMP_SUFFIX
    try:
        assert src.cf is not None
        if src.kind == "v1":
            if not opts.to_native:
                raise ToolError(f"{path} is a version-1 file (the original LBD's); convert it "
                                "with --to-native (-s SIZE or --below FILE give the device "
                                "size)")
            if size is None:
                raise ToolError(f"{path}: a version-1 file does not record the device size; "
                                "give -s SIZE or --below FILE")
            parent = below.identity() if below is not None else Identity()
            uuid = src.cf.header.uuid  # its content fingerprint: files on top still fit
            created = None
        else:
            h = src.cf.header
            parent, uuid, created = h.parent, h.uuid, h.created_ns
            if below is not None and not parent.same(below.identity()):
                opts.report.append(f"note: {path} was not created on {opts.below}; its "
                                   "recorded parent is kept")
        size = src.size or size
        assert size is not None
        before = os.stat(path)
        st = src.cf.stats()
        plan = make_plan(overlay_of([src]), size)
        io_class.remove(tmp)  # what a killed earlier run left
        t0 = time.monotonic()
        cf = ChangeFile.create(tmp, size, parent, io_factory=io_class, uuid=uuid,
                               created_ns=created)
        try:
            with Progress(f"compacting {src.name}", plan.data_bytes + plan.zero_bytes,
                          enabled=opts.progress) as bar:
                apply_to_change_file(plan, [src], cf, bar)
            cf.close(clean=True)  # index snapshot, synced
        except BaseException:
            cf.close(clean=False)
            raise
        elapsed = time.monotonic() - t0
        if opts.verify:
            _verify(src, plan, tmp, io_class)
        io_class.replace(tmp, out)
        after = os.stat(out)
    except BaseException:
        try:
            io_class.remove(tmp)
        finally:
            src.close()
            if below is not None:
                below.close()
        raise
    src.close()
    if below is not None:
        below.close()
    what = "converted to version 2" if src.kind == "v1" else "compacted"
    opts.report.append(
        f"{path}: {what}{'' if out == path else ' into ' + out} in {elapsed:.2f} s: "
        f"{human(st.live_bytes)} live data kept, {human(st.dead_bytes)} dead dropped; "
        f"allocated {human(before.st_blocks * 512)} -> {human(after.st_blocks * 512)} "
        f"(reclaimed {human(max(0, (before.st_blocks - after.st_blocks) * 512))})")
    return opts.report


def _verify(src: object, plan: object, tmp: str, io_class: type[FileIO]) -> None:
    """The new file must read exactly as the old one, range by range."""
    from .common import Opened
    from .transfer import Plan

    assert isinstance(src, Opened) and isinstance(plan, Plan) and src.cf is not None
    new = ChangeFile.open(tmp, writable=False, io_factory=io_class, verify=True)
    drop_cache(new.io.fd)
    try:
        old_cover = src.cf.map.data_sectors + src.cf.map.zero_sectors
        if new.map.data_sectors + new.map.zero_sectors != old_cover:
            raise ToolError(f"verify: {tmp} does not cover the same sectors as {src.path}")
        want = bytearray(8 << 20)
        got = bytearray(8 << 20)
        for off, n in ranges_of(plan):
            w, g = memoryview(want)[:n], memoryview(got)[:n]
            read_change_file(src.cf, off, w)
            read_change_file(new, off, g)
            if w != g:
                raise ToolError(f"verify: {tmp} differs from {src.path} at device bytes "
                                f"{off}..{off + n - 1}; the original is left as it was")
    finally:
        new.close(clean=False)


@click.command("compact", cls=ToolCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", metavar="FILE")
@click.option("-o", "--output", metavar="NEW", help="Write the result here, keep FILE.")
@click.option("--to-native", is_flag=True,
              help="Convert a version-1 file (the original LBD's) to the native format.")
@click.option("-s", "--size", "size_text", metavar="SIZE",
              help="Device size (a version-1 file does not record it).")
@click.option("--below", metavar="FILE",
              help="The layer FILE sits on (a base image or change file): a converted "
                   "version-1 file records it as its parent, and takes its size.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Re-read the new file and compare it with the old before replacing it.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
def main(path: str, output: str | None, to_native: bool, size_text: str | None,
         below: str | None, verify: bool, progress: bool | None) -> None:
    """Rewrite a change file without dead space (atomically), or convert a v1 file.

    \b
      lbd-compact day1.lbd                      reclaim dead space in place
      lbd-compact --to-native -s 20G old.lbd    convert an original-LBD file
      lbd-compact --to-native --below base.img old.lbd -o new.lbd

    The result keeps the file's id, so change files on top of it still fit.
    """
    size = size_option(size_text)
    opts = CompactOptions(path=path, output=output, to_native=to_native, size=size,
                          below=below, verify=verify, progress=progress)
    try:
        for line in compact(opts):
            click.echo(line)
    except LBDError as exc:
        die("lbd-compact", exc)
    except OSError as exc:
        click.echo(f"lbd-compact: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
