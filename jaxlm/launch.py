"""Entry point: `python -m jaxlm.launch --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

Loads the config (locked: unknown keys are errors), joins a multi-process run when
asked, validates every field before anything compiles, and dispatches on `config.task`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.config import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 for multi-process runs "
                                   "(or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run "
                                      "(or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every trial of the config file's get_sweep(arg) "
                           "into WORKDIR/<trial name>/ (jaxlm.sweep).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --sweep or --tpu: print what would run "
                             "(the trials, the gcloud commands) and run nothing.")
flags.mark_flags_as_required(["config", "workdir"])


def _sweep(config, num_devices: int, num_processes: int) -> int:
  from jaxlm import sweep  # pylint: disable=import-outside-toplevel
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  trials = sweep.plan(spec, config, config_flags.get_override_values(flags.FLAGS["config"]),
                      _WORKDIR.value, num_devices, num_processes)
  failed = sweep.run(trials, _WORKDIR.value, dry_run=_DRY_RUN.value)
  if failed:
    print(f"error: {failed} of {len(trials)} trials failed", file=sys.stderr)
  return 1 if failed else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlm import sharding, tasks  # pylint: disable=import-outside-toplevel
  from jaxlm.config import ConfigError, validate  # pylint: disable=import-outside-toplevel
  from jaxlm.data.sft import DataError  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _SWEEP.value:  # trials run as launcher processes of their own
    try:
      sys.exit(_sweep(config, jax.device_count(), 1))
    except ConfigError as e:
      print(f"config error: {e}", file=sys.stderr)
      sys.exit(2)
  try:
    sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
  except sharding.ShardingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if config.task == "pipeline":
    from jaxlm import pipeline  # pylint: disable=import-outside-toplevel
    errors = pipeline.validate(config, jax.device_count(), jax.process_count())
  else:
    errors = validate(config, jax.device_count(), jax.process_count())
  if config.task not in tasks.REGISTRY:
    errors.insert(0, f"task={config.task!r}: unknown; one of {', '.join(sorted(tasks.REGISTRY))}")
  if errors:
    for e in errors:
      print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    tasks.run(config, _WORKDIR.value)
  except (ConfigError, sharding.ShardingError) as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
