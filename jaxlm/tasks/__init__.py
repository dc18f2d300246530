"""Task registry: `config.task` -> the module whose `run(config, workdir)` runs it.

Later stages add their task here; each module is imported only when its task runs.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "pretrain": "jaxlm.tasks.pretrain",
    "sft": "jaxlm.tasks.sft",
    "reward": "jaxlm.tasks.reward",
    "dpo": "jaxlm.tasks.dpo",
    "grpo": "jaxlm.tasks.rl",
    "ppo": "jaxlm.tasks.rl",
    "eval": "jaxlm.evaluate",
    "pipeline": "jaxlm.pipeline",
}


def run(config, workdir: str):
  if config.task not in REGISTRY:
    raise KeyError(f"task={config.task!r}: unknown; one of {', '.join(sorted(REGISTRY))}")
  return importlib.import_module(REGISTRY[config.task]).run(config, workdir)
