"""The pipeline's stages on real public files in their published formats:

    tokenizer, pretraining   a plain text file          (Shakespeare: tinyshakespeare.txt)
    SFT                      Alpaca JSON                (alpaca_5000.json)
    reward model, DPO        HH-RLHF JSONL, gzip        (hh_rlhf_harmless_test.jsonl.gz)
    GRPO                     GSM8K JSONL                (gsm8k_train.jsonl; math_answer reward)
    evaluation               GSM8K accuracy             (gsm8k_test.jsonl)

  python -m jaxlm.launch --config configs/pipeline_shakespeare.py --workdir runs/shakespeare
  python -m jaxlm.launch --config configs/pipeline_shakespeare.py:data=/data/samples \
      --workdir runs/shakespeare --config.sft.data.train=my_alpaca.json

`data=DIR` (default: shared/data beside this checkout) is where the five files are; each stage's
`data.train` is an ordinary config field for other files. At this size (a tiny model,
minutes on a CPU) the stages run and hand over their checkpoints, but a model that small
answers no GSM8K problem: scale `*.model`, `*.steps` and the data up for a real one.
The samples have no held-out splits of their own, so perplexity and the reward model's
held-out accuracy are off (`eval.text`, `eval.pairs`): point them at held-out files.
"""

import os

from jaxlm.config import config_beside, parse_arg


def get_config(arg=None):
  shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
  args = parse_arg(arg, data=os.path.normpath(shared))
  d = args["data"]
  c = config_beside(__file__, "pipeline_tiny").get_config()
  c.tokenizer.train = os.path.join(d, "tinyshakespeare.txt")
  c.tokenizer.vocab_size = 2048
  c.pretrain.data.train = os.path.join(d, "tinyshakespeare.txt")
  c.pretrain.data.eval = ""
  c.pretrain.data.text_split = "paragraph"
  c.pretrain.data.seq_len = 256
  c.pretrain.steps = 300
  c.sft.data.train = os.path.join(d, "alpaca_5000.json")
  c.sft.data.eval = ""
  c.sft.data.on_error = "skip"          # a few records have an empty output: counted, skipped
  c.sft.data.seq_len = 256
  c.sft.steps = 150
  for name in ("reward", "dpo"):
    c[name].data.train = os.path.join(d, "hh_rlhf_harmless_test.jsonl.gz")
    c[name].data.eval = ""
    c[name].data.seq_len = 256
    c[name].data.truncation = "truncate"
    c[name].data.on_error = "skip"      # the sample has 4 records with an empty response
    c[name].steps = 60
  c.reward.reward.normalize_on = ""
  c.rl.data.train = os.path.join(d, "gsm8k_train.jsonl")
  c.rl.rl.max_new_tokens = 64
  c.rl.steps = 10
  c.rl.reward.fn = "math_answer,format=0.5"
  for name in ("pretrain", "sft", "reward", "dpo", "rl"):
    e = c[name].eval
    e.tasks = os.path.join(d, "gsm8k_test.jsonl")
    e.max_tasks = 64
    e.max_new_tokens = 64
    e.text = ""
    e.pairs = ""
  return c
