"""GRPO on the tiny SFT model, on CPU in minutes.

First pretrain and fine-tune (README, Quick start; configs/sft_tiny.py), then:

  python -m jaxlm.launch --config configs/grpo_tiny.py --workdir runs/grpo_tiny
  python -m jaxlm.launch --config configs/grpo_tiny.py --workdir runs/grpo_rm \
      --config.reward.fn= --config.reward.model=runs/reward_tiny
  python -m jaxlm.launch --config configs/grpo_tiny.py --workdir runs/grpo_gsm8k \
      --config.init_from=path/to/hf_model --config.data.chat_template=hf \
      --config.data.train=gsm8k_train.jsonl --config.reward.fn=math_answer=1,format=0.2

The built-in prompts are sft_tiny's ("Explain what this Python function does." with a
signature); the default reward, `overlap`, is the unigram F1 of the completion against
the function's docstring (the records' `output` field): a graded, verifiable signal a
small model can climb. Switch it from the command line with --config.reward.fn (a
built-in, or package.module:function) or --config.reward.model (a reward run).
"""

from jaxlm.config import base_config, model_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "grpo"
  c.init_from = "runs/sft_tiny"
  c.model = model_config("tiny")
  c.model.remat = "none"
  c.steps = 40
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 20
  c.data.train = "builtin:stdlib_docstrings:train"
  c.data.batch_size = 8                 # prompts a step
  c.data.seq_len = 256                  # (unused by RL: rows are prompt bucket + max_new_tokens)
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.rl.num_generations = 4              # 32 completions a step
  c.rl.max_new_tokens = 48
  c.rl.temperature = 0.8
  c.rl.kl_coef = 0.04
  c.reward.fn = "overlap"
  return c
