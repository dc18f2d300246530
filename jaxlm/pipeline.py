"""`config.task = "pipeline"`: the stages from raw text to an aligned model, in order,
each in its own subfolder of the workdir, evaluated when it ends, then a report card.

    tokenizer/   SentencePiece trained on the pretraining text
    pretrain/    the base model                       (config.pretrain: a pretrain config)
    sft/         the instruction-tuned model          (config.sft)
    reward/      the reward model, from sft/          (config.reward)
    dpo/         DPO from sft/, reference sft/        (config.dpo)
    rl/          GRPO or PPO from dpo/                (config.rl; rl.init_from=@sft skips DPO)
    <stage>/eval/        eval.json, samples.jsonl     (jaxlm.evaluate)
    report.md, report.json, plots/*.png               (jaxlm.report)

A stage config names its inputs as `@stage` paths (`init_from = "@sft"`,
`reward.model = "@reward"`), resolved inside the workdir. Re-running the command skips
what has finished (a stage whose run reached its last step, an evaluation of that
step) and resumes an interrupted stage from its last checkpoint. `config.stages`
selects a subset; a selected stage whose input stage is absent is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time

import jax
from jax.experimental import multihost_utils
import ml_collections

from jaxlm import (checkpoint, config as config_lib, console, evaluate, fileio, loop, report, tasks,
                   validate)
from jaxlm.config import base_config
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError, Interrupted, StageIncomplete
from jaxlm.tasks.common import documents


STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "rl")
STAGE_FILE = "stage.json"    # per stage: seconds spent training, over every attempt


def resolve_paths(config, root: str):
  """A copy of `config` with every string `@name[/rest]` made `root/name[/rest]`."""
  def walk(node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value)
      elif isinstance(value, str) and value.startswith("@"):
        node[key] = os.path.join(os.path.abspath(root), value[1:])
  out = ml_collections.ConfigDict(config.to_dict())
  walk(out)
  return out


def selected(config) -> list[str]:
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ConfigError(f"stages={config.stages!r}: each must be one of {', '.join(STAGES)}")
  return [s for s in STAGES if s in names]


def config_errors(config, num_devices: int, num_processes: int = 1) -> list[str]:
  """Every stage's config problems, each prefixed with its key (`sft.optimizer.lr=...`).
  `@` paths are produced by earlier stages, so here they only need to be there."""
  try:
    names = selected(config)
  except ConfigError as e:
    return [str(e)]
  errors = []
  for name in names:
    if name == "tokenizer":
      if not config.tokenizer.vocab_size > 0:
        errors.append(f"tokenizer.vocab_size={config.tokenizer.vocab_size}: must be > 0")
      spec = config.tokenizer.train.strip()
      if not spec.startswith(("builtin:", "tfds:")):
        try:
          fileio.expand_globs(spec, "tokenizer.train")
        except ConfigError as e:
          errors.append(str(e))
      continue
    stage = resolve_paths(config[name], os.getcwd())
    for key, _ in _at_paths(config[name]):  # not there yet: stand in an existing path
      config_lib.set_key(stage, key, "" if key == "data.tokenizer" else ".")
    errors += [f"{name}.{e}" for e in validate.config_errors(stage, num_devices, num_processes)]
  return errors


def _at_paths(config, prefix: str = ""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _at_paths(value, f"{prefix}{key}.")
    elif isinstance(value, str) and value.startswith("@"):
      yield f"{prefix}{key}", value


def _stage_record(stage_dir: str) -> dict | None:
  """A stage's record (its inputs' fingerprint, time spent), None before it first ran;
  one that can't be read is an error naming it, never a reason to skip the check."""
  path = os.path.join(stage_dir, STAGE_FILE)
  if not os.path.exists(path):
    return None
  try:
    return fileio.read_json(path, dict)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{e}; delete {stage_dir} to retrain that stage") from None


def finished(stage_dir: str, steps: int | None = None) -> bool:
  """Whether a stage's run reached its last step (the loop's summary.json says so), and
  at least `steps` of them (a re-run with more steps continues it)."""
  summary = fileio.read_json(os.path.join(stage_dir, "summary.json"), optional=True)
  return bool(summary and summary.get("finished") and summary["step"] >= (steps or 0))


def _barrier(name: str):
  """Every process waits here: what process 0 wrote before it is there for all."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def train_tokenizer(config, folder: str, log=console.info) -> str:
  """The tokenizer stage: SentencePiece on up to `tokenizer.sample_chars` characters of
  `tokenizer.train`, by process 0."""
  path = os.path.join(folder, "tokenizer.model")
  _barrier("pipeline tokenizer check")  # all processes see the same file, or none
  if os.path.exists(path):
    log(f"[tokenizer] finished: {path}")
    return path
  t0 = time.perf_counter()
  if jax.process_index() == 0:
    data = base_config().data
    data.on_error = "skip"  # an empty file among many is no reason to stop; counted
    docs = documents(config.tokenizer.train, data, "tokenizer.train", folder)
    try:
      tokenizer_lib.train(docs.sample_text(config.tokenizer.sample_chars), path,
                          config.tokenizer.vocab_size)
    except ValueError as e:
      raise ConfigError(f"tokenizer.vocab_size={config.tokenizer.vocab_size}: {e}") from None
    fileio.atomic_write_json(os.path.join(folder, STAGE_FILE),
                {"seconds": time.perf_counter() - t0, "attempts": 1})
  _barrier("pipeline tokenizer")
  log(f"[tokenizer] {config.tokenizer.vocab_size} pieces -> {path} "
      f"({time.perf_counter() - t0:.1f}s)")
  return path


# Fields that say how a run is watched, not what it trains: changing them (or `steps`,
# which continues a finished run) keeps its results.
_NOT_FINGERPRINTED = ("steps", "progress", "log_every", "eval_every", "eval_steps",
                      "checkpoint_every", "keep_checkpoints", "async_checkpointing", "eval",
                      "preemption_grace_s", "nan_policy", "max_skipped_steps",
                      "loss_spike_factor", "loss_spike_window")


def _inputs(config, name: str, workdir: str) -> dict:
  """What a stage trains from: its config (less _NOT_FINGERPRINTED) and, for each
  `@stage` it reads, that stage's last step and config fingerprint."""
  own = {k: v for k, v in config[name].to_dict().items() if k not in _NOT_FINGERPRINTED}
  out = {"config": hashlib.sha256(json.dumps(own, sort_keys=True, default=str).encode())
                   .hexdigest()[:16]}
  for key, value in _at_paths(config[name]):
    stage = value[1:].split("/")[0]
    record = _stage_record(os.path.join(workdir, stage)) or {}
    summary = fileio.read_json(os.path.join(workdir, stage, "summary.json"), optional=True) or {}
    if not key.startswith("eval."):
      out[stage] = {"step": summary.get("step"), "config": record.get("inputs", {}).get("config")}
  return out


def eval_section(config, name: str, workdir: str):
  """The stage's evaluation: its own eval section, plus what earlier stages make
  measurable (the reward model judges DPO and RL answers against those of the stage
  they started from, and their KL is to the SFT model)."""
  e = ml_collections.ConfigDict(config[name].eval.to_dict())
  has = lambda s: finished(os.path.join(workdir, s))  # noqa: E731
  if name == "reward":
    e.tasks, e.text = "", ""
  else:
    e.pairs = ""
  if name in ("dpo", "rl"):
    if not e.reference and has("sft"):
      e.reference = os.path.join(workdir, "sft")
    if not e.reward_model and has("reward"):
      e.reward_model = os.path.join(workdir, "reward")
    start = config[name].init_from  # win rate over the stage it started from
    samples = os.path.join(workdir, start[1:], "eval", "samples.jsonl")
    if not e.baseline and e.reward_model and start.startswith("@") and os.path.isfile(samples):
      e.baseline = os.path.dirname(samples)
  return resolve_paths(e, workdir)


def _check_inputs(config, name: str, workdir: str):
  """Each `@stage` a stage reads exists and, if it is a trained stage, has finished."""
  for key, value in _at_paths(config[name]):
    stage = value[1:].split("/")[0]
    path = os.path.join(workdir, value[1:])
    trained = stage in STAGES[1:]
    if not os.path.exists(path) or (trained and not finished(os.path.join(workdir, stage))):
      raise ConfigError(f"{name}.{key}={value!r}: {path} is not "
                        f"{'a finished run' if trained else 'there'}; run the {stage} stage "
                        f"first (config.stages)")


def run_stage(config, name: str, workdir: str, log=console.info) -> None:
  stage_dir = os.path.join(workdir, name)
  stage = resolve_paths(config[name], workdir)
  if not stage.seed:
    stage.seed = config.seed
  _check_inputs(config, name, workdir)
  inputs = _inputs(config, name, workdir)
  record = _stage_record(stage_dir)
  if record and record.get("inputs") not in (None, inputs):  # trained from something else
    changed = [k for k in inputs if record["inputs"].get(k) != inputs[k]]
    what = ", ".join(f"its config ({name}.*)" if k == "config" else f"the {k} stage it "
                     f"reads" for k in changed)
    raise ConfigError(f"{name}: {stage_dir} was trained with other inputs ({what} changed "
                      f"since); delete that folder to retrain it, or use a new workdir")
  trained = not finished(stage_dir, stage.steps)
  if not trained:
    log(f"[{name}] finished")
  else:
    log(f"[{name}] {stage.task}, {stage.steps} steps -> {stage_dir}")
    t0 = time.perf_counter()
    # The inputs are recorded before the stage starts: after a kill at any point (SIGKILL
    # included), a changed config is refused instead of resuming the old checkpoints.
    record = record or {"seconds": 0.0, "attempts": 0}
    if jax.process_index() == 0:
      fileio.atomic_write_json(os.path.join(stage_dir, STAGE_FILE), {**record, "inputs": inputs})
    try:
      tasks.run(stage, stage_dir)
    finally:
      if jax.process_index() == 0:
        record.update(seconds=record["seconds"] + time.perf_counter() - t0,
                      attempts=record["attempts"] + 1, inputs=inputs)
        fileio.atomic_write_json(os.path.join(stage_dir, STAGE_FILE), record)
      _barrier(f"pipeline {name} trained")
    if not finished(stage_dir, stage.steps):
      summary = fileio.read_json(os.path.join(stage_dir, "summary.json"), optional=True) or {}
      if summary.get("stopped_by") == "data":
        raise ConfigError(f"{name}.steps={stage.steps}: its data ran out at step "
                          f"{summary.get('step')} ({name}.data.on_exhausted='stop'); lower "
                          f"the steps or give it more data")
      raise StageIncomplete(f"[{name}] stopped at step {summary.get('step')} of "
                            f"{stage.steps} (a signal); re-run the same command to resume it")
  eval_dir = os.path.join(stage_dir, "eval")
  e = eval_section(config, name, workdir)
  done = fileio.read_json(os.path.join(eval_dir, evaluate.EVAL_FILE), optional=True)
  step = checkpoint.step_of(stage_dir)
  if (done and done.get("step") == step and done.get("config") == e.to_dict()
      and not trained):  # the same weights, evaluated the same way
    log(f"[{name}] evaluated")
    return
  log(f"[{name}] evaluating step {step}")
  try:
    evaluate.evaluate(e, stage_dir, eval_dir, log=lambda m: log(f"[{name}] {m}"))
  except ConfigError as err:  # name the stage's key: sft.eval.tasks=...
    raise ConfigError(f"{name}.{err}" if str(err).startswith("eval.") else str(err)) from None


@contextlib.contextmanager
def _sigterm_interrupts():
  """SIGTERM raises Interrupted wherever the pipeline is (a tokenizer, an evaluation, the
  report), so that unit is abandoned whole: each writes its result atomically at its end,
  and the next run redoes it. The training loop installs its own handler while it runs."""
  if jax.process_count() > 1:  # JAX's preemption notifier owns SIGTERM there (the loop
    yield                      # agrees on a step to stop at); a Python handler would
    return                     # replace it
  def handle(signum, frame):  # pylint: disable=unused-argument
    raise Interrupted()
  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # not the main thread: signals are not ours to take
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def run(config, workdir: str) -> dict:
  names = selected(config)
  workdir = os.path.abspath(workdir)  # @paths are pinned by later stages: one spelling
  loop.write_config(config, workdir)
  t0 = time.perf_counter()
  log = console.info
  phase = "start"
  try:
    with _sigterm_interrupts():
      for name in names:
        phase = f"the {name} stage"
        if name == "tokenizer":
          train_tokenizer(config, os.path.join(workdir, "tokenizer"), log)
        else:
          run_stage(config, name, workdir, log)
      phase = "the report"
      result = report.write(config, workdir)
  except StageIncomplete as e:
    log(str(e))
    return {}
  except Interrupted:
    log(f"SIGTERM: stopped during {phase}; what it had not finished is redone by the next "
        f"run; re-run the same command to resume")
    return {}
  log(f"pipeline: {', '.join(names)} in {time.perf_counter() - t0:.0f}s; report: "
      f"{os.path.join(workdir, report.REPORT_MD)}")
  return result
