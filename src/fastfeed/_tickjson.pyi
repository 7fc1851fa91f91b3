"""Typed Python face of the JSON tick fast path."""

from typing import final

from ._core import Table

@final
class TickParser:
    """JSON tick messages straight into C values; -1 means: use json.loads."""

    def parse(self, data: bytes) -> int: ...
    def apply(
        self, table: Table, source: int = 0
    ) -> tuple[int, int, list[tuple[int, str | None, str]]]: ...
    def encode_batch(self, parts: int = 1) -> list[bytes]: ...
