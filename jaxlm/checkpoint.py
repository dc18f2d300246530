"""orbax checkpoints of the whole train state, plus every process's data-iterator state.

A checkpoint step directory holds four items: `params`, `opt_state`, `train`
(step and RNG) and `data` (JSON: one grain iterator state per process). Parameters
are a separate item so later stages can start from them (`init_from`) without the
optimizer that produced them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm.config import ConfigError

ITEMS = ("params", "opt_state", "train", "data")


def _abstract(tree):
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


class Checkpointer:
  """Keep-last-N, optionally asynchronous checkpoints under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict | None):
    """Start saving `state` at `step` (returns before the write finishes when async)."""
    data = {"processes": gather_process_states(data_state)} if data_state is not None else {}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
        data=ocp.args.JsonSave(data)))

  def restore(self, step: int, like_state: dict) -> tuple[dict, dict | None]:
    """Restore into the shapes and shardings of `like_state` (arrays or abstract)."""
    target = _abstract(like_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        train=ocp.args.StandardRestore({"step": target["step"], "rng": target["rng"]}),
        data=ocp.args.JsonRestore()))
    state = {"params": out.params, "opt_state": out.opt_state, "step": out.train["step"],
             "rng": out.train["rng"]}
    processes = (out.data or {}).get("processes")
    if processes and len(processes) != jax.process_count():
      raise ConfigError(f"checkpoint {self.directory}/{step} holds data positions for "
                       f"{len(processes)} process(es); resume it with that many, not "
                       f"{jax.process_count()}")
    data_state = processes[jax.process_index()] if processes else None
    return state, data_state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def find_params_dir(path: str) -> str:
  """A workdir, its checkpoints/ folder, or one step folder -> that step's params item."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "params")):
      return os.path.join(candidate, "params")
    if os.path.isdir(candidate):
      steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
      if steps:
        return os.path.join(candidate, str(max(steps)), "params")
  raise FileNotFoundError(f"no jaxlm checkpoint under {path}")


def step_of(path: str) -> int:
  """The step of the checkpoint `path` names (its latest, for a workdir)."""
  return int(os.path.basename(os.path.dirname(find_params_dir(path))))


def load_params(path: str, like_params) -> dict:
  """Parameters from a jaxlm checkpoint or a Hugging Face model directory, placed like
  `like_params` (shape, dtype and sharding)."""
  from jaxlm import hf  # pylint: disable=import-outside-toplevel
  if hf.is_hf_dir(path):
    _, params = hf.load_hf(path)
    abstract = _abstract(like_params)
    def put(x, like):
      if x.shape != like.shape:
        raise ConfigError(f"init_from: {path} has a parameter of shape {x.shape} where the "
                          f"model config wants {like.shape}")
      return jax.device_put(np.asarray(x).astype(like.dtype), like.sharding)
    return jax.tree.map(put, params, abstract)
  params_dir = find_params_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(params_dir, _abstract(like_params))


def write_json(path: str, obj) -> None:
  """A small JSON file written whole or not at all (a temporary file, renamed)."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def read_json(path: str) -> dict | None:
  """A JSON file's contents; None when it is missing or cut short."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


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
      "steps": sorted(int(d) for d in os.listdir(root) if d.isdigit()),
      "step": int(os.path.basename(step_dir)),
      "params": leaves,
      "num_params": int(sum(np.prod(shape) for _, shape, _ in leaves)),
  }


def pin(workdir: str, name: str, source: str) -> str:
  """The concrete weights `source` names (a HF directory, or the step folder of a jaxlm
  run's latest checkpoint), written to `<workdir>/<name>` at a run's first start and read
  back ever after: a resume or an export uses the same weights even if the source run
  has moved on. Process 0 writes; every process reads. A pin whose source differs from
  `source` is replaced while the workdir has no checkpoint, and is an error after."""
  from jaxlm import hf  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      pinned = json.load(f)
    was = pinned.get("source", pinned.get("init_from"))
    if was != source:
      has_steps = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
          d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints")))
      if has_steps:
        raise ConfigError(f"{path}: this run's checkpoints belong to weights from {was!r}, "
                          f"but the config now says {source!r}; use a new workdir")
      os.remove(path)  # no step was trained on the old pin: take the new source
  if jax.process_index() == 0 and not os.path.isfile(path):
    base = (os.path.abspath(source) if hf.is_hf_dir(source)
            else os.path.dirname(find_params_dir(source)))
    os.makedirs(workdir, exist_ok=True)
    write_json(path, {"base": base, "source": source})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pin {name}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)["base"]
