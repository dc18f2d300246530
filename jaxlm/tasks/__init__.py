"""The training tasks, and the one way each runs.

    config.task -> REGISTRY[config.task].build(config, workdir, sharder) -> loop.Task

Each task module (pretrain, sft, reward_model, dpo, rl) exports `build()`, which turns
the resolved config into a `loop.Task` (what trains, its loss, its data), and
`config_errors()` for the rules only it has; what they share is in `tasks.common`.
Evaluation (`jaxlm.evaluate`) and the pipeline (`jaxlm.pipeline`) are not training
tasks: the launcher runs them itself.
"""

from __future__ import annotations

from jaxlm import config as config_lib, loop
from jaxlm.errors import ConfigError
from jaxlm.tasks import common, dpo, pretrain, reward_model, rl, sft


REGISTRY = {
    "pretrain": pretrain,
    "sft": sft,
    "reward": reward_model,
    "dpo": dpo,
    "grpo": rl,
    "ppo": rl,
}


def resolve(config, workdir: str = "") -> None:
  """The architecture from `init_from` and the vocabulary from the tokenizer, before
  the config is validated (`tasks.common.resolve`)."""
  common.resolve(config, workdir)


def config_errors(config, ok=lambda *keys: True) -> list[str]:
  """The rules of `config.task` alone (its module's `config_errors`), one line each;
  `ok(*keys)` says none of those keys is reported already (a rule across them is safe)."""
  hook = getattr(REGISTRY[config.task], "config_errors", None)
  return hook(config, ok) if hook else []


def run(config, workdir: str):
  """Train `config.task` into `workdir` (resuming what is there); returns the last logged
  metrics. The config is resolved here too (a no-op when the launcher did it)."""
  if config.task not in REGISTRY:
    raise KeyError(f"task={config.task!r}: unknown; one of {', '.join(sorted(REGISTRY))}")
  module = REGISTRY[config.task]
  resolve(config, workdir)
  for error in config_lib.length_errors(config):  # a shape taken from init_from just now
    raise ConfigError(error)
  sharder = loop.make_sharder(config)
  task = module.build(config, workdir, sharder)
  loop.write_config(config, workdir)
  last = loop.train(config, workdir, task, sharder)
  if task.after_training is not None:
    task.after_training()
  return last
