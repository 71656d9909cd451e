"""Atomic file output and the on-disk cache location.

A search can be killed at any moment; every file we write goes to a temporary name in the same
directory and is renamed into place, so readers see either the old or the new file, never half of one.
"""

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("EVOPRESS_CACHE", Path.home() / ".cache" / "evopress"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``.

    ``mkstemp`` creates the temporary file 0600; it is widened to what ``open`` would have given
    (0666 minus the umask) so exported models and results stay readable by the user's other tools.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror or e}") from e
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def writable_dir(path: Path, what: str = "--out") -> Path:
    """Create ``path`` if needed and refuse one we cannot write, before any compute is spent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable")
    return path


LOCK = ".evopress.lock"


@contextmanager
def locked_dir(path: Path, what: str = "--out", keep_lock: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on an output directory for a whole run.

    Two runs writing one directory would leave a mix of both (a result of one seed beside the recipe
    of another). ``flock`` is released by the kernel when the process ends, even by SIGKILL, so a
    killed run never leaves a stale lock behind. A run refused once it holds the lock (a model that
    does not load, a missing database) leaves no trace: the lock file it made goes, and so does the
    directory if the run made it and nothing else was written there. ``keep_lock`` False: the lock
    file this run made goes after a successful run too (a directory meant to be handed on, an export).
    """
    made_dir = not Path(path).exists()
    path = writable_dir(path, what)
    made_lock = not (path / LOCK).exists()
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{what} {path} is in use by another evopress run (pid {holder}); wait for it or "
                            "choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        except BaseException:
            _clean_up(path, made_lock, made_dir)
            raise
        if not keep_lock:
            _clean_up(path, made_lock, False)
    finally:
        os.close(fd)


def _clean_up(path: Path, made_lock: bool, made_dir: bool) -> None:
    """Remove the lock file this run made, and the directory it made if that is then empty."""
    with suppress(OSError):  # never hides the error that ended the run
        if made_lock:
            (path / LOCK).unlink()
        if made_dir and not any(path.iterdir()):
            path.rmdir()


STAGE = ".evopress-partial"  # where ``owned_dir`` writes before moving the files in


@contextmanager
def owned_dir(path: Path, marker: str, reads: Mapping[Path, str] | None = None, what: str = "--out",
              record: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Claim ``path`` for a command that writes a whole directory (``export``); yields where to write.

    Why: a model, a result or a level database given as ``--out`` would have its files overwritten or
    mixed with ours. ``path`` must be new, empty, or hold ``marker``: the list of files this command
    wrote there before (and ``record``), which a rerun replaces, leaving files the user added. It may
    never be one of the directories the command ``reads`` ({path: what it is}). Files are written to a
    staging directory inside the locked ``path`` and moved in when all are written, ``marker`` first
    (naming the old and new files while they change) and again last, atomically: a run that fails or
    is killed leaves the previous output whole, and its directory still ours.
    """
    for source, name in (reads or {}).items():
        if Path(path).resolve() == Path(source).resolve():
            raise UserError(f"{what} {path} is {name}; writing there would overwrite it: choose a new directory")
    _check_owned(Path(path), marker, what)  # before the lock file is made in it
    with locked_dir(path, what, keep_lock=False) as path:
        _check_owned(path, marker, what)
        stage = path / STAGE
        shutil.rmtree(stage, ignore_errors=True)  # left by a killed run
        stage.mkdir()
        try:
            yield stage
            _move_in(stage, path, marker, record or {})
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _check_owned(path: Path, marker: str, what: str) -> None:
    """Refuse a directory holding anything but an earlier output of this command (a readable ``marker``)."""
    if not path.is_dir():
        return
    if (path / marker).is_file():
        _owned_files(path, marker)  # refused now if unreadable, not once the work is done
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in (LOCK, STAGE))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"{what} {path} already holds files ({shown}) and no {marker}, so no earlier run of this "
                        "command wrote it; choose a new or empty directory")


def _owned_files(path: Path, marker: str) -> list[str]:
    """The files ``marker`` lists, as paths inside ``path`` (a hand-edited entry cannot reach outside)."""
    saved = read_json(path / marker) if (path / marker).is_file() else {}
    files = saved.get("files", []) if isinstance(saved, dict) else []
    return [f for f in files if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts]


def _move_in(stage: Path, path: Path, marker: str, record: Mapping[str, Any]) -> None:
    """Replace the files ``marker`` lists with the staged ones; ``marker`` names both sets meanwhile."""
    new = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    old = _owned_files(path, marker)
    write_json(path / marker, {**record, "files": sorted(set(old) | set(new))})
    try:
        for name in set(old) - set(new):
            (path / name).unlink(missing_ok=True)
        for name in new:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, path / name)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    write_json(path / marker, {**record, "files": new})
