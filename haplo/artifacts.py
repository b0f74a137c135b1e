"""Writing what the tools make without ever touching what a user owns.

Files are written to a hidden name beside the target and renamed over it (`write_atomic`).
Directories (bundles, checkpoints) are assembled in a hidden staging directory beside the target
that carries a marker naming the process that made it, then swapped into place (`swap_into_place`):
with `renameat2(RENAME_EXCHANGE)` where the OS has it, so there is no moment where neither the old
nor the new directory is at the target path.

Before any work, `check_output_dir` refuses a target that the tool did not make: an existing file,
a non-empty directory without the tool's own index file, the working directory or one that holds
it, or a path whose parent cannot be created.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from haplo.errors import OutputError

STAGING_MARKER = ".haplo-staging"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden name beside `path` (same suffix) to write to; renamed over `path` when the block ends
    without error, removed when it fails. Readers see the old file or the new one, never a part."""
    path = Path(path)
    staged = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write a file so that readers see the old content or the new one, never a part of it."""
    with atomic_path(path) as staged:
        staged.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def creatable_parent(path: Path) -> Path | None:
    """The first existing one of `path` and its ancestors if it is a writable directory, else None."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else None
    return None


def check_output_dir(out: Path, owned: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Refuse `out` unless it is absent (and creatable), empty, or a `what` this tool made (`owned`)."""
    out = Path(out)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(
            f"{flag} {out}: that is the working directory (or holds it); name a new directory, "
            f"e.g. {flag} {Path(out, 'NAME')}"
        )
    if not out.exists():
        if out.is_symlink():
            raise OutputError(f"{flag} {out}: a broken symbolic link; remove it or choose another path")
        if creatable_parent(resolved) is None:
            raise OutputError(
                f"{flag} {out}: cannot create it (a parent is a file, or not writable); choose another path"
            )
        return
    if not out.is_dir():
        raise OutputError(
            f"{flag} {out}: exists and is a file, not a {what}; choose another path (nothing was written)"
        )
    if any(out.iterdir()) and not owned(out):
        raise OutputError(
            f"{flag} {out}: exists, is not empty and is not a {what} made by this tool; "
            "choose another path (nothing was written)"
        )


def indexed_dir(root: Path, index: str, field: str, value: str, names: tuple[str, ...] = (), suffix: str = "") -> bool:
    """A directory one of the tool's commands wrote: a JSON `index` whose `field` is `value`, and
    besides it only files named in `names` or ending in `suffix`."""
    try:
        doc = json.loads((Path(root) / index).read_text())
    except (OSError, ValueError):
        return False
    others = [p for p in Path(root).iterdir() if p.name not in (index, *names)]
    return (
        isinstance(doc, dict)
        and doc.get(field) == value
        and all(p.is_file() and bool(suffix) and p.suffix == suffix for p in others)
    )


def foreign_files(root: Path, known: set[str]) -> list[str]:
    """Files under `root` (relative POSIX paths) that are not in `known`: a user's additions."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in known
    )


def staging_dir(out: Path) -> Path:
    """A new hidden directory beside `out`, marked as this process's work in progress."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories of `out` left by killed runs of this tool on this host (marker checked)."""
    removed = []
    for candidate in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            marker = json.loads((candidate / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours: leave it
        if marker.get("host") == socket.gethostname() and not _alive(int(marker.get("pid", -1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def discard_staging(tmp: Path) -> None:
    if (tmp / STAGING_MARKER).exists():
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put the finished staging directory `tmp` at `out`; an old `out` (checked to be ours) goes after."""
    (tmp / STAGING_MARKER).unlink(missing_ok=True)
    out = Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
