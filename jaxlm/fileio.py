"""Files: atomic writes, the one glob expander, names and paths that stay inside a root,
and folders replaced whole (exports).

Every JSON, manifest, config, tokenizer copy and stage record jaxlm writes goes through
`atomic_write`: a temporary file beside the target, flushed and fsynced, renamed over it
(and the folder fsynced), so a reader sees the old file or the new one, never a part.
This module imports nothing from jaxlm: its errors are ValueError / FileNotFoundError,
which callers turn into their own one-line messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile

from jaxlm.errors import ConfigError, FolderError, one_line


def fsync_dir(directory: str) -> None:
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


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _umask()


def atomic_write(path: str, data: bytes | str) -> None:
  """Write `data` to `path` so that `path` is never seen cut short. The file keeps the
  mode it had (a new one gets the usual 0666 less the umask); a link is written through
  (its target replaced, the link kept), and a path that is no regular file (a device,
  /dev/stdout) is written plainly."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if os.path.islink(path):
    path = os.path.realpath(path)
  if os.path.exists(path) and not os.path.isfile(path):
    with open(path, "wb") as f:
      f.write(raw)
    return
  try:
    mode = os.stat(path).st_mode & 0o7777
  except FileNotFoundError:
    mode = 0o666 & ~_UMASK
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), mode)
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_dir(directory)


def atomic_write_json(path: str, obj, **dump_kwargs) -> None:
  dump_kwargs.setdefault("indent", 2)
  atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_copy(source: str, path: str) -> None:
  """Copy a file's bytes to `path` atomically (a tokenizer into a workdir)."""
  with open(source, "rb") as f:
    atomic_write(path, f.read())


def read_json(path: str, expect: type | None = None, *, optional: bool = False):
  """A JSON file, or ValueError naming the file (cut short, not JSON, nested too deep; or,
  with `expect`, not of that type: dict for a JSON object). `optional`: None instead when
  the file is missing or not readable JSON (a record another run may not have written)."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    if optional:
      return None
    raise
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if optional:
      return None
    reason = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
    raise ValueError(f"{path}: not readable JSON ({reason})") from None
  if expect is not None and not isinstance(value, expect):
    what = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
    raise ValueError(f"{path}: must hold {what}")
  return value


def write_jsonl(path: str, records) -> str:
  """Records as JSON lines, written whole or not at all; returns `path`."""
  atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
  return path


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


def expand_globs(spec: str, key: str) -> list[str]:
  """Comma-separated globs or directories -> sorted file list (the rules are
  `fileio.expand`'s: `**` recurses, a directory means every file under it); an error
  naming `key` if one matches nothing."""
  try:
    expanded = expand(spec)
  except ValueError as e:  # a NUL byte, a path too long
    raise ConfigError(one_line(f"{key}: {e}")) from None
  files = []
  for pattern, matched in expanded:
    if not matched:
      raise ConfigError(one_line(f"{key}: no file matches {pattern!r}"))
    files.extend(matched)
  return files




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
  """Remove a file that must lie strictly inside `root`; refuse anything else (a folder,
  a path that leads out of `root`). A missing file is no error."""
  if not is_within(path, root) or os.path.realpath(path) == os.path.realpath(root):
    raise ValueError(f"refusing to remove {path}: it is not inside {root}")
  if os.path.isdir(path) and not os.path.islink(path):
    raise ValueError(f"refusing to remove {path}: a folder, where a file was expected")
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


# ---------------------------------------------------------------------------------------
# A folder replaced whole.


def _line(message) -> str:
  return " ".join(str(message).split())


# A folder replaced whole (an export: save_hf, export_hf, import_hf) is written into a
# staging folder beside its
# target, `.NAME.jaxlm-export-<hex>`, whose marker file (EXPORT_MARKER) names the target
# and the writing process. When every file is written and fsynced, the marker is
# rewritten (atomically) to list every file and folder written, and the staging folder is
# renamed into place: onto an absent or empty target with rename(2), onto an earlier
# export by exchanging the two folders atomically (renameat2 RENAME_EXCHANGE, Linux); the
# earlier export, now in the staging folder, is then deleted, its marker last. A kill at
# any moment leaves the old export or the new one, whole, at the target, and at most one
# staging folder, which the next export to that target deletes: only folders of that
# name holding a marker for that target (or nothing but the marker's temporary file),
# and not one a live process on this host is still writing. Where the exchange is not
# available (not Linux; a filesystem without it) the earlier export is renamed aside
# first: a kill between the two renames leaves no target, and the earlier export whole
# in `.NAME.jaxlm-export-<hex>` beside it.
#
# A previous export is recognized by its marker: complete, of the same kind, and listing
# every entry of the folder (nothing was added since). Any other non-empty target is
# refused, untouched.

EXPORT_MARKER = "jaxlm_export.json"
STAGING = ".jaxlm-export-"


def _target(path: str) -> tuple[str, str, str]:
  """(absolute target, its parent, its name); FolderError for a path with no name."""
  target = os.path.abspath(path)
  parent, name = os.path.split(target)
  if not name:
    raise FolderError(f"{path}: not a folder an export can be written to")
  return target, parent, name


def _entries(folder: str) -> list[str]:
  """Every file and folder under `folder`, relative, folders with a trailing '/'; a
  symbolic link (never written by an export) with a trailing '@'."""
  out = []
  for root, dirs, files in os.walk(folder):
    rel = os.path.relpath(root, folder)
    for name in dirs + files:
      path = os.path.join(root, name)
      entry = os.path.normpath(os.path.join(rel, name))
      out.append(entry + ("@" if os.path.islink(path) else "/" if name in dirs else ""))
  return sorted(out)


def _read_marker(folder: str) -> dict | None:
  try:
    marker = read_json(os.path.join(folder, EXPORT_MARKER))
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and "jaxlm_export" in marker else None


def check_replaceable(path: str, kind: str, what: str) -> None:
  """FolderError (one line naming `path`) unless `path` may receive a folder of `kind`
  (`what`, in words): absent, an empty folder, or an earlier one of that kind holding
  nothing it did not write."""
  target, _, _ = _target(path)
  if os.path.islink(target):
    raise FolderError(f"{path}: a symbolic link; export to the folder it points to, or "
                  f"another path")
  if not os.path.lexists(target):
    return
  if not os.path.isdir(target):
    raise FolderError(f"{path}: exists and is not a folder; nothing was written")
  try:
    entries = _entries(target)
  except OSError as e:
    raise FolderError(_line(f"{path}: can't list it ({e.strerror or e})")) from None
  if not entries:
    return
  marker = _read_marker(target)
  if marker is None or not marker.get("complete") or not isinstance(marker.get("files"), list):
    raise FolderError(_line(f"{path}: not empty and not {what} written by jaxlm (no "
                           f"{EXPORT_MARKER}); nothing was written: give a new or empty "
                           f"folder"))
  if marker["jaxlm_export"] != kind:
    raise FolderError(_line(f"{path}: holds a jaxlm export of another kind "
                           f"({marker['jaxlm_export']!r}), not {what}; nothing was written"))
  foreign = sorted(set(entries) - set(marker["files"]) - {EXPORT_MARKER})
  if foreign:
    raise FolderError(_line(f"{path}: {foreign[0].rstrip('/@')} was not written by the "
                           f"export there, which would replace it; nothing was written: "
                           f"move it away or give another folder"))


def _alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def _remove_staging(path: str) -> None:
  """Delete a staging folder, its marker last, so that a kill part way leaves it still
  recognizable for the next export to finish."""
  for entry in os.listdir(path):
    if entry != EXPORT_MARKER:
      child = os.path.join(path, entry)
      if os.path.isdir(child) and not os.path.islink(child):
        shutil.rmtree(child)
      else:
        os.unlink(child)
  with contextlib.suppress(FileNotFoundError):
    os.unlink(os.path.join(path, EXPORT_MARKER))
  os.rmdir(path)


def _clean_staging(parent: str, name: str) -> None:
  """Delete the staging folders a killed export to `parent/name` left beside it: folders
  named like one whose marker names this target (but not one a live process on this
  host is still writing), or that hold nothing but the marker's own temporary file
  (killed as it was first written)."""
  pattern = re.compile(re.escape(f".{name}{STAGING}") + r"[0-9a-f]+")
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
      continue
    marker = _read_marker(path)
    if marker is None:
      if all(e.startswith(f".{EXPORT_MARKER}.") and e.endswith(".tmp")
             for e in os.listdir(path)):
        _remove_staging(path)
      continue
    if marker.get("target") != name:
      continue
    if (not marker.get("complete") and marker.get("host") == socket.gethostname()
        and _alive(marker.get("pid"))):
      continue  # another export to the same target, still writing
    _remove_staging(path)


def _fsync_tree(folder: str) -> None:
  for root, _, files in os.walk(folder):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(root)


def _exchange(a: str, b: str) -> bool:
  """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where the
  system or the filesystem can't."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):  # a libc older than glibc 2.28
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def _commit(staging: str, target: str, prefix: str) -> str | None:
  """Put the complete staging folder at `target` (see the section's comment); the
  earlier export's folder, now beside the target, for the caller to delete."""
  if not os.path.lexists(target) or not os.listdir(target):
    os.rename(staging, target)  # rename(2) replaces an empty folder
    return None
  if _exchange(staging, target):
    return staging
  aside = prefix + secrets.token_hex(4)
  os.rename(target, aside)  # still marked: a kill here leaves it for the next export
  try:
    os.rename(staging, target)
  except OSError:
    os.rename(aside, target)
    raise
  return aside


@contextlib.contextmanager
def replaced_folder(path: str, kind: str, what: str):
  """A staging folder to write a folder of `kind` into; on leaving the block without an
  error, it replaces `path` whole. FolderError, with nothing changed, when `path` is neither
  absent, empty nor a previous export of `kind`; an error in the block removes the
  staging folder and leaves `path` as it was."""
  target, parent, name = _target(path)
  check_replaceable(path, kind, what)
  try:
    os.makedirs(parent, exist_ok=True)
    _clean_staging(parent, name)
    prefix = os.path.join(parent, f".{name}{STAGING}")
    staging = prefix + secrets.token_hex(4)
    os.mkdir(staging)
  except OSError as e:
    raise FolderError(_line(f"{path}: can't write beside it ({e.strerror or e})")) from None
  mark = {"jaxlm_export": kind, "target": name, "host": socket.gethostname(),
          "pid": os.getpid()}
  try:
    atomic_write_json(os.path.join(staging, EXPORT_MARKER), {**mark, "complete": False})
    yield staging
    files = [e for e in _entries(staging) if e != EXPORT_MARKER]
    _fsync_tree(staging)
    atomic_write_json(os.path.join(staging, EXPORT_MARKER),
                             {**mark, "complete": True, "files": files})
    check_replaceable(path, kind, what)  # it may have changed while this wrote
    earlier = _commit(staging, target, prefix)
  except Exception as e:  # a kill leaves the staging folder instead: the next export deletes it
    with contextlib.suppress(OSError):
      _remove_staging(staging)
    if isinstance(e, OSError):  # a full disk, say: the reason, and that nothing changed
      raise OSError(_line(f"{path}: writing the export failed ({e.strerror or e}); "
                             f"{path} is as it was")) from None
    raise
  fsync_dir(parent)
  if earlier:
    with contextlib.suppress(OSError):  # what is left, the next export deletes
      _remove_staging(earlier)
