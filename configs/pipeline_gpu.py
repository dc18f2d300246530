"""jaxlm's speedrun: the whole pipeline of configs/pipeline_tiny.py (tokenizer ->
pretraining -> SFT -> reward model -> DPO -> GRPO, evaluated after every stage, with a
report card) at about 150M parameters, on one GPU in under ten minutes.

  python -m jaxlm.launch --config configs/pipeline_gpu.py --workdir runs/pipeline_gpu
  python -m jaxlm.launch --config configs/pipeline_gpu.py:stage=rl,from=runs/pipeline_gpu \
      --workdir runs/rl2 --config.optimizer.lr=2e-6           # one stage again, alone

The same data (the task world of jaxlm/data/world.py), the same stages and the same
evaluation as the CPU pipeline; only the model, the batch sizes, the step counts and the
learning rates change. README's "The speedrun" has the time and the table of a run.
"""

from jaxlm.config import config_beside, model_config


# About 150M parameters: 12 layers of d_model 1024 (16 heads of 64, 8 of them for keys
# and values), SwiGLU 3072, a 512-piece vocabulary.
MODEL = dict(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=8, ffn_dim=3072)

# stage: (steps, batch size, peak learning rate, warmup steps)
SCHEDULE = {
    "pretrain": (1000, 128, 6e-4, 100),
    "sft": (600, 64, 1e-4, 30),
    "reward": (200, 64, 5e-5, 20),
    "dpo": (100, 64, 3e-6, 10),
    "rl": (100, 32, 1e-5, 0),      # 32 prompts x 8 samples a step
}


def get_config(arg=None):
  tiny = config_beside(__file__, "pipeline_tiny")
  args = tiny.parse_args(arg, default_from="runs/pipeline_gpu")
  stages = tiny.stage_configs(args["rl"])
  for name, s in stages.items():
    s.model = model_config("tiny", **MODEL)
    s.model.remat = "none"           # activations of this size fit without recomputation
    s.steps, s.data.batch_size, s.optimizer.lr, s.optimizer.warmup_steps = SCHEDULE[name]
    s.eval_every = max(s.steps // 4, 1)
    s.checkpoint_every = s.steps     # one checkpoint, at the end: the next stage's start
    if name == "rl":
      s.checkpoint_every = 20
  stages["rl"].rl.num_generations = 8
  return tiny.assemble(args, stages)
