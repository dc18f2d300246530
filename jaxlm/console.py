"""What reaches the user's terminal: jaxlm's own lines, and the libraries underneath.

jaxlm's one logger is `log`, the Python logger "jaxlm" (the logging absl's is built on;
every module's `logging.getLogger(__name__)` is a child of it). `info`, `warning` and
`error` are its front door. Each record becomes one plain line: INFO on stdout, WARNING
on stderr as "warning: ...", ERROR on stderr as given (its caller names the kind, as in
"config error: ..."). Lines are written through `tqdm.write`, so a progress bar open on
the terminal (the training loop's, the data preparation's) is cleared and drawn again
below the line instead of being broken by it.

jaxlm says what happened in its own lines (and one line on stderr for an error). orbax
logs every save at INFO and, when a write fails, each of its threads' tracebacks at
ERROR; tensorstore's callbacks print "Event loop is closed" tracebacks when they fire
after orbax closed its event loop. `quiet()` keeps those out, and other libraries' INFO
lines, unless the user asks with absl's --verbosity (then everything shows, as the
libraries wrote it); warnings from jaxlm and the rest still show.

`environment()` is what a record says about where it was made (report.json, the
benchmark results).
"""

from __future__ import annotations

import datetime
import logging as py_logging
import os
import platform
import subprocess
import sys
import threading

from absl import flags, logging
import jax
from tqdm import tqdm


class _Lines(py_logging.Handler):
  """One plain line per record, on the stream its level goes to, around any open bar."""

  def emit(self, record) -> None:
    try:
      line = self.format(record)
      if record.levelno >= py_logging.ERROR:
        stream = sys.stderr
      elif record.levelno >= py_logging.WARNING:
        stream, line = sys.stderr, f"warning: {line}"
      else:
        stream = sys.stdout  # looked up now: a caller (or a test) may have replaced it
      tqdm.write(line, file=stream)
      stream.flush()
    except Exception:  # pylint: disable=broad-except  # logging's own contract
      self.handleError(record)


log = py_logging.getLogger("jaxlm")
log.setLevel(py_logging.INFO)
log.addHandler(_Lines())
log.propagate = False  # not again through absl's handler, with its prefix


def info(message: str) -> None:
  """A line saying what a run did: stdout."""
  log.info(message)


def warning(message: str) -> None:
  """A line saying what a run did not do or did differently: stderr, "warning: ..."."""
  log.warning(message)


def error(message: str) -> None:
  """The one line an error gets: stderr, as given ("error: ...", "config error: ...")."""
  log.error(message)


# Errors raised in library callbacks after their event loop is gone: the failure they
# follow has been reported already, in jaxlm's own line.
_AFTERMATH = ("Event loop is closed",)


def _is_aftermath(exc_type, value) -> bool:
  return exc_type is RuntimeError and str(value) in _AFTERMATH


class _NotFromOrbax(py_logging.Filter):
  """Drops the records orbax logs (absl names the calling file in each record), and
  asyncio's "exception was never retrieved" for the futures of its failed writes."""

  def filter(self, record) -> bool:
    if "/orbax/" in record.pathname.replace("\\", "/"):
      return False
    return not (record.name == "asyncio" and "never retrieved" in str(record.msg))


def quiet() -> None:
  """Unless --verbosity was given: absl logs at WARNING and above (jaxlm's own warnings
  stay), orbax's records not at all, and the late event-loop errors of asynchronous
  writes are not printed."""
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  orbax = _NotFromOrbax()
  for target in [py_logging.getLogger("absl"), py_logging.getLogger("asyncio"),
                 *py_logging.getLogger().handlers]:
    if not any(isinstance(f, _NotFromOrbax) for f in target.filters):
      target.addFilter(orbax)
  excepthook, thread_hook, unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

  def hook(exc_type, value, tb):
    if not _is_aftermath(exc_type, value):
      excepthook(exc_type, value, tb)

  def in_thread(args):
    if not _is_aftermath(args.exc_type, args.exc_value):
      thread_hook(args)

  def unraisable_hook(args):
    if not _is_aftermath(args.exc_type, args.exc_value):
      unraisable(args)

  sys.excepthook, threading.excepthook, sys.unraisablehook = hook, in_thread, unraisable_hook


def environment() -> dict:
  """Where and from what a run or a measurement came: the date (UTC), the command, the
  device kind, platform and count, CPU cores, the JAX and Python versions, XLA_FLAGS and
  the git revision of this checkout (marked when it has uncommitted changes)."""
  # launch imports this module before its flags are parsed; jax loads once a run starts
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    rev += " (with uncommitted changes)" if dirty else ""
  except (OSError, subprocess.SubprocessError):
    rev = "unknown (not a git checkout)"
  device = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": " ".join([os.path.basename(sys.executable),
                               *getattr(sys, "orig_argv", sys.argv)[1:]]),
          "device": device.device_kind, "platform": device.platform,
          "devices": jax.device_count(), "cpu_cores": os.cpu_count(), "jax": jax.__version__,
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "git": rev}
