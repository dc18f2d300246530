"""The whole path in one command, on a CPU in minutes: tokenizer -> pretraining -> SFT ->
reward model -> DPO -> GRPO (or PPO), evaluated after every stage, with a report card.

  python -m jaxlm.launch --config configs/pipeline_tiny.py --workdir runs/pipeline
  python -m jaxlm.launch --config configs/pipeline_tiny.py:rl=ppo --workdir runs/pipeline_ppo
  python -m jaxlm.launch --config configs/pipeline_tiny.py --workdir runs/pipeline \
      --config.stages=tokenizer,pretrain,sft                 # a subset; later runs go on

Every stage is also a config of its own (`:stage=NAME`), whose `@name` paths point into
a pipeline workdir (`from=DIR`, default runs/pipeline):

  python -m jaxlm.launch --config configs/pipeline_tiny.py:stage=dpo --workdir runs/dpo2 \
      --config.dpo.beta=0.3

The data is the procedurally generated task world of jaxlm/data/world.py: arithmetic,
counting and list problems with verifiable answers. Their facts are the pretraining
text; instructions appear only in the SFT demonstrations (10% state a wrong result, 10%
leave out the `#### N` answer line, and the counting answers never have it), the
preference pairs (correct and well formed over sloppy or wrong) and the RL prompts
(rewarded by the answer and its format).
"""

import ml_collections

from jaxlm.config import base_config, model_config, parse_arg

STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "rl")
# Room for the longest answer: "len([a, b, c, d, e, f]) = 6\n#### 6" and the end token
# take 25 of the 512-piece tokenizer's tokens; at 24 six-item counts could never be
# right, in the evaluation or for RL's reward.
ANSWER_TOKENS = 32


def _common(c, task, steps, init_from):
  c.task = task
  c.steps = steps
  c.init_from = init_from
  c.model = model_config("tiny")
  c.model.remat = "none"      # tiny activations: recomputation only costs time on CPU
  c.log_every = 10
  c.eval_every = max(steps // 4, 1)  # held-out loss curves; the pipeline's own evaluation
  c.eval_steps = 4                   # of each stage runs when the stage ends
  c.eval_on_start = True             # the curves start from the stage's starting point
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  c.data.tokenizer = "@tokenizer/tokenizer.model"
  c.optimizer.weight_decay = 0.0
  c.progress = "log"
  return c


def stage_configs(rl: str = "grpo") -> dict:
  world = "builtin:world_"
  pretrain = _common(base_config(), "pretrain", 600, "")
  pretrain.data.train = world + "text:train"
  pretrain.data.eval = world + "text:eval"
  pretrain.data.seq_len = 128
  pretrain.data.batch_size = 16
  pretrain.optimizer.lr = 3e-3
  pretrain.optimizer.warmup_steps = 40
  pretrain.optimizer.weight_decay = 0.01

  sft = _common(base_config(), "sft", 600, "@pretrain")  # 200 left it copying numbers wrong
  sft.data.train = world + "sft:train"
  sft.data.eval = world + "sft:eval"
  sft.data.seq_len = 128
  sft.data.batch_size = 16
  sft.optimizer.lr = 1e-3
  sft.optimizer.warmup_steps = 20

  reward = _common(base_config(), "reward", 200, "@sft")  # 80 stopped at 0.82 pairwise
  reward.data.train = world + "pairs:train"
  reward.data.eval = world + "pairs:eval"
  reward.data.seq_len = 64
  reward.data.batch_size = 32
  reward.optimizer.lr = 3e-4
  reward.optimizer.warmup_steps = 10

  dpo = _common(base_config(), "dpo", 60, "@sft")
  dpo.data.train = world + "pairs:train"
  dpo.data.eval = world + "pairs:eval"
  dpo.data.seq_len = 64
  dpo.data.batch_size = 16
  dpo.optimizer.lr = 1e-4
  dpo.optimizer.warmup_steps = 8
  dpo.dpo.beta = 0.1
  dpo.dpo.sft_weight = 1.0             # + NLL of the chosen answer (RPO): keeps answers right

  rl_cfg = _common(base_config(), rl, 60, "@dpo")
  rl_cfg.data.train = world + "prompts:train"
  rl_cfg.data.batch_size = 16          # prompts a step
  rl_cfg.log_every = 1
  rl_cfg.loss_spike_factor = 0.0       # the surrogate loss sits near 0: its ratios say nothing
  rl_cfg.checkpoint_every = 10
  rl_cfg.optimizer.lr = 5e-5
  rl_cfg.optimizer.warmup_steps = 0
  rl_cfg.rl.num_generations = 8
  rl_cfg.rl.max_new_tokens = ANSWER_TOKENS
  rl_cfg.rl.temperature = 1.0
  rl_cfg.rl.kl_coef = 0.02
  if rl == "ppo":
    rl_cfg.reward.model = "@reward"    # the learned reward model, and the critic's start
    rl_cfg.rl.critic_from = "@reward"
    rl_cfg.rl.kl_estimator = "k1"
    rl_cfg.rl.minibatches = 2
  else:
    # The verifiable answer and its format, and the reward model's judgment (scores of
    # about -3 to 3) at a quarter weight: GRPO learns what the evaluation checks and
    # keeps what the preference data taught; alone, the answer reward moved RL's greedy
    # answers away from what the reward model prefers (win rate 0.45 over DPO).
    rl_cfg.reward.fn = "math_answer,format=0.5"
    rl_cfg.reward.model = "@reward"
    rl_cfg.reward.model_weight = 0.25

  stages = dict(pretrain=pretrain, sft=sft, reward=reward, dpo=dpo, rl=rl_cfg)
  for s in stages.values():
    s.eval = eval_config()
  return stages


def eval_config() -> ml_collections.ConfigDict:
  e = base_config().eval
  e.tasks = "builtin:world_prompts:eval"
  e.max_tasks = 0                      # all held-out tasks (249)
  e.max_new_tokens = ANSWER_TOKENS
  e.text = "builtin:world_text:eval"
  e.text_batches = 8
  e.seq_len = 128
  e.pairs = "builtin:world_pairs:eval"
  e.batch_size = 128
  return e


def get_config(arg=None):
  args = parse_args(arg)
  return assemble(args, stage_configs(args["rl"]))


def parse_args(arg, default_from: str = "runs/pipeline") -> dict:
  return parse_arg(arg, choices={"rl": ("grpo", "ppo"), "stage": ("", *STAGES[1:])},
                   rl="grpo", stage="", **{"from": default_from})


def assemble(args: dict, stages: dict, vocab_size: int = 512):
  """The pipeline config of `stages`, or with `stage=NAME` that stage's config alone,
  its @paths in the pipeline workdir `from=DIR`."""
  if args["stage"]:
    from jaxlm import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.resolve_paths(stages[args["stage"]], args["from"])
  c = ml_collections.ConfigDict()
  c.task = "pipeline"
  c.stages = ",".join(STAGES)          # a subset runs only those (their inputs must exist)
  c.seed = 0
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.train = "builtin:world_text:train"
  c.tokenizer.vocab_size = vocab_size
  c.tokenizer.sample_chars = 2_000_000
  for name, stage in stages.items():
    c[name] = stage
  c.report = report_config()
  return c


def report_config() -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.samples = 4                        # sample completions per stage in report.md
  # Cloud prices for the cost estimate, in US dollars per hour (list prices, 2026-11):
  r.cpu_vm = "e2-standard-2 (2 vCPU, 8 GB)"
  r.cpu_vm_price = 0.067
  r.accelerator = "one H100 80GB"
  r.accelerator_price = 3.0
  r.accelerator_tflops = 989.0
  r.accelerator_mfu = 0.3              # assumed utilization for the FLOP-based estimate
  return r
