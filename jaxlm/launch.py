"""Entry point: `python -m jaxlm.launch --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

Loads the config (locked: unknown keys are errors), joins a multi-process run when
asked, validates every field before anything compiles, and dispatches on `config.task`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from absl import app, flags
import jax
from jax.experimental import multihost_utils
import numpy as np

from jaxlm import (config as config_lib, console, estimate, evaluate, pipeline, sharding, sweep,
                   tasks, tpu, validate, workdir as workdir_lib)
from jaxlm.cli import define_config_file, parse_flags
from jaxlm.errors import CheckpointError, ConfigError, DataError, TrainingError


_CONFIG = define_config_file("config", "Config file (configs/*.py[:arg]).")  # locked
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
_TPU = flags.DEFINE_string("tpu", None, "Run on this Cloud TPU VM slice (created if needed; "
                           "jaxlm.tpu) instead of here.")
_ZONE = flags.DEFINE_string("zone", None, "--tpu: the slice's zone, e.g. us-east5-a.")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "--tpu: the slice type, e.g. v5p-64.")
_PROJECT = flags.DEFINE_string("project", "", "--tpu: the Google Cloud project (default: "
                               "gcloud's).")
_RUNTIME = flags.DEFINE_string("runtime_version", "", "--tpu: the TPU VM runtime (default: the "
                               "generation's).")
_SPOT = flags.DEFINE_bool("spot", False, "--tpu: a spot slice (preemptible; --tpu_action=watch "
                          "recreates it and resumes).")
_TPU_ACTION = flags.DEFINE_string("tpu_action", "up", "--tpu: up (create, copy, setup, run) | "
                                  "create | copy | setup | run | logs | watch | delete.")
flags.mark_flags_as_required(["config", "workdir"])


def _tpu(config) -> int:
  """The run, or each sweep trial, as a Cloud TPU job (jaxlm.tpu)."""
  spec, cli = _CONFIG.spec, _CONFIG.overrides
  devices = tpu.slice_devices(_ACCELERATOR.value or "")
  hosts = max(devices // 4, 1)  # 4 devices a TPU VM worker
  remote = tpu.REMOTE_KEYS  # paths the workers see, not this machine: checked there
  if _SWEEP.value:
    trials = sweep.plan(spec, config, cli, _WORKDIR.value, devices, hosts, ignore=remote)
    jobs = [(f"{_TPU.value}-{i}", t) for i, t in enumerate(trials)]
  else:
    tasks.resolve(config)
    errors = [e for e in validate.config_errors(config, devices, hosts)
              if not e.startswith(remote)]
    if errors:
      raise tpu.TpuError(errors[0])
    jobs = [(_TPU.value, {"workdir": _WORKDIR.value, "flags": sweep.override_flags(cli)})]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sh = tpu.Runner(_DRY_RUN.value)
  built = [(t, tpu.Job(name=name, zone=_ZONE.value, accelerator=_ACCELERATOR.value, config=spec,
                       workdir=t["workdir"], overrides=tuple(t["flags"]),
                       project=_PROJECT.value, runtime_version=_RUNTIME.value,
                       spot=_SPOT.value))
           for name, t in jobs]  # every job's names checked before any command runs
  for t, job in built:
    if "name" in t:
      console.info(f"# trial {t['name']!r} -> {job.name}")
    tpu.perform(job, _TPU_ACTION.value, sh, root)
  return 0


def _sweep(config, num_devices: int, num_processes: int) -> int:
  trials = sweep.plan(_CONFIG.spec, config, _CONFIG.overrides, _WORKDIR.value, num_devices,
                      num_processes)
  failed = sweep.run(trials, _WORKDIR.value, dry_run=_DRY_RUN.value)
  if failed:
    console.error(f"error: {failed} of {len(trials)} trials failed")
  return 1 if failed else 0


@contextlib.contextmanager
def _locked(workdir: str):
  """The workdir's lock, held by process 0 for the whole run; every process of a
  multi-process job stops if process 0 could not take it."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.lock(workdir))
      except workdir_lib.WorkdirError as e:
        error = e
      except OSError as e:  # a read-only or full disk, no permission
        error = workdir_lib.WorkdirError(f"--workdir {workdir}: can't lock it ({e})")
    if jax.process_count() > 1:
      held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not held and error is None:
        error = workdir_lib.WorkdirError(f"--workdir {workdir}: process 0 could not lock it")
    if error is not None:
      raise error
    yield


def _run(config, workdir: str):
  """`config.task` into `workdir`: a training task, an evaluation or a pipeline."""
  if config.task == "pipeline":
    return pipeline.run(config, workdir)
  if config.task == "eval":
    return evaluate.run(config, workdir)
  return tasks.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  console.quiet()  # orbax's INFO lines and async tracebacks, unless --verbosity
  config = _CONFIG.value
  if _TPU.value:  # nothing runs here: gcloud starts it on the slice
    try:
      sys.exit(_tpu(config))
    except (ConfigError, tpu.TpuError) as e:
      console.error(f"error: {e}")
      sys.exit(2)
  if _WORKDIR.value.startswith("gs://"):
    console.error(f"error: --workdir={_WORKDIR.value}: gs:// workdirs are for Cloud TPU jobs "
                  f"(--tpu), which mount the bucket on every worker with gcsfuse; here, give a "
                  f"local or mounted path")
    sys.exit(2)
  if _SWEEP.value:  # trials run as launcher processes of their own
    if ((_NUM_PROCESSES.value or int(os.environ.get("JAX_NUM_PROCESSES", "1"))) > 1
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
      console.error("error: --sweep runs its trials one after another from one process; start it "
                    "once (not under srun or with --num_processes), or give each trial its own job")
      sys.exit(2)
    try:
      sys.exit(_sweep(config, jax.device_count(), 1))
    except ConfigError as e:
      console.error(f"config error: {e}")
      sys.exit(2)
  try:
    sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
  except sharding.ShardingError as e:
    console.error(f"error: {e}")
    sys.exit(2)
  if config.task == "pipeline":
    errors = pipeline.config_errors(config, jax.device_count(), jax.process_count())
  else:  # resolve (shapes from init_from, the vocabulary from the tokenizer), then validate
    errors = config_lib.schema_errors(config)
    try:
      if not errors:
        tasks.resolve(config, _WORKDIR.value)
        errors = validate.config_errors(config, jax.device_count(), jax.process_count())
    except ConfigError as e:  # init_from's config.json, a tokenizer that can't be read
      errors = [str(e)]
    if not errors:  # lengths the devices can't hold fail here, not after minutes of work
      errors = estimate.memory_errors(config, sharding.mesh_shape(config, jax.device_count()),
                                      estimate.device_memory_bytes())
  if errors:
    for e in errors:
      console.error(f"config error: {e}")
    sys.exit(2)
  try:
    workdir_lib.check(config, _WORKDIR.value, resolved=False)  # before anything is written
    with _locked(_WORKDIR.value):
      _run(config, _WORKDIR.value)
  except workdir_lib.WorkdirError as e:
    _fail(f"error: {e}", 2)
  except (ConfigError, sharding.ShardingError) as e:
    _fail(f"config error: {e}", 2)
  except DataError as e:
    _fail(f"data error: {e}", 2)
  except (TrainingError, CheckpointError) as e:  # the checkpoints written so far stay
    _fail(f"error: {e}", 1)
  except OSError as e:  # a full disk, a vanished mount: the file and the reason
    _fail(f"error: {e}", 1)


def _fail(line: str, code: int):
  """The run's failure as one line on stderr, then exit `code`. A checkpoint write that
  failed part way (a full disk) leaves orbax's unfinished write coroutines behind;
  Python would warn about each at shutdown, after the line that already said why."""
  console.error(line)
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  sys.exit(code)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
