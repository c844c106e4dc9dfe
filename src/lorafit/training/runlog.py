"""The run folder's live files while training: the append-only log and the folder lock."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
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


def finished(run_dir: Path) -> bool:
    p = run_dir / "log.jsonl"
    if not (p.is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()):
        return False
    for ln in p.read_text(encoding="utf-8").splitlines()[-3:]:
        try:
            if json.loads(ln).get("event") == "end":
                return True
        except ValueError:
            pass
    return False


def check_output_dir(out: Path) -> None:
    """Fail before anything is written if the output folder cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{probe} is not a folder", file=str(out), field="output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("output folder is not writable", file=str(out), field="output_dir")
    # os.access only reads mode bits: root passes it even where nothing can be created (/proc, /sys,
    # read-only mounts), so try for real with a probe file that is removed at once.
    try:
        fd, name = tempfile.mkstemp(prefix=".lorafit-probe-", dir=probe)
    except OSError as e:
        raise ConfigError(f"output folder cannot be created in {probe} ({e.strerror})", file=str(out),
                          field="output_dir") from None
    os.close(fd)
    os.unlink(name)


class FolderLock:
    """An exclusive lock on the run folder for the life of the run.

    Two `lorafit train` processes writing one folder would interleave log lines and checkpoints; the
    second is refused instead. The flock dies with its process (kill -9 included); `release` (called on
    every exit path, the watchdog's included) also removes the `.lock` file, but only by its holder.
    """

    def __init__(self, out: Path) -> None:
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".lock"
        self.f: Any = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            self.f = None
            raise ConfigError("output folder is in use by another `lorafit train`", file=str(out),
                              field="output_dir") from None

    def release(self) -> None:
        if self.f is not None:
            self.path.unlink(missing_ok=True)
            self.f.close()
            self.f = None


def lock_output_dir(out: Path) -> Any:
    """The run folder's lock (kept for callers of the earlier API: returns the open, locked file)."""
    return FolderLock(out).f
