"""PPO on the tiny SFT model, on CPU in minutes.

First pretrain and fine-tune (README, Quick start; configs/sft_tiny.py), then:

  python -m jaxlm.launch --config configs/ppo_tiny.py --workdir runs/ppo_tiny
  python -m jaxlm.launch --config configs/ppo_tiny.py --workdir runs/ppo_rm \
      --config.reward.fn= --config.reward.model=runs/reward_tiny \
      --config.rl.critic_from=runs/reward_tiny

Prompts and the default reward are grpo_tiny's (unigram F1 against the docstring);
switch the reward with --config.reward.fn / --config.reward.model. The critic starts
from init_from's backbone with a fresh value head, or from a reward run
(--config.rl.critic_from).
"""

from jaxlm.config import base_config, model_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "ppo"
  c.init_from = "runs/sft_tiny"
  c.model = model_config("tiny")
  c.model.remat = "none"
  c.steps = 40
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 20
  c.data.train = "builtin:stdlib_docstrings:train"
  c.data.batch_size = 16                # prompts a step, one completion each
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.rl.num_generations = 1
  c.rl.epochs = 2
  c.rl.minibatches = 2
  c.rl.max_new_tokens = 48
  c.rl.temperature = 0.8
  c.rl.kl_coef = 0.05
  c.rl.kl_estimator = "k1"              # in the reward, as in InstructGPT / TRL's PPO
  c.rl.gamma = 1.0
  c.rl.lam = 0.95
  c.reward.fn = "overlap"
  return c
