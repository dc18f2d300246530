"""A run's workdir: one run at a time, and nothing written before the config is checked.

    check(config, workdir)   refuse a folder that holds something else (WorkdirError)
    with lock(workdir): ...  one launcher per workdir; a second exits at once
    write_config(config, workdir)   check, then config.json, atomically

A workdir that holds a Hugging Face model, another task's run or a run of another
architecture is refused with nothing changed. The lock is a file, `.jaxlm.lock`, held
with flock(2) by process 0 of a run and naming its host, pid and start time; the kernel
drops the flock when that process dies, so a lock file left behind by a killed run is
taken over (with a line saying so), never mistaken for a live run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from jaxlm import checkpoint, console, fileio
from jaxlm.errors import WorkdirError


LOCK = ".jaxlm.lock"
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
CONFIG = "config.json"
# Model keys that fix the weights' shapes: a resume must keep them (others, such as
# rope_theta for a context extension or the training fields, may change).
SHAPE_FIELDS = ("family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_dim", "qkv_bias", "tie_embeddings")


def _is_run_config(d) -> bool:
  return isinstance(d, dict) and isinstance(d.get("task"), str) and isinstance(
      d.get("model", {}), dict) and "model_type" not in d and "architectures" not in d


def architecture(model: dict, lora: dict | None) -> dict:
  """The fields that fix a run's weight shapes: the model's SHAPE_FIELDS (and gpt2's
  learned position table, max_seq_len), LoRA's rank and targets."""
  fields = SHAPE_FIELDS + (("max_seq_len",) if model.get("family") == "gpt2" else ())
  out = {f"model.{k}": model[k] for k in fields if k in model}
  for k in ("rank", "targets"):
    if lora and k in lora:
      out[f"lora.{k}"] = lora[k]
  return out


def check(config, workdir: str, resolved: bool = True) -> None:
  """Raise WorkdirError if `workdir` holds something this run must not write over:
  a Hugging Face model, a file that is not a jaxlm run's config, another task's run, or
  checkpoints of another architecture. `resolved=False` (before init_from and the
  tokenizer have fixed the model) compares only the keys this config already fixes."""
  if not os.path.exists(workdir):
    return
  if not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir}: exists and is not a directory")
  path = os.path.join(workdir, CONFIG)
  weights = [n for n in os.listdir(workdir) if n.endswith((".safetensors", ".bin", ".pt"))
             or n == "model.safetensors.index.json"]
  if not os.path.isfile(path):
    if weights:
      raise WorkdirError(f"--workdir {workdir}: holds model weights ({weights[0]}) and no jaxlm "
                         f"run; nothing was changed. Give it as init_from and choose a new "
                         f"--workdir")
    return
  try:
    theirs = fileio.read_json(path)
  except ValueError as e:
    raise WorkdirError(f"--workdir {workdir}: {e}; nothing was changed. Is it a run's folder?") \
        from None
  if not _is_run_config(theirs):
    what = ("a Hugging Face model" if isinstance(theirs, dict) and (
        "model_type" in theirs or "architectures" in theirs or weights) else "a config.json "
        "that is not a jaxlm run's")
    raise WorkdirError(f"--workdir {workdir}: holds {what} ({path}); nothing was changed. Give "
                       f"it as init_from and choose a new --workdir")
  if config.task == "eval":
    return  # an evaluation writes eval.json and samples.jsonl only, beside any run
  if theirs["task"] != config.task:
    raise WorkdirError(f"--workdir {workdir}: holds a task={theirs['task']!r} run, and this "
                       f"config is task={config.task!r}; nothing was changed. Choose another "
                       f"--workdir")
  if not checkpoint.steps_in(os.path.join(workdir, "checkpoints")) or "model" not in config:
    return  # nothing trained there yet: this run's config replaces that one
  lora = config.lora.to_dict() if "lora" in config else None
  ours = architecture(config.model.to_dict(), lora)
  was = architecture(theirs.get("model") or {}, theirs.get("lora"))
  for key, value in ours.items():
    if key not in was or was[key] == value:
      continue
    if not resolved and (key == "model.vocab_size" and value == 0 or config.get("init_from")):
      continue  # fixed later by the tokenizer or init_from; checked again before writing
    raise WorkdirError(f"--workdir {workdir}: its checkpoints are of another architecture "
                       f"({key}={was[key]!r} there, {value!r} in this config); nothing was "
                       f"changed. Choose another --workdir, or the same {key}")


def write_config(config, workdir: str) -> None:
  """The resolved config as `workdir/config.json`, once `check` passes (process 0)."""
  check(config, workdir)
  fileio.atomic_write_json(os.path.join(workdir, CONFIG),
                           json.loads(config.to_json_best_effort()), sort_keys=True)


# ---------------------------------------------------------------------------------------
# One run per workdir.


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
          f"{holder.get('started', '?')}")


@contextlib.contextmanager
def lock(workdir: str, log=None):
  """Hold `workdir`'s lock for the block; WorkdirError naming the holder if another
  run has it. A lock file whose holder is gone is taken over with a line to `log`."""
  log = log or console.warning
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raw = os.pread(fd, 4096, 0)
      os.close(fd)
      if e.errno in _NO_LOCKS:  # Lustre without -o flock, NFS without lockd
        log(f"warning: {workdir}'s filesystem has no file locks ({e.strerror}); this run "
            f"is not protected from a second launcher on the same workdir")
        yield {}
        return
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"--workdir {workdir}: can't lock {path} ({e})") from None
      try:
        holder = json.loads(raw)
      except ValueError:
        holder = {}
      raise WorkdirError(f"--workdir {workdir}: another run holds it ({_describe(holder)}; "
                         f"{path}); wait for it to end or choose another --workdir") from None
    try:  # the file may have been removed (and made anew) between our open and flock
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    raw = os.pread(fd, 4096, 0)
    if raw.strip():
      try:
        holder = json.loads(raw)
      except ValueError:
        holder = {}
      log(f"taking over the lock of {workdir} left by {_describe(holder)}, which no longer "
          f"holds it")
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    yield me
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)  # while still held: a waiting opener retries on the new file
    os.close(fd)
