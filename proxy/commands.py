"""The CLI's cache commands: stats, purge, export and import, on the same store the proxy uses."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from cache import CacheBackend, CacheError
from cache.control import ControlError
from cache.transfer import MalformedLine, entry_to_line, line_to_entry
from proxy.admin import entry_filter, statistics_report

PROGRESS_EVERY = 1000


class Progress:
    """A one-line counter on stderr for long runs, redrawn in place on a terminal."""

    def __init__(self, verb: str, stream: TextIO | None = None) -> None:
        self.verb = verb
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.live = self.stream.isatty()

    def advance(self) -> None:
        self.count += 1
        if self.live and self.count % PROGRESS_EVERY == 0:
            self.stream.write(f"\r{self.verb} {self.count} entries...")
            self.stream.flush()

    def finish(self, suffix: str = "") -> None:
        self.stream.write(f"{chr(13) if self.live else ''}{self.verb} {self.count} entries{suffix}\n")


async def show_statistics(backend: CacheBackend, as_json: bool) -> int:
    out = sys.stdout
    report = statistics_report(await backend.statistics())
    if as_json:
        out.write(json.dumps(report, indent=2) + "\n")
        return 0
    saved = report["tokens_saved"]
    lines = [
        f"entries       {report['entries']}",
        f"bytes         {report['bytes']}",
        f"hits          {report['hits']}",
        f"misses        {report['misses']}",
        f"hit ratio     {report['hit_ratio']:.1%}",
        f"evictions     {report['evictions']}",
        f"stale served  {report['stale']}",
        f"tokens saved  {saved['total']} ({saved['input']} input, {saved['output']} output)",
        f"cost saved    ${report['cost_saved_usd']:.6f} (hits of unknown price: {report['hits_without_price']})",
        f"time saved    {report['upstream_seconds_saved']:.3f} s of upstream time",
    ]
    for row in report["by_model"]:
        model = f"{row['provider']} {row['model'] or '(no model)'}"
        lines.append(
            f"  {model:<40} hits {row['hits']:<8} input {row['input_tokens']:<10} output {row['output_tokens']:<10}"
            f" ${row['cost_usd']:.6f}  {row['upstream_seconds']:.3f} s"
        )
    out.write("\n".join(lines) + "\n")
    return 0


async def purge(backend: CacheBackend, namespace: str | None, provider: str | None, older_than: str | None) -> int:
    deleted = await backend.purge(entry_filter(namespace, provider, older_than, time.time()))
    sys.stdout.write(f"deleted {deleted} entries\n")
    return 0


async def export_entries(backend: CacheBackend, path: Path) -> int:
    progress = Progress("exported")
    with path.open("w", encoding="utf-8") as file:
        async for key, entry in backend.export_entries():
            file.write(entry_to_line(key, entry) + "\n")
            progress.advance()
    progress.finish(f" to {path}")
    return 0


async def import_entries(backend: CacheBackend, path: Path) -> int:
    """Store every well-formed line; report each malformed one and skip it. Exit status 1 if any was skipped."""
    progress = Progress("imported")
    skipped = 0
    with path.open(encoding="utf-8-sig", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                key, entry = line_to_entry(line)
            except MalformedLine as exc:
                sys.stderr.write(f"{path}:{number}: skipped: {exc}\n")
                skipped += 1
                continue
            await backend.set(key, entry)
            progress.advance()
    progress.finish(f", skipped {skipped} malformed lines" if skipped else "")
    return 1 if skipped else 0


async def run(backend: CacheBackend, command: str, action: Callable[[], Awaitable[int]]) -> int:
    """Open the store, run one command, close it. A failure is one line on stderr and a non-zero status."""
    try:
        await backend.open()
        try:
            return await action()
        finally:
            await backend.close()
    except ControlError as exc:
        sys.stderr.write(f"openai-proxy {command}: {exc}\n")
        return 2
    except (CacheError, OSError) as exc:
        sys.stderr.write(f"openai-proxy {command}: {exc}\n")
        return 1
