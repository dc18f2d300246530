"""DPO on the tiny SFT model, on CPU in a few minutes.

First pretrain and fine-tune (README, Quick start; configs/sft_tiny.py), then:

  python -m jaxlm.launch --config configs/dpo_tiny.py --workdir runs/dpo_tiny
  python -m jaxlm.launch --config configs/dpo_tiny.py --workdir runs/dpo_lora \
      --config.lora.rank=16 --config.optimizer.lr=1e-3     # reference = base, adapters off
  python -m jaxlm.launch --config configs/dpo_tiny.py --workdir runs/ipo \
      --config.dpo.loss=ipo --config.dpo.reference=precomputed

The data are reward_tiny's built-in pairs (a function's own docstring chosen over
another's, a shuffled or a cut-off one); any preference JSON or JSONL file works the
same way.
"""

from jaxlm.config import base_config, model_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "dpo"
  c.init_from = "runs/sft_tiny"         # the policy starts here; the reference is a copy
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
  c.data.batch_size = 16                # pairs: 32 sequences per step
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 15
  c.optimizer.weight_decay = 0.0
  c.dpo.beta = 0.1
  c.dpo.loss = "sigmoid"
  c.dpo.reference = "copy"
  return c
