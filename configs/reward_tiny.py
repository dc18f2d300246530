"""A reward model from the tiny SFT model, on CPU in a few minutes.

First pretrain and fine-tune (README, Quick start; configs/sft_tiny.py), then:

  python -m jaxlm.launch --config configs/reward_tiny.py --workdir runs/reward_tiny
  python -m jaxlm.launch --config configs/reward_tiny.py --workdir runs/rm \
      --config.init_from=runs/sft --config.data.train='prefs.jsonl' --config.data.eval=''

The built-in pairs come from the same instructions as sft_tiny's ("Explain what this
Python function does."): the function's own docstring is chosen; rejected is another
function's docstring, the docstring with its words shuffled, or the docstring cut off
after a third of its words, in turn (1 in 10 held out). Any preference JSON or JSONL file works the same way:
prompt/chosen/rejected, HH-RLHF-style chosen/rejected dialogues, or ranked responses.
"""

from jaxlm.config import base_config, model_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "reward"
  c.init_from = "runs/sft_tiny"
  c.model = model_config("tiny")
  c.model.remat = "none"
  c.steps = 150
  c.log_every = 10
  c.eval_every = 50
  c.eval_steps = 4
  c.checkpoint_every = 100
  c.data.train = "builtin:stdlib_docstring_pairs:train"
  c.data.eval = "builtin:stdlib_docstring_pairs:eval"
  c.data.seq_len = 128
  c.data.batch_size = 16                # records: 32 sequences per step
  c.optimizer.lr = 3e-4
  c.optimizer.warmup_steps = 15
  c.optimizer.weight_decay = 0.0
  c.reward.normalize_on = "eval"        # rewards come out with mean 0, std 1 on data.eval
  return c
