"""``lbd-inspect``: what a change file (or a stack of them) holds, and whether it is sound.

    lbd-inspect FILE...                  format, size, ids, data/zero, live/dead space
    lbd-inspect --map FILE               its extents (like ``qemu-img map``)
    lbd-inspect --check FILE...          verify every checksum and structure
    lbd-inspect -f BASE -e C1 -e C2 --map   which layer serves each range

Exit codes (docs/tools.md): 0 clean, 1 error, 2 corruption, 3 leaked space
(``--check``; as ``qemu-img check``).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import click
from lbd.layers.changefile import AREA_SIZE, HEADER_SIZE, SECTOR, ChangeFile, Header
from lbd.layers.changefile_v1 import V1ChangeFile
from lbd.layers.intent import intent_path, read_intent

from lbd.errors import CorruptionError, LBDError
from lbd.extentmap import ZERO

from .common import (
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_LEAKS,
    EXIT_OK,
    Opened,
    Stack,
    ToolCommand,
    ToolError,
    ceph_click_options,
    ceph_options,
    decode,
    human,
    iter_runs,
    open_file,
    open_stack,
    size_option,
)

_KIND_NAMES = {0: "none", 1: "change file", 2: "image"}


def _ident(ident: Any) -> dict[str, Any]:
    return {"kind": _KIND_NAMES.get(ident.kind, str(ident.kind)), "id": ident.ident.hex(),
            "name": ident.desc}


def describe(f: Opened) -> dict[str, Any]:
    """Everything ``lbd-inspect`` says about one opened file."""
    d: dict[str, Any] = {"file": f.path, "format": f.kind, "format_name": f.format,
                         "device_size": f.size}
    if f.kind == "rbd":
        return _describe_rbd(f, d)
    st = os.stat(f.path)
    d["file_bytes"] = st.st_size
    d["allocated_bytes"] = st.st_blocks * 512
    if f.cf is not None:
        cf = f.cf
        s = cf.stats()
        d["version"] = cf.version
        d["id"] = cf.header.uuid.hex()
        d.update(data_bytes=s.live_bytes, zero_bytes=s.zero_bytes, extents=s.extents,
                 live_bytes=s.live_bytes, dead_bytes=s.dead_bytes)
        if isinstance(cf, ChangeFile):
            d["parent"] = _ident(cf.header.parent)
            d["created_ns"] = cf.header.created_ns
            d["journal"] = {"entries": cf.entries, "areas": len(cf.areas),
                            "index_snapshot": bool(cf.header.index_area),
                            "dropped_tail": cf.dropped_tail}
        else:
            d["parent"] = None  # version 1 records none
            d["id_note"] = "content fingerprint (version 1 stores no id)"
            d["tables"] = cf.check.tables
            if f.size is None:
                d["device_size"] = cf.device_size
                d["device_size_note"] = "not recorded; what the highest block written needs"
    else:
        data = sum(n for _, n, is_data in f.io.seek_data_holes(0, f.size or 0) if is_data)
        d["data_bytes"] = data
        d["zero_bytes"] = (f.size or 0) - data
    rec = read_intent(f.path)
    if rec is not None:
        d["unfinished_merge"] = {"record": intent_path(f.path),
                                 "command": rec.get("command", "?")}
    return d


def _describe_rbd(f: Opened, d: dict[str, Any]) -> dict[str, Any]:
    from .rbdtool import layer_of

    layer = layer_of(f)
    info = layer.info()["rbd"]
    d["id"] = f.identity().ident.hex()
    d["id_note"] = (f"cluster, pool, image id {info['image_id']}"
                    + (f", snapshot id {info['snap_id']}" if info["snap_id"] is not None
                       else " (head)"))
    data = sum(n for _, n, is_data in f.io.seek_data_holes(0, f.size or 0) if is_data)
    d.update(data_bytes=data, zero_bytes=(f.size or 0) - data, rbd=info)
    d["data_note"] = f"RADOS objects that exist ({info['object_size'] >> 10} KiB each)"
    rec = layer.merge_intent()
    if rec is not None:
        d["unfinished_merge"] = {"record": f"image metadata {f.path}",
                                 "command": rec.get("command", "?")}
    return d


def file_map(f: Opened) -> list[dict[str, Any]]:
    """A lone file's extents: data (with file offset), zero, absent (falls through)."""
    out = []
    size = f.size if f.cf is None or f.size else f.cf.device_size
    if f.cf is None:
        for off, n, is_data in f.io.seek_data_holes(0, size or 0):
            out.append({"offset": off, "length": n, "state": "data" if is_data else "zero",
                        "file_offset": off if is_data else None})
        return out
    for s, n, loc in iter_runs(f.cf.map, size or 0):
        state = "absent" if loc is None else "zero" if loc == ZERO else "data"
        out.append({"offset": s * SECTOR, "length": n * SECTOR, "state": state,
                    "file_offset": loc if state == "data" else None})
    return out


def stack_map(stack: Stack) -> list[dict[str, Any]]:
    """Which layer serves each range of the device (top = depth 1; 0 = nothing)."""
    out: list[dict[str, Any]] = []
    layers = len(stack.changes) + (1 if stack.base else 0)

    def add(off: int, n: int, state: str, layer: str, depth: int,
            file_off: int | None) -> None:
        if out:
            p = out[-1]
            if (p["state"], p["layer"]) == (state, layer) and p["offset"] + p["length"] == off \
                    and (file_off is None or (p["file_offset"] is not None
                         and p["file_offset"] + p["length"] == file_off)):
                p["length"] += n
                return
        out.append({"offset": off, "length": n, "state": state, "layer": layer,
                    "depth": depth, "file_offset": file_off})

    for s, n, loc in iter_runs(stack.overlay(), stack.size):
        off, length = s * SECTOR, n * SECTOR
        if loc is None:
            if stack.base is None:
                add(off, length, "zero", "-", 0, None)
                continue
            for o, m, is_data in stack.base.io.seek_data_holes(off, off + length):
                add(o, m, "data" if is_data else "zero", stack.base.path, layers,
                    o if is_data else None)
            continue
        if loc == ZERO:
            # a zero extent's layer: the topmost change file holding this sector
            idx = _top_holder(stack, s)
            add(off, length, "zero", stack.changes[idx].path, len(stack.changes) - idx, None)
            continue
        idx, foff = decode(loc)
        add(off, length, "data", stack.changes[idx].path, len(stack.changes) - idx, foff)
    return out


def _top_holder(stack: Stack, sector: int) -> int:
    for i in range(len(stack.changes) - 1, -1, -1):
        cf = stack.changes[i].cf
        assert cf is not None
        if cf.lookup(sector, 1)[0][2] is not None:
            return i
    return 0


# -- --check -----------------------------------------------------------------------


def check(f: Opened) -> dict[str, Any]:
    """Verify everything: ``problems`` (corruption), ``leaks``, ``notes``."""
    problems: list[str] = []
    leaks: list[str] = []
    notes: list[str] = []
    if f.kind == "rbd":
        from .rbdtool import layer_of

        rec = layer_of(f).merge_intent()
        where = f"image metadata of {f.path}"
    else:
        rec = read_intent(f.path)
        where = intent_path(f.path)
    if rec is not None:
        problems.append(f"half-merged: an lbd-merge into it was interrupted "
                        f"({where}); re-run: {rec.get('command', '?')}")
    if f.kind == "native":
        _check_native(f, problems, leaks, notes)
    elif f.kind == "v1":
        assert isinstance(f.cf, V1ChangeFile)
        c = f.cf.check
        problems += c.problems
        if c.leaked_bytes:
            leaks.append(f"{human(c.leaked_bytes)} of the file is neither a table nor data "
                         "(lbd-compact --to-native reclaims it)")
        if c.shared_blocks:
            notes.append(f"{c.shared_blocks} data blocks are referenced by several entries "
                         "(LBD copies such blocks before rewriting them)")
    elif f.kind == "rbd":
        notes.append("an RBD image has no structure to check here (Ceph scrubs it)")
    else:
        notes.append("a raw image has no structure to check")
    result = "corrupt" if problems else "leaks" if leaks else "clean"
    return {"result": result, "problems": problems, "leaks": leaks, "notes": notes}


def _check_native(f: Opened, problems: list[str], leaks: list[str], notes: list[str]) -> None:
    path = f.path
    raw = f.io.pread(1024, 0)
    for name, slot in (("A", raw[:512]), ("B", raw[512:1024])):
        h = Header.decode(slot)
        if h is None and slot.strip(b"\0"):
            notes.append(f"header slot {name} fails its checksum (a header update that a "
                         "crash interrupted; the other slot is used)")
    try:
        full = ChangeFile.open(path, writable=False, verify=True, use_index=False)
    except CorruptionError as exc:
        problems.append(str(exc))
        return
    try:
        if full.dropped_tail:
            leaks.append(f"{full.dropped_tail} journal entries written after the last sync "
                         "are torn and ignored (never acknowledged as durable)")
        cf = f.cf
        assert isinstance(cf, ChangeFile)
        if cf.header.index_area:
            if cf.index_error:
                problems.append(f"the index snapshot is damaged: {cf.index_error}")
            elif list(cf.map.runs()) != list(full.map.runs()):
                problems.append("the index snapshot disagrees with the journal")
        size = cf.header.device_size
        fsize = full.io.size()
        reserved = sorted([(0, HEADER_SIZE)] + [(a, a + AREA_SIZE) for a in full.areas])
        pieces = []
        for s, n, loc in full.map.data_extents():
            if (s + n) * SECTOR > size:
                problems.append(f"sectors {s}..{s + n - 1} lie beyond the device size {size}")
            if loc + n * SECTOR > fsize:
                problems.append(f"data of sectors {s}..{s + n - 1} lies beyond the end of "
                                "the file")
            pieces.append((loc, loc + n * SECTOR, f"sectors {s}..{s + n - 1}"))
        for a, b in reserved:
            pieces.append((a, b, "a header or journal area"))
        pieces.sort()
        for (_a0, a1, what_a), (b0, _b1, what_b) in itertools.pairwise(pieces):
            if b0 < a1:
                problems.append(f"file bytes {b0}..{min(a1, _b1) - 1} are used by both "
                                f"{what_a} and {what_b}")
                if len(problems) > 20:
                    break
        st = full.stats()
        if st.dead_bytes:
            leaks.append(f"{human(st.dead_bytes)} of dead data (rewritten or trimmed since); "
                         "lbd-compact reclaims it")
    finally:
        full.close(clean=False)


# -- rendering ------------------------------------------------------------------------


def render(d: dict[str, Any]) -> str:
    lines = [f"{d['file']}: {d['format_name']}"]

    def row(k: str, v: str) -> None:
        lines.append(f"  {k:<14} {v}")

    size = d.get("device_size")
    if size is not None:
        note = f"  ({d['device_size_note']})" if "device_size_note" in d else ""
        row("device size", f"{size} bytes ({human(size)}, {size // SECTOR} sectors){note}")
    if "id" in d:
        row("id", d["id"] + (f"  ({d['id_note']})" if "id_note" in d else ""))
    if "parent" in d:
        p = d["parent"]
        if p is None:
            row("created on", "not recorded (version 1)")
        elif p["kind"] == "none":
            row("created on", "nothing (the null layer)")
        else:
            row("created on", f"{p['kind']} {p['name']} (id {p['id']})")
    if d.get("created_ns"):
        t = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d["created_ns"] / 1e9))
        row("created", t)
    if "data_bytes" in d:
        ext = f" ({d['extents']} extents with zero)" if "extents" in d else ""
        row("data", f"{human(d['data_bytes'])}{ext}")
        row("zero", human(d["zero_bytes"]))
        if "file_bytes" in d:
            row("file size", f"{human(d['file_bytes'])} (allocated "
                             f"{human(d['allocated_bytes'])})")
        if "data_note" in d:
            row("", d["data_note"])
    if "live_bytes" in d:
        row("live / dead", f"{human(d['live_bytes'])} / {human(d['dead_bytes'])}")
    if "journal" in d:
        j = d["journal"]
        how = "snapshot + " if j["index_snapshot"] else ""
        row("journal", f"opened from {how}{j['entries']} entries in {j['areas']} area(s)"
                       + (f", {j['dropped_tail']} torn entries dropped" if j["dropped_tail"]
                          else ""))
    if "tables" in d:
        row("tables", str(d["tables"]))
    if "unfinished_merge" in d:
        row("WARNING", f"an lbd-merge into it was interrupted; re-run: "
                       f"{d['unfinished_merge']['command']}")
    if "check" in d:
        c = d["check"]
        row("check", c["result"])
        for p in c["problems"]:
            lines.append(f"    corrupt: {p}")
        for p in c["leaks"]:
            lines.append(f"    leak: {p}")
        for p in c["notes"]:
            lines.append(f"    note: {p}")
    return "\n".join(lines)


def render_map(rows: list[dict[str, Any]], stack: bool) -> str:
    head = f"{'Offset':<18} {'Length':<18} {'State':<7}"
    head += f" {'Depth':<5} {'Layer':<24}" if stack else ""
    head += " File offset"
    lines = [head]
    for r in rows:
        line = f"{r['offset']:#018x} {r['length']:#018x} {r['state']:<7}"
        if stack:
            line += f" {r['depth']:<5} {r['layer']:<24}"
        if r["file_offset"] is not None:
            line += f" {r['file_offset']:#x}"
        lines.append(line.rstrip())
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------


@click.command("inspect", cls=ToolCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, metavar="FILE...")
@click.option("-f", "--base", metavar="BASE",
              help="Stack mode: the raw base image, or an RBD image rbd:POOL/IMAGE[@SNAP].")
@click.option("-e", "--change", "changes", multiple=True, metavar="FILE",
              help="Stack mode: a change file, bottom first (repeatable).")
@click.option("-s", "--size", "size_text", metavar="SIZE",
              help="Device size (version-1 files do not record it).")
@click.option("--map", "with_map", is_flag=True, help="List the extents (like qemu-img map).")
@click.option("--check", "with_check", is_flag=True,
              help="Verify every checksum and structure; exit 0 clean, 2 corrupt, 3 leaks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--force", is_flag=True, help="Stack mode: show files that do not belong "
              "together anyway.")
@ceph_click_options
def main(files: tuple[str, ...], base: str | None, changes: tuple[str, ...],
         size_text: str | None, with_map: bool, with_check: bool, as_json: bool,
         force: bool, ceph_conf: str | None, ceph_id: str | None,
         ceph_keyring: str | None) -> None:
    """Show what change files hold and check that they are sound.

    \b
      lbd-inspect day1.lbd                  ids, sizes, live and dead space
      lbd-inspect --map day1.lbd            extents: data / zero / absent
      lbd-inspect --check *.lbd             exit 0 clean, 2 corrupt, 3 leaked space
      lbd-inspect -f base.img -e day1.lbd -e day2.lbd --map
                                            which layer serves each range

    A file a running LBD has open for writing is refused (it is locked).
    """
    size = size_option(size_text)
    if not files and not base and not changes:
        raise click.UsageError("give FILE..., or a stack with -f BASE -e FILE...")
    if files and (base or changes):
        raise click.UsageError("give FILE... or a stack (-f/-e), not both")
    codes: list[int] = []
    if files:
        results = []
        for path in files:
            d, code = _one(path, size, with_map, with_check)
            codes.append(code)
            if d is not None:
                results.append(d)
                if not as_json:
                    click.echo(render(d))
                    if with_map:
                        click.echo(render_map(d["map"], stack=False))
        if as_json:
            click.echo(json.dumps(results if len(files) > 1 else (results or [None])[0],
                                  indent=1))
    else:
        d, code = _stack(base, list(changes), size, with_map, with_check, force,
                         ceph_options(ceph_conf, ceph_id, ceph_keyring))
        codes.append(code)
        if d is not None:
            if as_json:
                click.echo(json.dumps(d, indent=1))
            else:
                for fd in d["files"]:
                    click.echo(render(fd))
                click.echo(f"stack: {d['device_size']} bytes, {len(d['files'])} layers, "
                           "bottom first: " + " <- ".join(x["file"] for x in d["files"]))
                for n in d["notes"]:
                    click.echo(f"  note: {n}")
                if with_map:
                    click.echo(render_map(d["map"], stack=True))
    raise SystemExit(_worst(codes))


def _worst(codes: list[int]) -> int:
    for c in (EXIT_CORRUPT, EXIT_ERROR, EXIT_LEAKS):
        if c in codes:
            return c
    return EXIT_OK


def _code(d: dict[str, Any]) -> int:
    c = d.get("check")
    if c is None:
        return EXIT_OK
    return {"corrupt": EXIT_CORRUPT, "leaks": EXIT_LEAKS}.get(c["result"], EXIT_OK)


def _one(path: str, size: int | None, with_map: bool,
         with_check: bool) -> tuple[dict[str, Any] | None, int]:
    try:
        f = open_file(path, size=size, strict=not with_check)
    except CorruptionError as exc:
        if not with_check:
            click.echo(f"lbd-inspect: error: {exc}", err=True)
            return None, EXIT_CORRUPT
        d = {"file": path, "format_name": "unreadable", "check": {
            "result": "corrupt", "problems": [str(exc)], "leaks": [], "notes": []}}
        click.echo(f"lbd-inspect: {path}: corrupt: {exc}", err=True)
        return d, EXIT_CORRUPT
    except LBDError as exc:
        click.echo(f"lbd-inspect: error: {exc}", err=True)
        return None, EXIT_ERROR
    try:
        d = describe(f)
        if with_map:
            d["map"] = file_map(f)
        if with_check:
            d["check"] = check(f)
        return d, _code(d)
    finally:
        f.close()


def _stack(base: str | None, changes: list[str], size: int | None, with_map: bool,
           with_check: bool, force: bool,
           ceph: Any = None) -> tuple[dict[str, Any] | None, int]:
    try:
        stack = open_stack(base, changes, size=size, half_merged_ok=True, ceph=ceph)
    except LBDError as exc:
        click.echo(f"lbd-inspect: error: {exc}", err=True)
        return None, EXIT_CORRUPT if isinstance(exc, CorruptionError) else EXIT_ERROR
    try:
        try:
            stack.check_chain(force)
        except ToolError as exc:
            click.echo(f"lbd-inspect: error: {exc}", err=True)
            return None, EXIT_ERROR
        files = []
        codes = []
        for f in stack.files:
            d = describe(f)
            if with_check:
                d["check"] = check(f)
                codes.append(_code(d))
            files.append(d)
        out: dict[str, Any] = {"device_size": stack.size, "files": files, "notes": stack.notes}
        if with_map:
            out["map"] = stack_map(stack)
        return out, _worst(codes)
    finally:
        stack.close()
