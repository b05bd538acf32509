"""``lbd-merge``: fold change files into what lies below them, or into a new file.

    lbd-merge -f BASE -e C1 [-e C2...]          commit into BASE in place (qemu-img commit)
    lbd-merge -e C1 -e C2 [-e C3...]            merge C2.. into C1 in place
    lbd-merge [-f BASE] -e C1... -o OUT.img     a new flat image of the whole stack
    lbd-merge [-f BASE] -e C1... -o OUT.lbd     one new change file holding C1..Cn

Crash safety (docs/tools.md): an in-place merge first writes and syncs an
intent record (``TARGET.lbd-merge``, :mod:`lbd.layers.intent`), applies
every extent, syncs the target and only then removes the record.  Killed at
any moment, the record is still there: the layers refuse the half-merged
target and a re-run with the same files redoes the merge (applying the same
extents again is harmless).  A new output is written to ``OUT.lbd-tmp``,
synced and renamed: it appears whole or not at all.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from lbd.layers.changefile import ChangeFile
from lbd.layers.fileio import FileIO
from lbd.layers.intent import clear_intent, intent_path, read_intent, write_intent

from lbd.errors import LBDError
from lbd.layer import Identity

from .common import (
    EXIT_ERROR,
    Opened,
    Stack,
    ToolCommand,
    ToolError,
    ceph_click_options,
    ceph_options,
    die,
    drop_cache,
    human,
    open_stack,
    overlay_of,
    size_option,
)
from .progress import Progress
from .rbdtool import is_rbd, layer_of
from .transfer import (
    Plan,
    apply_to_change_file,
    apply_to_raw,
    make_plan,
    ranges_of,
    read_change_file,
    read_plan_range,
    whole_device,
    zero_raw,
)

TMP_SUFFIX = ".lbd-tmp"


@dataclass
class MergeOptions:
    base: str | None
    changes: list[str]
    output: str | None = None
    out_format: str | None = None  # "raw" or "lbd"; None: by the output's name
    size: int | None = None
    verify: bool = False
    force: bool = False
    remove: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    command: str = "lbd-merge"
    ceph: Any = None  # CephOptions for rbd:... names (docs/rbd.md)
    report: list[str] = field(default_factory=list)


def merge(opts: MergeOptions, io_class: type[FileIO] = FileIO) -> list[str]:
    """Run one merge; returns the report lines.  Raises ToolError / LBDError."""
    paths = ([opts.base] if opts.base else []) + opts.changes
    absolute = [p if is_rbd(p) else os.path.realpath(p) for p in paths]
    if len(set(absolute)) != len(absolute):
        raise ToolError("a file is given twice")
    if not opts.changes:
        raise ToolError("nothing to merge: give change files with -e")
    if opts.output is not None:
        return _merge_to_new(opts, io_class)
    if opts.base is None and len(opts.changes) < 2:
        raise ToolError("merging in place needs a base (-f BASE) or two change files or more "
                        "(the upper ones are merged into the lowest)")
    return _merge_in_place(opts, io_class)


# -- in place ---------------------------------------------------------------------------


def _merge_in_place(opts: MergeOptions, io_class: type[FileIO]) -> list[str]:
    target_path = opts.base if opts.base is not None else opts.changes[0]
    in_rbd = is_rbd(target_path)  # the intent record is in the image's metadata
    rec = None if in_rbd else read_intent(target_path)
    try:
        stack = open_stack(opts.base, opts.changes, size=opts.size, writable=target_path,
                           io_class=io_class, half_merged_ok=target_path, ceph=opts.ceph)
    except ToolError as exc:
        if rec is not None:
            raise ToolError(f"{exc} (an interrupted merge into {target_path} is pending: "
                            f"{rec.get('command', '?')})") from None
        raise
    try:
        if opts.base is not None:
            target, sources = stack.base, stack.changes
        else:
            target, sources = stack.changes[0], stack.changes[1:]
        assert target is not None
        if in_rbd:
            rec = layer_of(target).merge_intent()
        record = {
            "tool": "lbd-merge", "version": 1,
            "target": target.path if in_rbd else os.path.realpath(target.path),
            "target_format": target.kind,
            "sources": [{"path": os.path.realpath(f.path), "id": f.identity().ident.hex()}
                        for f in sources],
            "command": opts.command, "started_ns": time.time_ns(),
        }
        resuming = False
        if rec is not None:
            if rec.get("target") != record["target"] or rec.get("sources") != record["sources"]:
                raise ToolError(
                    f"{target.path}: another merge into it was interrupted "
                    f"({'image metadata' if in_rbd else intent_path(target.path)}); finish "
                    "that one first: "
                    f"{rec.get('command', '?')}")
            resuming = True
            opts.report.append(f"resuming the interrupted merge into {target.path}")
        # a resumed merge into a base has changed the base: its id no longer
        # matches what the lowest change file recorded; the record vouches for it
        stack.check_chain(opts.force, skip_first=(resuming and opts.base is not None)
                          or opts.base is None)
        opts.report += [f"note: {n}" for n in stack.notes]
        if target.kind == "v1" and sources:
            opts.report.append(f"note: {target.path} is a version-1 file; it is written in "
                               "the original's format")
        overlay = overlay_of(sources)
        plan = make_plan(overlay, stack.size)
        t0 = time.monotonic()
        if not resuming:
            if in_rbd:
                layer_of(target).set_merge_intent(record)
            else:
                write_intent(target.path, record, io_class)
        with Progress(f"merging into {target.name}", plan.data_bytes + plan.zero_bytes,
                      enabled=opts.progress) as bar:
            if target.cf is None:
                apply_to_raw(plan, sources, target.io, bar)
                target.io.fdatasync()
            else:
                apply_to_change_file(plan, sources, target.cf, bar)
                target.cf.sync()
        elapsed = time.monotonic() - t0
        if opts.verify:
            _verify_in_place(plan, overlay, sources, target, opts)
        if target.cf is not None:
            target.cf.close(clean=True)  # the index snapshot, synced
        if in_rbd:
            layer_of(target).clear_merge_intent()
        else:
            clear_intent(target.path, io_class)
        names = ", ".join(f.path for f in sources)
        opts.report.append(
            f"merged {names} into {target.path}: {human(plan.data_bytes)} of data and "
            f"{human(plan.zero_bytes)} of zeros in {elapsed:.2f} s "
            f"({human(int(plan.data_bytes / max(elapsed, 1e-6)))}/s)")
    finally:
        stack.close()
    if opts.remove:
        for f in sources:
            io_class.remove(f.path)
            opts.report.append(f"removed {f.path}")
    elif sources:
        many = len(sources) > 1
        opts.report.append(
            f"{', '.join(f.path for f in sources)} now {'lie' if many else 'lies'} inside "
            f"{target.path} and no longer {'match' if many else 'matches'} it (keep as "
            "history or delete; --remove does that)")
    return opts.report


def _verify_in_place(plan: Plan, overlay: object, sources: list[Opened], target: Opened,
                     opts: MergeOptions) -> None:
    drop_cache(target.io.fd)
    want = bytearray(8 << 20)
    got = bytearray(8 << 20)
    checked = 0
    for off, n in ranges_of(plan):
        w, g = memoryview(want)[:n], memoryview(got)[:n]
        read_plan_range(sources, overlay, None, off, w)  # type: ignore[arg-type]
        if target.cf is None:
            target.io.readinto(g, off)
        else:
            read_change_file(target.cf, off, g)
        if w != g:
            raise ToolError(f"verify: {target.path} differs from the merged data at bytes "
                            f"{off}..{off + n - 1}; the intent record is kept, re-run to redo")
        checked += n
    opts.report.append(f"verified {human(checked)}: {target.path} reads back as merged")


# -- to a new file ----------------------------------------------------------------------


def _merge_to_new(opts: MergeOptions, io_class: type[FileIO]) -> list[str]:
    out = opts.output
    assert out is not None
    if is_rbd(out):
        if opts.out_format not in (None, "raw"):
            raise ToolError(f"-O {opts.out_format}: an RBD image is written whole (raw)")
        return _merge_to_rbd(opts)
    fmt = opts.out_format or ("lbd" if out.endswith(".lbd") else "raw")
    if fmt not in ("raw", "lbd"):
        raise ToolError(f"-O {fmt}: the output format is raw or lbd")
    if os.path.exists(out):
        raise ToolError(f"{out} exists; give a new name (nothing is overwritten)")
    if os.path.realpath(out) in {os.path.realpath(p) for p in
                                 ([opts.base] if opts.base else []) + opts.changes}:
        raise ToolError(f"{out} is one of the inputs")
    tmp = out + TMP_SUFFIX
    stack = open_stack(opts.base, opts.changes, size=opts.size, io_class=io_class,
                       ceph=opts.ceph)
    try:
        # a lone change-file stack writing a change file keeps the lowest one's parent
        stack.check_chain(opts.force, skip_first=opts.base is None and fmt == "lbd")
        opts.report += [f"note: {n}" for n in stack.notes]
        overlay = stack.overlay()
        plan = make_plan(overlay, stack.size)
        io_class.remove(tmp)  # what a killed earlier run left
        t0 = time.monotonic()
        if fmt == "raw":
            written = _write_raw(stack, plan, tmp, opts, io_class)
        else:
            written = _write_change_file(stack, plan, tmp, opts, io_class)
        elapsed = time.monotonic() - t0
        opts.report.append(
            f"wrote {out} ({'flat image' if fmt == 'raw' else 'change file'}, "
            f"{human(stack.size)} device): {human(written)} copied in {elapsed:.2f} s "
            f"({human(int(written / max(elapsed, 1e-6)))}/s)")
        if opts.verify:
            _verify_new(stack, overlay, plan, tmp, fmt, opts, io_class)
        io_class.replace(tmp, out)
    except BaseException:
        try:
            io_class.remove(tmp)
        finally:
            stack.close()
        raise
    stack.close()
    return opts.report


def _write_raw(stack: Stack, plan: Plan, tmp: str, opts: MergeOptions,
               io_class: type[FileIO]) -> int:
    io = io_class(tmp, writable=True, create=True)
    try:
        io.lock("output image")
        io.truncate(stack.size)
        total = _fill(stack, plan, io, os.path.basename(opts.output or tmp), opts)
        io.fdatasync()
        return total
    finally:
        io.close()


def _fill(stack: Stack, plan: Plan, io: Any, label: str, opts: MergeOptions) -> int:
    """Write the whole stack into an empty image: the base's data, then the plan."""
    base_runs = []
    if stack.base is not None:
        base_runs = [(o, n) for o, n, is_data in
                     stack.base.io.seek_data_holes(0, stack.size) if is_data]
    total = sum(n for _, n in base_runs) + plan.data_bytes + plan.zero_bytes
    with Progress(f"writing {label}", total, enabled=opts.progress) as bar:
        for o, n in base_runs:
            for k in range(0, n, 64 << 20):
                m = min(64 << 20, n - k)
                assert stack.base is not None
                io.copy_from(stack.base.io, o + k, m, o + k)
                bar.add(m)
        apply_to_raw(plan, stack.changes, io, bar)
    return total


def _merge_to_rbd(opts: MergeOptions) -> list[str]:
    """-o rbd:POOL/IMAGE[@SNAP]: the stack as a new RBD image (IMAGE.lbd-tmp, renamed)."""
    from .rbdtool import NewImage

    stack = open_stack(opts.base, opts.changes, size=opts.size, ceph=opts.ceph)
    new: NewImage | None = None
    out: Opened | None = None
    try:
        stack.check_chain(opts.force)
        opts.report += [f"note: {n}" for n in stack.notes]
        overlay = stack.overlay()
        plan = make_plan(overlay, stack.size)
        new = NewImage(opts.output or "", stack.size, opts.ceph)
        out = new.open()
        t0 = time.monotonic()
        written = _fill(stack, plan, out.io, str(new.target), opts)
        out.io.fdatasync()
        elapsed = time.monotonic() - t0
        opts.report.append(
            f"wrote {new.target} (RBD image, {human(stack.size)} device): {human(written)} "
            f"copied in {elapsed:.2f} s ({human(int(written / max(elapsed, 1e-6)))}/s)")
        if opts.verify:
            _verify_image(stack, overlay, out, opts)
        out.close()
        out = None
        new.finish()
        if new.target.snap is not None:
            opts.report.append(f"snapshot {new.target.snap} created and protected")
    except BaseException:
        if out is not None:
            out.close()
        if new is not None:
            new.discard()
        raise
    finally:
        if new is not None:
            new.close()
        stack.close()
    return opts.report


def _verify_image(stack: Stack, overlay: Any, out: Opened, opts: MergeOptions) -> None:
    want = bytearray(8 << 20)
    got = bytearray(8 << 20)
    for off, n in whole_device(stack.size):
        w, g = memoryview(want)[:n], memoryview(got)[:n]
        read_plan_range(stack.changes, overlay, stack.base, off, w)
        out.io.readinto(g, off)
        if w != g:
            raise ToolError(f"verify: the new image differs from the stack at bytes "
                            f"{off}..{off + n - 1}")
    opts.report.append(f"verified: {opts.output} reads back as the stack")


def _write_change_file(stack: Stack, plan: Plan, tmp: str, opts: MergeOptions,
                       io_class: type[FileIO]) -> int:
    top, bottom = stack.changes[-1], stack.changes[0]
    assert top.cf is not None
    if stack.base is not None:
        parent = stack.base.identity()
    else:
        parent = bottom.parent or Identity()
    cf = ChangeFile.create(tmp, stack.size, parent, io_factory=io_class,
                           uuid=top.cf.header.uuid)
    try:
        with Progress(f"writing {os.path.basename(opts.output or tmp)}",
                      plan.data_bytes + plan.zero_bytes, enabled=opts.progress) as bar:
            apply_to_change_file(plan, stack.changes, cf, bar)
        cf.close(clean=True)  # index snapshot and sync
    except BaseException:
        cf.close(clean=False)
        raise
    return plan.data_bytes


def _verify_new(stack: Stack, overlay: object, plan: Plan, tmp: str, fmt: str,
                opts: MergeOptions, io_class: type[FileIO]) -> None:
    want = bytearray(8 << 20)
    got = bytearray(8 << 20)
    if fmt == "raw":
        io = io_class(tmp, writable=False)
        drop_cache(io.fd)
        ranges = whole_device(stack.size)
    else:
        cf = ChangeFile.open(tmp, writable=False, io_factory=io_class, verify=True)
        drop_cache(cf.io.fd)
        ranges = ranges_of(plan)
        covered = (cf.map.data_sectors + cf.map.zero_sectors) * 512
        if covered != plan.data_bytes + plan.zero_bytes:
            cf.close(clean=False)
            raise ToolError(f"verify: {tmp} covers {covered} bytes, the stack "
                            f"{plan.data_bytes + plan.zero_bytes}")
    try:
        for off, n in ranges:
            w, g = memoryview(want)[:n], memoryview(got)[:n]
            read_plan_range(stack.changes, overlay, stack.base if fmt == "raw" else None,  # type: ignore[arg-type]
                            off, w)
            if fmt == "raw":
                io.readinto(g, off)
            else:
                read_change_file(cf, off, g)
            if w != g:
                raise ToolError(f"verify: the new file differs from the stack at bytes "
                                f"{off}..{off + n - 1}")
    finally:
        if fmt == "raw":
            io.close()
        else:
            cf.close(clean=False)
    opts.report.append(f"verified: {opts.output} reads back as the stack")


# -- the command ------------------------------------------------------------------------


@click.command("merge", cls=ToolCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-f", "--base", metavar="BASE",
              help="The raw base image, or an RBD image rbd:POOL/IMAGE[@SNAP] (the target "
                   "when no -o).")
@click.option("-e", "--change", "changes", multiple=True, metavar="FILE",
              help="A change file, bottom first (repeatable).")
@click.option("-o", "--output", metavar="OUT",
              help="Write a new file (or RBD image rbd:POOL/IMAGE[@SNAP]) instead of "
                   "merging in place.")
@click.option("-O", "--output-format", "out_format", type=click.Choice(["raw", "lbd"]),
              help="raw: a flat image of the whole device; lbd: one change file. "
                   "Default: lbd if OUT ends in .lbd, else raw.")
@click.option("-s", "--size", "size_text", metavar="SIZE",
              help="Device size (only needed for version-1 files alone).")
@click.option("--verify", is_flag=True, help="Re-read the result and compare it.")
@click.option("--force", is_flag=True, help="Merge files that do not belong together.")
@click.option("--remove", is_flag=True,
              help="After an in-place merge, delete the change files merged.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@ceph_click_options
def main(base: str | None, changes: tuple[str, ...], output: str | None,
         out_format: str | None, size_text: str | None, verify: bool, force: bool,
         remove: bool, progress: bool | None, ceph_conf: str | None, ceph_id: str | None,
         ceph_keyring: str | None) -> None:
    """Merge change files into the file below them, or into a new file.

    \b
      lbd-merge -f base.img -e day1.lbd -e day2.lbd     commit into base.img
      lbd-merge -e day1.lbd -e day2.lbd                 merge day2 into day1
      lbd-merge -f base.img -e day1.lbd -o new.img      a new flat image
      lbd-merge -f base.img -e d1.lbd -e d2.lbd -o all.lbd   one change file
      lbd-merge -f rbd:rbd/golden -e c.lbd               commit into an RBD image
      lbd-merge -f rbd:rbd/golden@v1 -e c.lbd -o rbd:rbd/golden2@v1   a new RBD image

    Files must belong together (each change file records the id of the
    layer it was created on); --force overrides.  An in-place merge that
    is killed leaves an intent record (TARGET.lbd-merge): run the same
    command again to finish it.  Files a running LBD has open are refused.
    """
    size = size_option(size_text)
    if out_format and not output:
        raise click.UsageError("-O needs -o OUT")
    if remove and output:
        raise click.UsageError("--remove only applies to an in-place merge")
    prog = os.path.basename(sys.argv[0]) if sys.argv else "lbd-merge"
    command = "cd " + shlex.quote(os.getcwd()) + " && " + \
        shlex.join([prog if prog.startswith("lbd") else "lbd-merge", *sys.argv[1:]])
    opts = MergeOptions(base=base, changes=list(changes), output=output, out_format=out_format,
                        size=size, verify=verify, force=force, remove=remove,
                        progress=progress, command=command,
                        ceph=ceph_options(ceph_conf, ceph_id, ceph_keyring))
    try:
        for line in merge(opts):
            click.echo(line)
    except LBDError as exc:
        for line in opts.report:
            click.echo(line)
        die("lbd-merge", exc)
    except OSError as exc:
        click.echo(f"lbd-merge: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


__all__ = ["MergeOptions", "main", "merge", "zero_raw"]
