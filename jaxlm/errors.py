"""Every exception jaxlm raises on purpose, and the one-line form of any exception.

This module imports nothing: every layer above may raise or catch these. Each error's
message is one line that names the key, the file and line, or the step; the launcher and
`tools/` print it as `error: ...` with a non-zero exit.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config problem, phrased as one line naming the key."""


class HFError(ConfigError):
  """A Hugging Face directory jaxlm can't read or write, phrased as one line naming the
  file (a ConfigError, so the launcher prints it as one line)."""


class DataError(ValueError):
  """A bad record, phrased as one line starting with its file and line."""


class MarkerError(ValueError):
  """Content next to a template marker kept the marker from being one token."""


class ShardingError(ValueError):
  """A mesh or partition spec that can't hold the arrays asked of it."""


class FolderError(ValueError):
  """A target a folder can't replace (not empty, not an earlier one of its kind)."""


class WorkdirError(Exception):
  """The workdir holds something this run must not touch, or another run holds it."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read; one line."""


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss under nan_policy="stop", too many skipped
  updates); one line naming the step."""


class EstimateError(ValueError):
  """A bad input to the cost estimator, phrased as one line."""


class TpuError(ValueError):
  """A bad TPU setting, as one line."""


class StageIncomplete(RuntimeError):
  """A pipeline stage ended before its last step (stopped by a signal or a data limit)."""


class Interrupted(BaseException):
  """SIGTERM outside a stage's training (which stops at a checkpoint on its own)."""


def one_line(message) -> str:
  """`message` as one line: line breaks (from a value or a library's text) escaped."""
  text = str(message).strip()
  return text.replace("\r", "\\r").replace("\n", "\\n")


def error_detail(e: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
