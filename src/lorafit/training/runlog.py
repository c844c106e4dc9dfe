"""The run folder's live log while training (the folder's rules, lock and checks are in `lorafit.rundir`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as C
from . import dist


class JsonlLog:
    """Append-only log.jsonl; on resume it is cut back to the lines the checkpoint had seen.

    `sink` (the experiment trackers) sees every record rank 0 writes; log.jsonl stays the source of truth.
    """

    def __init__(self, path: Path, keep_lines: int | None, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        if keep_lines is not None:
            lines = lines[:keep_lines]
            if dist.is_main():  # one writer, atomic: a kill here must not lose the lines before the checkpoint
                C.atomic_write_text(path, "".join(lines))
        self.lines = len(lines)
        self.enabled = dist.is_main()
        self.sink = sink if self.enabled else None
        self.f = open(path, "a", encoding="utf-8") if self.enabled else None

    def write(self, rec: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()
        if self.sink is not None:
            self.sink(rec)
        self.lines += 1

    def sync(self) -> None:
        if self.f is not None:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
