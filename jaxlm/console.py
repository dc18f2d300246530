"""What reaches the user's terminal from the libraries underneath.

jaxlm says what happened in its own lines (and one line on stderr for an error). orbax
logs every save at INFO and, when a write fails, each of its threads' tracebacks at
ERROR; tensorstore's callbacks print "Event loop is closed" tracebacks when they fire
after orbax closed its event loop. `quiet()` keeps those out, and other libraries' INFO
lines, unless the user asks with absl's --verbosity (then everything shows, as the
libraries wrote it); warnings from jaxlm and the rest still show.
"""

from __future__ import annotations

import logging as py_logging
import sys
import threading

from absl import flags, logging

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
