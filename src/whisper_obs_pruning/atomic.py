"""Atomic writes, the one implementation every artifact uses (files, directories, plots).

A file is written to a temporary name in the same directory, fsync'ed, then renamed over the
target, so a process killed at any moment leaves the old file or the new one, never half of
one. A directory is built in a temporary sibling and swapped in by two renames; a kill between
them is undone on the next use (``_recover_directory``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    tmp_path = temp_sibling(target, directory=False)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save safetensors atomically; return the file's sha256."""
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={k: str(v) for k, v in meta.items()},
        )
        digest = sha256_file(tmp)
    return digest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove temp siblings of ``name`` left by writers that died (SIGTERM, SIGKILL, power).

    Temp names carry the writer's pid (``.<name>.<pid>.<random>.tmp``); one whose process is
    gone is debris. A live writer's temp (a concurrent process) is left alone.
    """
    removed = []
    for p in parent.glob(f".{name}.*.tmp"):
        parts = p.name[len(name) + 2 :].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid != os.getpid() and not _pid_alive(pid):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temp_sibling(target: Path, *, directory: bool) -> Path:
    """A fresh temp path next to ``target`` (same filesystem, so a rename is atomic)."""
    prefix, suffix = f".{target.name}.{os.getpid()}.", ".tmp"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in for ``target``.

    Every file is fsync'ed and made readable per the umask; the swap is two renames (old
    aside, new in place) and the old copy is removed afterwards. ``overwrite=False``: if
    ``target`` exists when the build is done (a concurrent writer won), theirs is kept and
    ours discarded. Debris of writers that died is removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_directory(target)
    remove_stale_temps(target.parent, target.name)
    tmp = temp_sibling(target, directory=True)
    try:
        yield tmp
        umask = _umask()
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                os.chmod(f, 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        _fsync_dir(tmp)
        if target.exists() and not overwrite:
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_directory(target: Path) -> None:
    """Undo what a kill between the two renames of a swap left: the old copy set aside."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"))
    if aside:
        os.replace(aside[-1], target)


def check_writable(targets: dict[str, str | Path]) -> None:
    """Fail before a stage's work when one of its outputs cannot be written.

    A read-only or missing-permission folder would otherwise surface only at the final atomic
    rename, after minutes of calibration or pruning. For each output a probe file is written
    and removed in the folder that will receive it (inside the output too when it is a folder
    that receives files); a folder that does not exist yet is probed at its nearest existing
    ancestor, where it will be created, so the check itself creates nothing. ``targets`` maps
    a name for the message to the path.
    """
    for name, target in targets.items():
        target = Path(target).absolute()
        folders = [target.parent] + ([target] if target.is_dir() else [])
        for folder in folders:
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            try:
                fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"{exc.strerror or exc}: cannot write the output {name} {target}",
                    str(folder),
                ) from exc
