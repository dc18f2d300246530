"""orbax checkpoints of the whole train state, plus every process's data-iterator state.

A checkpoint step directory holds four items: `params`, `opt_state`, `train`
(step, RNG and the count of skipped updates) and `data` (JSON: the data iterators'
states, one per data shard where the data is sharded (pretrain, sft), so a run resumes
on any process count that divides the shard count; else one per process). Parameters
are a separate item so later stages can start from them (`init_from`) without the
optimizer that produced them.

orbax writes each step into a temporary directory and renames it when complete, so a
write cut short never looks like a checkpoint (leftovers are removed at the next start).
A step directory that is there but unreadable (truncated or missing files) is passed
over on resume for the newest one that restores (`restore_latest`), and moved aside,
never deleted.
"""

from __future__ import annotations

import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.data.lm import local_shards
from jaxlm.errors import CheckpointError, ConfigError, error_detail


ITEMS = ("params", "opt_state", "train", "data")
TRAIN_KEYS = ("step", "rng", "skipped", "consecutive_skips")


def abstract(tree):
  """Arrays -> ShapeDtypeStructs that keep their shardings (restore targets); a leaf
  without one lands on the first device, whatever devices the checkpoint was saved from."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or default), tree)


def gather_process_states(state: dict) -> list:
  """Every process's JSON-able iterator state, in process order, on every process."""
  if jax.process_count() == 1:
    return [state]
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[: int(n)]).decode()) for row, n in
          zip(everything.reshape(len(lengths), -1), np.ravel(lengths))]


def gather_data_state(state: dict) -> dict:
  """The checkpoint's `data` item, from this process's iterator state and every other's."""
  return merge_data_states(gather_process_states(state))


def merge_data_states(states: list) -> dict:
  """Every process's iterator state, in process order -> the checkpoint's `data` item:
  per-shard states (jaxlm.data.lm.ShardedData) merged into {"shard_count": S, "shards":
  {"<s>": ...}}; other states as {"processes": states}."""
  if not all(isinstance(s, dict) and "shard_count" in s for s in states):
    return {"processes": states}
  shards = {k: v for s in states for k, v in s["shards"].items()}
  return {"shard_count": states[0]["shard_count"],
          "shards": {k: shards[k] for k in sorted(shards, key=int)}}


def local_data_state(data: dict, process_index: int, process_count: int,
                     where: str) -> dict | None:
  """Process `process_index`'s part of a checkpoint's `data` item (None when it holds
  none): the states of its shards (any process count that divides the shard count), or,
  from a checkpoint with one state per process, its own (that process count only; any,
  for a state marked {"scope": "global"}: every process read the whole stream, as RL's
  prompts are read).
  CheckpointError (one line, naming `where`) otherwise."""
  if "shard_count" in data:
    count = data["shard_count"]
    if count % process_count:
      raise CheckpointError(f"{where} holds data positions for {count} data shards; resume it "
                            f"on a process count that divides {count}, not {process_count}")
    return {"shard_count": count, "shards": {
        str(i): data["shards"][str(i)] for i in local_shards(count, process_index,
                                                             process_count)}}
  processes = data.get("processes")
  if not processes:
    return None
  if (isinstance(processes[0], dict) and processes[0].get("scope") == "global"
      and all(p == processes[0] for p in processes)):  # every process held the whole stream
    return processes[0]
  if len(processes) != process_count:
    raise CheckpointError(f"{where} holds the data positions of {len(processes)} "
                          f"process(es), not of data shards (written before jaxlm kept them "
                          f"per shard, or by a task whose data is not sharded); resume it on "
                          f"{len(processes)} process(es), not {process_count}")
  return processes[process_index]


class Checkpointer:
  """Keep-last-N, optionally asynchronous checkpoints under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.last_saved = -1  # the step of the newest write this process started

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict | None):
    """Start saving `state` at `step` (returns before the write finishes when async).
    A failed write (a full disk) raises CheckpointError; the step directories already
    complete are left as they were. With async saves, a failure shows at the next save,
    `wait` or `close`."""
    data = gather_data_state(data_state) if data_state is not None else {}
    self.wait()  # the previous write's failure, if any, is reported as its own
    try:
      self.manager.save(step, force=True, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          opt_state=ocp.args.StandardSave(state["opt_state"]),
          train=ocp.args.StandardSave({k: state[k] for k in TRAIN_KEYS}),
          data=ocp.args.JsonSave(data)))
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
      self._failed(step, e)
    self.last_saved = step

  def _failed(self, step: int, e: Exception):
    previous = self.manager.latest_step()  # complete step directories only
    kept = f"step {previous} is the newest complete one" if previous else "none is complete"
    raise CheckpointError(f"writing checkpoint {self.directory}/{step} failed "
                          f"({error_detail(e)}); {kept}, kept as it was") from e

  def restore(self, step: int, like_state: dict) -> tuple[dict, dict | None]:
    """Restore into the shapes and shardings of `like_state` (arrays or abstract)."""
    target = abstract(like_state)
    def restore(keys):
      return self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target["params"]),
          opt_state=ocp.args.StandardRestore(target["opt_state"]),
          train=ocp.args.StandardRestore({k: target[k] for k in keys}),
          data=ocp.args.JsonRestore()))
    try:
      out = restore(TRAIN_KEYS)
    except Exception as e:  # pylint: disable=broad-except
      try:  # written before the skip counters existed: they start from zero
        out = restore(TRAIN_KEYS[:2])
      except Exception:  # pylint: disable=broad-except
        raise e from None
    state = {"params": out.params, "opt_state": out.opt_state,
             **{k: out.train.get(k, like_state[k]) for k in TRAIN_KEYS}}
    data_state = local_data_state(out.data or {}, jax.process_index(), jax.process_count(),
                                  f"checkpoint {self.directory}/{step}")
    return state, data_state

  def restore_latest(self, like_state: dict, say) -> tuple[int | None, dict, dict | None]:
    """The newest checkpoint that restores: (step, state, data_state), or (None,
    like_state, None) when there is none. A newer step directory that fails to restore
    while an older one succeeds is unreadable (cut short, files missing): `say` reports
    it in one line and it is moved aside to `<step>.unreadable`, never deleted. When no
    step restores (a config that no longer matches them, say), nothing is moved and
    CheckpointError names the newest's failure."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state, data_state = self.restore(step, like_state)
      except (ConfigError, CheckpointError):  # readable, but not resumable as configured
        raise
      except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
        failed.append((step, e))
        say(f"checkpoint {self.directory}/{step} is unreadable ({error_detail(e)})"
            + (f"; trying step {steps[len(failed)]}" if len(failed) < len(steps) else ""))
        continue
      for bad, _ in failed:
        self._move_aside(bad, say)
      return step, state, data_state
    if failed:
      step, e = failed[0]
      raise CheckpointError(f"no checkpoint under {self.directory} restores; the newest, step "
                            f"{step}: {error_detail(e)}") from e
    return None, like_state, None

  def _move_aside(self, step: int, say):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable"
    if jax.process_index() == 0:
      n = 1
      while os.path.exists(dst):
        dst, n = f"{src}.unreadable{n}", n + 1
      os.rename(src, dst)
      say(f"moved {src} aside to {dst}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"move aside checkpoint {step}")
    self.manager.reload()

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self.last_saved, e)

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def steps_in(folder: str) -> list[int]:
  """The steps saved in a checkpoints folder (its all-digit subfolders), sorted; [] when
  there is no such folder."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def restore_params(path: str, like_params) -> dict:
  """The `params` item of the jaxlm checkpoint `path` names (a workdir, its checkpoints
  folder or a step folder; the latest step unless a step folder is given), placed like
  `like_params`. `runs.load_params` also takes Hugging Face directories."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(find_params_dir(path), abstract(like_params))


def find_params_dir(path: str) -> str:
  """A workdir, its checkpoints/ folder, or one step folder -> that step's params item."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "params")):
      return os.path.join(candidate, "params")
    steps = steps_in(candidate)
    if steps:
      return os.path.join(candidate, str(max(steps)), "params")
  raise FileNotFoundError(f"no jaxlm checkpoint under {path}")


def step_of(path: str) -> int:
  """The step of the checkpoint `path` names (its latest, for a workdir)."""
  return int(os.path.basename(os.path.dirname(find_params_dir(path))))


def describe(path: str) -> dict:
  """What a checkpoint holds, from its metadata alone (no arrays are read).

  Returns {"directory", "steps", "step", "params": [(name, shape, dtype)], "num_params"}.
  """
  params_dir = find_params_dir(path)
  step_dir = os.path.dirname(params_dir)
  root = os.path.dirname(step_dir)
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(params_dir).item_metadata
  leaves = [(jax.tree_util.keystr(p), tuple(m.shape), str(m.dtype))
            for p, m in jax.tree_util.tree_leaves_with_path(tree)]
  return {
      "directory": root,
      "steps": steps_in(root),
      "step": int(os.path.basename(step_dir)),
      "params": leaves,
      "num_params": int(sum(np.prod(shape) for _, shape, _ in leaves)),
  }
