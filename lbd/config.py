"""Turning what the user asked for (sizes, addresses, layer flags) into a Device."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lbd.device import Device
from lbd.errors import ConfigError
from lbd.layer import Identity, Layer

if TYPE_CHECKING:
    from lbd.layers.rbd import CephOptions

SECTOR = 512
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, what: str = "-s") -> int:
    """``1G``, ``512m``, ``4096``: a byte count, suffixes are powers of two."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (a number with an optional "
                          "k/m/g/t suffix)")
    size = int(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if size <= 0:
        raise ConfigError(f"{what}: the size must be positive")
    if size % SECTOR:
        raise ConfigError(f"{what}: {size} bytes is not a multiple of 512")
    return size


def parse_address(text: str, what: str, default_host: str | None) -> tuple[str | None, int]:
    """``[host:]port``, ``[::1]:port``; a bare port means ``default_host``."""
    text = text.strip()
    host: str | None = default_host
    port_s = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ConfigError(f"{what}: {text!r} is not [IPv6]:port")
        host, port_s = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port_s = text.rsplit(":", 1)
        host = host or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not [host:]port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range")
    return host, port


def format_address(host: str | None, port: int) -> str:
    h = host or "0.0.0.0"
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


@dataclass(frozen=True)
class LayerSpec:
    """One layer flag: ``-f``/``-F`` flat, ``-e``/``-E`` expandable, ``-n``/``-N``/``-X`` NBD."""

    kind: str  # "flat", "expandable", "nbd" or "rbd"
    param: str
    writable: bool
    writeback: bool = False  # nbd: -X, a write-back cache (exclusive access)
    cache: int = 0  # nbd: --nbd-cache bytes (0: none for -n, the default for -X)
    timeout: float = 30.0  # nbd: --nbd-timeout seconds
    keepalive: float = 5.0  # nbd: --nbd-keepalive seconds (0: off)
    ceph: CephOptions | None = None  # rbd (-c/-C): --ceph-conf, --ceph-id, ...

    @property
    def flag(self) -> str:
        if self.kind == "nbd" and self.writeback and self.writable:
            return "-X"
        letter = {"flat": "f", "expandable": "e", "nbd": "n", "rbd": "c"}[self.kind]
        return "-" + (letter.upper() if self.writable else letter)


def check_stack(specs: list[LayerSpec]) -> None:
    for spec in specs[:-1]:
        if spec.writable:
            raise ConfigError(
                f"{spec.flag} {spec.param}: only the topmost (last) layer may be writable; "
                f"use {spec.flag.lower()} for it or put it last")


def open_layer(spec: LayerSpec, size: int, below: Layer | None, force: bool) -> Layer:
    from lbd.layers.expandable import ExpandableLayer
    from lbd.layers.flat import FlatLayer

    if spec.kind == "flat":
        return FlatLayer(spec.param, size, spec.writable)
    if spec.kind == "nbd":
        from lbd.layers.nbdclient import parse_target
        from lbd.layers.nbdremote import NBDLayer

        return NBDLayer(parse_target(spec.param, spec.flag), size, spec.writable,
                        writeback=spec.writeback and spec.writable, cache=spec.cache,
                        timeout=spec.timeout, keepalive=spec.keepalive)
    if spec.kind == "rbd":
        from lbd.layers.rbd import RBDLayer, parse_target

        return RBDLayer(parse_target(spec.param, spec.flag), size, spec.writable, spec.ceph,
                        spec.flag)
    if spec.kind == "expandable":
        ident = below.identity() if below is not None else Identity()
        # only a writable change file (-E) is created when missing; -e opens an existing one
        return ExpandableLayer(spec.param, size, spec.writable, ident, force=force,
                               create=spec.writable)
    raise ConfigError(f"unknown layer kind {spec.kind}")


def build_device(size: int, specs: list[LayerSpec], *, force: bool = False) -> Device:
    """Open every layer bottom-up and stack them; close them all on failure."""
    check_stack(specs)
    layers: list[Layer] = []
    try:
        for spec in specs:
            layers.append(open_layer(spec, size, layers[-1] if layers else None, force))
        return Device(size, layers)
    except BaseException:
        for layer in reversed(layers):
            layer.close()
        raise


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                          "share")
    return os.path.join(base, "lbd")
