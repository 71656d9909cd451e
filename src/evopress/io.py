"""Atomic file output and the on-disk cache location.

A search can be killed at any moment; every file we write goes to a temporary name in the same
directory and is renamed into place, so readers see either the old or the new file, never half of one.
"""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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
def locked_dir(path: Path, what: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on an output directory for a whole run.

    Two runs writing one directory would leave a mix of both (a result of one seed beside the recipe
    of another). ``flock`` is released by the kernel when the process ends, even by SIGKILL, so a
    killed run never leaves a stale lock behind.
    """
    path = writable_dir(path, what)
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
        yield path
    finally:
        os.close(fd)
