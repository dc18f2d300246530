"""Supervised fine-tuning: chat or instruction records, loss on the responses.

The model, loss and loop are pretraining's; what differs is the data (jaxlm.data.sft):
conversations rendered with a chat template, a loss mask over the assistant's tokens,
and whole examples packed into rows. Start from a checkpoint with `init_from` (a jaxlm
run or a Hugging Face directory), whose tokenizer is used.
"""

from __future__ import annotations

import jax

from jaxlm import loop
from jaxlm.config import ConfigError, expand_globs
from jaxlm.data import lm, sft as sft_data, tokenizer as tokenizer_lib
from jaxlm.tasks import pretrain


def _tokenizer(config):
  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  inherited = pretrain.inherited_tokenizer(config)
  if inherited:
    return tokenizer_lib.load(inherited)
  raise ConfigError(f"data.tokenizer: {config.task} needs the tokenizer of the model it "
                    f"tunes; set data.tokenizer, or init_from a run or HF directory that has one")


def tokenizer_and_template(config, workdir: str):
  """The tuned model's tokenizer (kept in the workdir, sizing the vocabulary) and the
  chat template conversations are rendered with."""
  tok = _tokenizer(config)
  pretrain.set_vocab_size(config, tok)
  pretrain.keep_tokenizer(tok, workdir)
  return tok, sft_data.chat_template(config.data.chat_template, tok)


def files(spec: str, workdir: str, key: str) -> list[str]:
  if spec.strip().startswith(sft_data.BUILTIN_PREFIX):
    return sft_data.resolve_builtin(spec.strip(), workdir, key)
  return expand_globs(spec, key)


def build(config, workdir: str, sharder) -> loop.Task:
  pretrain.adopt_init_from_architecture(config)
  d = config.data
  tok, template = tokenizer_and_template(config, workdir)
  pid, nproc = jax.process_index(), jax.process_count()

  def load(spec, key):
    ex = sft_data.load_examples(files(spec, workdir, key), tok, template, fmt=d.sft_format,
                                seq_len=d.seq_len, loss_on=d.loss_on, truncation=d.truncation,
                                on_error=d.on_error, max_bytes=d.max_record_bytes)
    if pid == 0:
      print(sft_data.summary(key, ex), flush=True)
    if not ex.examples:
      raise ConfigError(f"{key}: no usable example ({sft_data.summary(key, ex)})")
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
      **pretrain.model_parts(config, workdir, sharder),
      train_data=make(train.examples, True),
      eval_data=eval_data,
      summarize=pretrain.summarize,
      tokens_per_batch=d.batch_size * d.seq_len,
      data_report=report,
  )


def run(config, workdir: str):
  sharder = loop.make_sharder(config)
  task = build(config, workdir, sharder)
  loop.write_config(config, workdir)
  return loop.train(config, workdir, task, sharder)
