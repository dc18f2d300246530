"""A tiny Llama pretrained on the Python standard library's own source code.

Needs no download: every Python installation has this text. Trains a SentencePiece
tokenizer into the workdir, then about 2 minutes on 2 CPU cores.

  python -m jaxlm.launch --config configs/pretrain_tiny.py --workdir runs/tiny
  python -m jaxlm.launch --config configs/pretrain_tiny.py:family=gpt2 --workdir runs/tiny_gpt2
  python -m jaxlm.launch --config configs/pretrain_tiny.py --sweep --workdir runs/tiny_lr
"""

import sysconfig

from jaxlm.config import base_config, model_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, choices={"family": ("llama", "gpt2")}, family="llama")
  c = base_config()
  c.task = "pretrain"
  c.steps = 300
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 4
  c.checkpoint_every = 100
  if args["family"] == "gpt2":
    c.model = model_config("tiny", family="gpt2", num_kv_heads=4, ffn_dim=512, max_seq_len=256,
                           tie_embeddings=True, norm_eps=1e-5)
  else:
    c.model = model_config("tiny")
  c.model.remat = "none"  # tiny activations: recomputation only costs time on CPU
  stdlib = sysconfig.get_paths()["stdlib"]
  c.data.train = f"{stdlib}/*.py"                    # top-level modules: ~4.7 MB
  c.data.eval = f"{stdlib}/json/*.py,{stdlib}/email/*.py"  # packages held out
  c.data.tokenizer_vocab_size = 2048
  c.data.tokenizer_sample_chars = 2_000_000
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.01
  return c


def get_sweep(arg=None):
  """Three peak learning rates around the default (`--sweep`; jaxlm.sweep)."""
  del arg
  return [{"optimizer.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
