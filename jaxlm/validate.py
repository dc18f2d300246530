"""Every problem in a resolved config before anything runs, each one line naming the key.

    errors = config_errors(config, num_devices, num_processes)   # [] when it can run

The checks, in order: what the config shows by itself (`config.schema_errors`: keys,
types, ranges, choices, the model's shape rules); the rules across sections that every
task shares (the mesh against the devices, batch sizes against the data-parallel size
and the processes, data paths, the tokenizer, `init_from`); then the task's own rules,
from its module's `config_errors` (`jaxlm.tasks`, and `jaxlm.evaluate` for
`task="eval"`). The launcher resolves a config (`jaxlm.tasks.resolve`) before it
validates it, so shapes taken from `init_from` are checked here once.
"""

from __future__ import annotations

import os

from jaxlm import config as config_lib, evaluate, fileio, sharding, tasks
from jaxlm.data import lm, prepare, sft, sources
from jaxlm.errors import ConfigError, one_line


TASKS = (*tasks.REGISTRY, "eval")


def config_errors(config, num_devices: int, num_processes: int = 1) -> list[str]:
  """Every problem in `config`, each as one line naming the key. Empty when valid."""
  bad = set()
  errors = config_lib.schema_errors(config, bad)
  if "*" in bad:  # unknown, missing or mistyped keys: every check below reads them
    return errors
  ok = lambda *keys: not bad.intersection(keys)  # noqa: E731  (none reported: safe to compare)
  if ok("lora.rank") and config.lora.rank > 0 and not config.init_from:
    errors.append(f"lora.rank={config.lora.rank} needs init_from: adapters tune a trained "
                  f"base model")
  if config.task not in TASKS:
    errors.append(f"task={config.task!r}: unknown; one of {', '.join(sorted(TASKS))}")
  elif config.task != "eval":
    errors += tasks.config_errors(config, ok)
  errors += config_lib.length_errors(config, ok)
  errors += _mesh_errors(config, num_devices, num_processes, ok)
  if config.task == "eval":
    errors += evaluate.config_errors(config)
  errors += evaluate.path_errors(config.eval)
  errors += _data_errors(config)
  if config.init_from and not os.path.exists(config.init_from):
    errors.append(f"init_from: no such path {config.init_from!r}")
  return [one_line(e) for e in errors]


def _mesh_errors(config, num_devices: int, num_processes: int, ok) -> list[str]:
  """The mesh against the devices; the batch against the data-parallel size, the
  gradient-accumulation microbatches, the processes and the data shards."""
  errors = []
  try:
    sizes = sharding.mesh_shape(config, num_devices)
  except ConfigError as e:
    errors.append(str(e))
    sizes = None
  d = config.data
  if sizes and ok("data.batch_size", "optimizer.grad_accum_steps"):
    dp = sizes["data"] * sizes["fsdp"]
    accum = config.optimizer.grad_accum_steps
    micro = d.batch_size // accum
    if d.batch_size % accum:
      errors.append(f"data.batch_size={d.batch_size} is not divisible by "
                    f"optimizer.grad_accum_steps={accum}")
    elif micro % dp:
      errors.append(f"data.batch_size={d.batch_size} (per microbatch {micro}) is not "
                    f"divisible by the data-parallel size mesh.data*mesh.fsdp={dp}")
    if d.batch_size % num_processes:
      errors.append(f"data.batch_size={d.batch_size} is not divisible by the "
                    f"{num_processes} processes")
  if d.shards and ok("data.shards", "data.batch_size"):
    if config.task not in ("pretrain", "sft"):
      errors.append(f"data.shards={d.shards}: only pretrain and sft split their data into "
                    f"shards; leave it 0 for task={config.task!r}")
    elif d.shards % num_processes or d.batch_size % d.shards:
      errors.append(f"data.shards={d.shards} must be a multiple of the {num_processes} "
                    f"process(es) and divide data.batch_size={d.batch_size}")
  return errors


def _data_errors(config) -> list[str]:
  """data.train / data.eval name something readable; the mixture has sources to weigh;
  the tokenizer file is there."""
  errors = []

  def check(fn):
    try:
      fn()
    except ConfigError as e:
      errors.append(str(e))

  d = config.data
  for key in ("data.train", "data.eval") if config.task != "eval" else ():
    spec = config_lib.get_key(config, key)
    if prepare.is_prepared(spec):
      pass  # a prepared corpus (tools/prepare_data.py); its sources are checked when read
    elif spec and spec.strip().startswith(sft.BUILTIN_PREFIX):
      pass  # generated data (jaxlm.data.sft.BUILTINS), checked when the task builds it
    elif spec and spec.strip().startswith("tfds:"):
      check(lambda spec=spec, key=key: sources.parse_tfds_spec(spec, key))
    elif spec:
      check(lambda spec=spec, key=key: fileio.expand_globs(spec, key))
  if not d.train and config.task != "eval":
    errors.append("data.train: empty; give one or more comma-separated globs")
  if d.mixture:
    check(lambda: lm.parse_mixture(d.mixture))
    if not prepare.is_prepared(d.train):
      errors.append("data.mixture: set, but data.train is not a prepared corpus (a directory "
                    "with prepared.json), so there are no sources to weigh")
  if d.tokenizer and not os.path.isfile(d.tokenizer):
    errors.append(f"data.tokenizer: no such file {d.tokenizer!r}")
  return errors
