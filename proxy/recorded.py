"""A streamed answer kept as it passes, compressed in blocks, for storing it at its end and for clients
that join it late.

A long stream is held open for minutes, and thousands may be open at once. Kept as they arrive, its
events cost their own size and an object each; kept as zlib blocks of a few kB, an LLM's events (the same
id, model and fields in each) take about a tenth of that (bench/sustained.py streams). Only the latest
events are kept as they came, so that a client following live reads them without a copy.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

# Raw bytes gathered before they are compressed as one block: large enough for zlib to find the repeats
# between events, small enough that the events not yet compressed cost little.
BLOCK_BYTES = 4096
# Fast: a block is compressed while the stream is relayed, and these repeats need no harder search.
_LEVEL = 1


class RecordedBody:
    """The chunks of one answer in order, as compressed blocks then the latest chunks as they came."""

    __slots__ = ("_blocks", "_block_ends", "_latest", "_latest_start", "_latest_bytes")

    def __init__(self) -> None:
        self._blocks: list[bytes] = []  # each the zlib of BLOCK_BYTES or more of the answer, in order
        self._block_ends: list[int] = []  # where each block ends in the answer
        self._latest: list[bytes] = []
        self._latest_start = 0  # where the latest chunks start in the answer
        self._latest_bytes = 0

    @property
    def size(self) -> int:
        """Raw bytes recorded so far."""
        return self._latest_start + self._latest_bytes

    def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._latest_bytes >= BLOCK_BYTES:
            # The chunks before this one: the newest stays as it came, for whoever reads the answer live.
            self._blocks.append(zlib.compress(b"".join(self._latest), _LEVEL))
            self._latest_start += self._latest_bytes
            self._block_ends.append(self._latest_start)
            self._latest, self._latest_bytes = [], 0
        self._latest.append(chunk)
        self._latest_bytes += len(chunk)

    def joined(self) -> bytes:
        """The whole answer recorded so far."""
        return b"".join(self.since(0))

    def since(self, offset: int) -> list[bytes]:
        """The answer from byte `offset` on: the blocks it reaches into decompressed, then the latest chunks
        themselves (whole, when `offset` falls between them)."""
        return list(self._since(offset))

    def _since(self, offset: int) -> Iterator[bytes]:
        start = 0
        if offset < self._latest_start:
            for block, end in zip(self._blocks, self._block_ends, strict=True):
                if end > offset:
                    raw = zlib.decompress(block)
                    yield raw if start >= offset else raw[offset - start :]
                start = end
        start = self._latest_start
        for chunk in self._latest:
            end = start + len(chunk)
            if end > offset:
                yield chunk if start >= offset else chunk[offset - start :]
            start = end
