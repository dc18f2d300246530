"""Files: atomic writes, the one glob expander, names and paths that stay inside a root.

Every JSON, manifest, config, tokenizer copy and stage record jaxlm writes goes through
`atomic_write`: a temporary file beside the target, flushed and fsynced, renamed over it
(and the folder fsynced), so a reader sees the old file or the new one, never a part.
This module imports nothing from jaxlm: its errors are ValueError / FileNotFoundError,
which callers turn into their own one-line messages.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:  # not every filesystem lets a folder be opened
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, data: bytes | str) -> None:
  """Write `data` to `path` so that `path` is never seen cut short."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(directory)


def atomic_write_json(path: str, obj, **dump_kwargs) -> None:
  dump_kwargs.setdefault("indent", 2)
  atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_copy(source: str, path: str) -> None:
  """Copy a file's bytes to `path` atomically (a tokenizer into a workdir)."""
  with open(source, "rb") as f:
    atomic_write(path, f.read())


def read_json(path: str):
  """A JSON file, or ValueError naming the file (cut short, not JSON, nested too deep)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    reason = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
    raise ValueError(f"{path}: not readable JSON ({reason})") from None


# ---------------------------------------------------------------------------------------
# The one glob expander.


def walk(directory: str):
  """Every file under `directory`, leaving out hidden files and folders and __pycache__."""
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
    yield from (os.path.join(root, f) for f in sorted(names) if not f.startswith("."))


def expand(spec: str) -> list[tuple[str, list[str]]]:
  """Comma-separated patterns -> [(pattern, sorted files)], one entry per pattern.

  The rules, everywhere a path list is read (training data, prepare_data, eval files):
  `~` is expanded; a directory means every file under it, recursively, without hidden
  files or folders and __pycache__; otherwise the pattern is a glob where `*`, `?` and
  `[...]` match within one path part and `**` matches any number of folders. Only files
  are matched. A pattern may match nothing (its list is empty): callers report that.
  Raises ValueError for a pattern no filesystem call can take (a NUL byte, too long)."""
  out = []
  for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
    pattern = os.path.expanduser(pattern)
    try:
      if os.path.isdir(pattern):
        matched = sorted(walk(pattern))
      else:
        matched = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    except (ValueError, OSError) as e:
      raise ValueError(f"can't read {pattern!r}: {e}") from None
    out.append((pattern, matched))
  return out


def glob_roots(pattern: str) -> str | None:
  """The folder a pattern reads recursively (a directory, or the part before `**`), or
  None when it names files of one folder only."""
  pattern = os.path.expanduser(pattern.strip())
  if os.path.isdir(pattern):
    return pattern
  if "**" in pattern:
    return os.path.dirname(pattern[:pattern.index("**")]) or "."
  return None


# ---------------------------------------------------------------------------------------
# Names and paths.


def check_name(name: str, what: str) -> None:
  """A name that is joined onto a folder must be one plain path part: ValueError if it
  is empty, `.` or `..`, absolute, or holds a separator or a NUL byte."""
  if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
      or "\\" in name or "\0" in name or os.path.isabs(name)):
    raise ValueError(f"{what}={name!r}: not a plain name (no path separators, '..' or "
                     f"absolute paths)")


def is_within(path: str, root: str) -> bool:
  """Whether `path` is `root` or lies under it, after resolving links and `..`."""
  path, root = os.path.realpath(path), os.path.realpath(root)
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def overlaps(a: str, b: str) -> bool:
  """Whether one of two folders is the other or lies inside it."""
  return is_within(a, b) or is_within(b, a)


def remove_inside(path: str, root: str) -> None:
  """Remove a file or folder that must lie strictly inside `root`; refuse anything else."""
  if not is_within(path, root) or os.path.realpath(path) == os.path.realpath(root):
    raise ValueError(f"refusing to remove {path}: it is not inside {root}")
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)
