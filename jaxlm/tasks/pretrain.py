"""Pretraining and continued pretraining: next-token prediction on packed text.

Continued pretraining is this task with `init_from` set, a new data mixture and a
fresh warmup.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from jaxlm import console, loop
from jaxlm.data import lm, prepare, tokenizer as tokenizer_lib
from jaxlm.data.sources import DocumentSource
from jaxlm.errors import ConfigError
from jaxlm.tasks import common


def prepare_tokenizer(config, workdir: str, docs: DocumentSource):
  """`data.tokenizer`, else the `init_from` run's or model's (`tokenizer.model` or
  `tokenizer.json`), else one trained into the workdir (and reused on resume)."""
  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  inherited = common.inherited_tokenizer(config)
  if inherited:
    console.info(f"using the tokenizer of init_from: {inherited}")
    return tokenizer_lib.load(inherited)
  path = os.path.join(workdir, "tokenizer.model")
  if jax.process_index() == 0 and not os.path.exists(path):
    console.info(f"training a {config.data.tokenizer_vocab_size}-piece SentencePiece tokenizer on "
                 f"up to {config.data.tokenizer_sample_chars:,} characters -> {path}")
    try:
      tokenizer_lib.train(docs.sample_text(config.data.tokenizer_sample_chars), path,
                          config.data.tokenizer_vocab_size)
    except ValueError as e:
      raise ConfigError(f"data.tokenizer_vocab_size={config.data.tokenizer_vocab_size}: {e}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  return tokenizer_lib.Tokenizer(path)


def _prepared_data(config, directory: str, key: str, *, train: bool):
  """A prepared corpus's mixed batches: the train split for training, for evaluation its
  eval split when it has one (else its train split)."""
  d = config.data
  corpus = prepare.read_manifest(directory)
  has_eval = any("eval" in s["splits"] for s in corpus["sources"].values())
  split = "eval" if not train and has_eval else "train"
  weights = lm.mixture_weights(corpus, d.mixture, split, key)

  def make(index, count, rows, prefetch):
    return lm.mixture_dataset(
        directory, split, weights, seq_len=d.seq_len, batch_size=rows,
        seed=config.seed if train else 0, shuffle=d.shuffle and train,
        repeat=d.on_exhausted == "repeat" or not train, process_index=index,
        process_count=count, prefetch=prefetch)
  return lambda: lm.sharded(  # pylint: disable=g-long-lambda
      make, batch_size=d.batch_size // jax.process_count(), shards=d.shards if train else 0,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch=d.prefetch if train else 0)


def build(config, workdir: str, sharder) -> loop.Task:
  d = config.data
  pid, nproc = jax.process_index(), jax.process_count()
  local_batch = d.batch_size // nproc
  report = {}  # records read, used, skipped per split (a prepared corpus has its manifest)
  if prepare.is_prepared(d.train):
    tok = common.prepared_tokenizer(config, d.train, "data.train")
    train_data = _prepared_data(config, d.train, "data.train", train=True)()
  else:
    train_docs = common.documents(d.train, d, "data.train", workdir)
    report.update(train_docs.report("train"))
    tok = prepare_tokenizer(config, workdir, train_docs)
    train_data = lm.sharded(
        lambda index, count, rows, prefetch: lm.lm_dataset(
            train_docs, tok.path, seq_len=d.seq_len, batch_size=rows, seed=config.seed,
            shuffle=d.shuffle, process_index=index, process_count=count, prefetch=prefetch,
            repeat=d.on_exhausted == "repeat"),
        batch_size=local_batch, shards=d.shards, process_index=pid, process_count=nproc,
        prefetch=d.prefetch)
  common.set_vocab_size(config, tok)
  common.keep_tokenizer(tok, workdir)
  eval_data = None
  if d.eval and prepare.is_prepared(d.eval):
    common.prepared_tokenizer(config, d.eval, "data.eval", tok)
    eval_data = _prepared_data(config, d.eval, "data.eval", train=False)
  elif d.eval:
    eval_docs = common.documents(d.eval, d, "data.eval", workdir)
    report.update(eval_docs.report("eval"))
    eval_data = lambda: lm.sharded(  # pylint: disable=g-long-lambda
        lambda index, count, rows, prefetch: lm.lm_dataset(
            eval_docs, tok.path, seq_len=d.seq_len, batch_size=rows, seed=0, shuffle=False,
            process_index=index, process_count=count, prefetch=prefetch),
        batch_size=local_batch, shards=0, process_index=pid, process_count=nproc)
  return loop.Task(
      **common.model_parts(config, workdir, sharder),
      train_data=train_data,
      eval_data=eval_data,
      summarize=common.summarize,
      tokens_per_batch=d.batch_size * d.seq_len,
      data_report=report,
  )
