"""The one way rag-ecg writes files: atomically and durably, plus JSON helpers and the versions stamp.

Atomic = temp file in the same folder, fsync, rename over the target, fsync the folder: a reader never sees
half a file, and after a crash the file is either the old one or the new one. Finished files get the
usual umask permissions (mkstemp's 0600 would hide results from colleagues on a shared machine).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from rag_ecg import __version__

_UMASK = os.umask(0o022)
os.umask(_UMASK)

# distribution name -> key in a versions stamp (keys match what older manifests recorded)
_DISTRIBUTIONS = {"torch": "torch", "open_clip_torch": "open_clip", "timm": "timm", "numpy": "numpy",
                  "faiss-cpu": "faiss", "faiss-gpu": "faiss", "sqlalchemy": "sqlalchemy", "pillow": "pillow",
                  "transformers": "transformers", "peft": "peft", "opencv-python-headless": "opencv"}


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(target: str | Path) -> Path:
    """A new empty file beside `target` (same filesystem, so a rename onto `target` is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | Path, target: str | Path) -> None:
    """fsync `tmp`, give it umask permissions, rename it onto `target`, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on success it replaces `path`, on error it vanishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r} (use 'w' or 'wb')")
    tmp = temp_path(path)
    try:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}  # text: the bytes as written, any OS
        with open(tmp, mode, **text) as f:
            yield f
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically and durably."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def atomic_write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Atomically produce `path` with a writer that wants a file name (FAISS, PIL, safetensors, …)."""
    tmp = temp_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A temp folder beside `final` to fill; on success it takes `final`'s place (an existing `final` is moved
    aside, replaced, then deleted), on error it vanishes and `final` is untouched. For outputs that are
    folders: model checkpoints, converted models, adapters."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the result from colleagues
        old = replace_dir(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(folder: str | Path, final: str | Path) -> Path | None:
    """Put the finished `folder` in `final`'s place; returns where the old `final` now is (delete it), or None.

    Where the OS can swap two folders in one step (Linux renameat2 RENAME_EXCHANGE) it does, so a reader, or a
    crash, sees the old folder or the new one, never neither; the old one is then at `folder`. Elsewhere the
    old one is first moved aside to `.<name>.old.<pid>` (a crash between the two renames leaves it there)."""
    folder, final = Path(folder), Path(final)
    fsync_dir(folder)
    if not final.exists():
        os.replace(folder, final)
        fsync_dir(final.parent)
        return None
    if _exchange(folder, final):
        fsync_dir(final.parent)
        return folder
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    os.replace(final, old)
    os.replace(folder, final)
    fsync_dir(final.parent)
    return old


def recover_dir(final: str | Path) -> bool:
    """Finish a `replace_dir` that was killed between its two renames (no `final`, the old folder moved aside
    to `.<name>.old.<pid>`): move the newest such folder back into place. True when it did."""
    final = Path(final)
    if final.exists():
        return False
    olds = sorted(final.parent.glob(f".{final.name}.old.*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], final)
    fsync_dir(final.parent)
    return True


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the OS or the filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def json_text(obj: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """JSON as rag-ecg writes it: unknown types (paths, datetimes) as strings, trailing newline."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n"


def write_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """`obj` as JSON at `path`, atomically."""
    return atomic_write(path, json_text(obj, indent=indent, sort_keys=sort_keys))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, record: Any) -> None:
    """One JSON line appended and flushed (logs of metrics; a torn last line is skipped by readers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def versions() -> dict[str, str]:
    """What made an artifact: rag_ecg, Python and the installed libraries that shape its bytes."""
    out = {"rag_ecg": __version__, "python": platform.python_version()}
    for dist, key in _DISTRIBUTIONS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def version_mismatches(saved: dict[str, str]) -> list[str]:
    """'torch 2.14.1 -> 2.13.0' for each library whose version differs from the one that saved.

    A local build label ('2.14.1+cu130', which older manifests recorded from `torch.__version__`) is not a
    different version: only the public part before '+' is compared."""
    now = versions()
    return [f"{k} {v} -> {now[k]}" for k, v in sorted(saved.items())
            if k in now and _public_version(now[k]) != _public_version(v)]


def _public_version(v: object) -> str:
    return str(v).split("+", 1)[0]
