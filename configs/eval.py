"""Evaluate a checkpoint (config.task = "eval"; jaxlm.evaluate, as tools/eval.py does).

  python -m jaxlm.launch --config configs/eval.py --workdir runs/eval_sft \
      --config.eval.model=runs/pipeline/sft
  python -m jaxlm.launch --config configs/eval.py --workdir runs/eval_gsm8k \
      --config.eval.model=path/to/hf_model --config.eval.chat_template=hf \
      --config.eval.tasks=gsm8k_test.jsonl --config.eval.max_new_tokens=256 \
      --config.eval.text= --config.eval.pairs=

The defaults are the tiny pipeline's held-out task world; eval.json and samples.jsonl
are written into the workdir.
"""

from jaxlm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "eval"
  e = c.eval
  e.tasks = "builtin:world_prompts:eval"
  e.text = "builtin:world_text:eval"
  e.pairs = "builtin:world_pairs:eval"
  e.max_tasks = 0
  e.max_new_tokens = 24
  e.seq_len = 128
  return c
