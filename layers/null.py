"""The null layer: always at the bottom, reads as zeros, refuses writes."""

from __future__ import annotations

from lbd.layer import Layer, State


class NullLayer(Layer):
    kind = "null"

    def __init__(self, size: int) -> None:
        super().__init__(size, writable=False)

    def describe(self) -> str:
        return "null"

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        return []  # the view is already zeros

    def read_fast(self, offset: int, length: int) -> bytearray | bool | None:
        return bytearray(length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        return [(offset, length, State.ZERO)]

    def flush_pending(self) -> bool:
        return False
