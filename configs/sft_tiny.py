"""Supervised fine-tuning of the tiny pretrained model, on CPU in a few minutes.

First pretrain (README, Quick start), then:

  python -m jaxlm.launch --config configs/sft_tiny.py --workdir runs/sft_tiny
  python -m jaxlm.launch --config configs/sft_tiny.py --workdir runs/sft_tiny \
      --config.init_from=path/to/hf_model --config.data.train='alpaca.json'

The built-in data is an instruction set generated from the standard library: "Explain
what this Python function does." with a function signature, answered by the first
paragraph of its docstring (1 in 10 held out). Any Alpaca, messages or prompt/completion
JSON or JSONL file works the same way.
"""

from jaxlm.config import base_config, model_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "sft"
  c.init_from = "runs/tiny"
  c.model = model_config("tiny")
  c.model.remat = "none"
  c.steps = 150
  c.log_every = 10
  c.eval_every = 50
  c.eval_steps = 4
  c.checkpoint_every = 100
  c.data.train = "builtin:stdlib_docstrings:train"
  c.data.eval = "builtin:stdlib_docstrings:eval"
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  return c
