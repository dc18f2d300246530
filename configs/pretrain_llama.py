"""Pretraining at real sizes: a Llama-shaped model from jaxlm.config.MODEL_PRESETS.

Give your own corpus (text files or JSONL with a `text` field) and, for a 32k vocabulary,
a tokenizer or enough text to train one:

  python -m jaxlm.launch --config configs/pretrain_llama.py:preset=llama_150m \
      --workdir runs/llama150m --config.data.train='corpus/*.jsonl' \
      --config.data.eval='heldout/*.jsonl' --config.data.tokenizer=tokenizer.model
"""

from jaxlm.config import MODEL_PRESETS, base_config, model_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, choices={"preset": tuple(MODEL_PRESETS)}, preset="llama_150m")
  c = base_config()
  c.task = "pretrain"
  c.model = model_config(args["preset"])
  c.model.remat = "minimal"
  if c.model.vocab_size > 100_000:  # Llama 3's 128k words: a chunk's float32 logits at a time
    c.model.logits_chunk = 1024
  c.steps = 10_000
  c.log_every = 50
  c.eval_every = 1000
  c.eval_steps = 20
  c.checkpoint_every = 1000
  c.data.seq_len = 2048
  c.data.batch_size = 16
  c.data.tokenizer_vocab_size = 32000
  c.data.tokenizer_sample_chars = 50_000_000
  c.optimizer.lr = 3e-4
  c.optimizer.warmup_steps = 500
  return c
