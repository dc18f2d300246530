"""Supervised fine-tuning: chat or instruction records, loss on the responses.

The model, loss and loop are pretraining's; what differs is the data (jaxlm.data.sft):
conversations rendered with a chat template, a loss mask over the assistant's tokens,
and whole examples packed into rows. Start from a checkpoint with `init_from` (a jaxlm
run or a Hugging Face directory), whose tokenizer is used.
"""

from __future__ import annotations

import jax

from jaxlm import console, loop
from jaxlm.data import lm, sft as sft_data, sources
from jaxlm.errors import ConfigError
from jaxlm.tasks import common


def build(config, workdir: str, sharder) -> loop.Task:
  d = config.data
  tok, template = common.tokenizer_and_template(config, workdir)
  pid, nproc = jax.process_index(), jax.process_count()

  def load(spec, key):
    ex = sft_data.load_examples(sft_data.spec_files(spec, workdir, key), tok, template, fmt=d.sft_format,
                                seq_len=d.seq_len, loss_on=d.loss_on, truncation=d.truncation,
                                on_error=d.on_error, max_bytes=d.max_record_bytes)
    if pid == 0:
      console.info(sources.summary(key, ex))
    if not ex.examples:
      raise ConfigError(f"{key}: no usable example ({sources.summary(key, ex)})")
    return ex

  train = load(d.train, "data.train")
  local_batch = d.batch_size // nproc
  def make(examples, train_split):
    return lm.sharded(
        lambda index, count, rows, prefetch: sft_data.sft_dataset(
            examples, seq_len=d.seq_len, batch_size=rows,
            seed=config.seed if train_split else 0, shuffle=d.shuffle and train_split,
            packing=d.packing, process_index=index, process_count=count, prefetch=prefetch),
        batch_size=local_batch, shards=d.shards if train_split else 0, process_index=pid,
        process_count=nproc, prefetch=d.prefetch if train_split else 0)
  eval_data = None
  report = train.report("train")
  if d.eval:
    held_out = load(d.eval, "data.eval")
    report.update(held_out.report("eval"))
    eval_data = lambda: make(held_out.examples, False)  # noqa: E731
  return loop.Task(
      **common.model_parts(config, workdir, sharder),
      train_data=make(train.examples, True),
      eval_data=eval_data,
      summarize=common.summarize,
      tokens_per_batch=d.batch_size * d.seq_len,
      data_report=report,
  )
