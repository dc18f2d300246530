"""Pretraining and continued pretraining: next-token prediction on packed text.

Continued pretraining is this task with `init_from` set, a new data mixture and a
fresh warmup.
"""

from __future__ import annotations

import filecmp
import logging
import math
import os

import jax
import jax.numpy as jnp

from jaxlm import checkpoint, fileio, hf, lora as lora_lib, loop, losses, model
from jaxlm.config import ConfigError
from jaxlm.data import lm, prepare, tokenizer as tokenizer_lib
from jaxlm.data.sources import DocumentSource, open_documents

log = logging.getLogger(__name__)


# Model fields a run keeps from its own config when its architecture comes from init_from.
_TRAINING_FIELDS = ("dtype", "param_dtype", "remat", "attention", "logits_chunk", "layer_loop",
                    "vocab_multiple", "init_std")


def _init_from_workdir(init_from: str) -> str | None:
  """The jaxlm workdir (holding config.json) behind a workdir, checkpoints folder or
  step folder; None when there is no checkpoint or no config.json."""
  try:
    return hf.find_workdir(checkpoint.find_params_dir(init_from))
  except FileNotFoundError:
    return None


def adopt_init_from_architecture(config) -> None:
  """With `init_from`, the model's shape comes from the source (a Hugging Face
  config.json, or the jaxlm run's config.json); how it trains (dtype, remat, attention)
  stays this config's."""
  if not config.init_from:
    return
  if hf.is_hf_dir(config.init_from):
    path = os.path.join(config.init_from, "config.json")
    theirs = hf.model_config_from_hf(hf.read_json(path), path).to_dict()
  else:
    workdir = _init_from_workdir(config.init_from)
    if workdir is None:
      return  # no checkpoint there: the loop reports it
    source = hf.read_json(os.path.join(workdir, "config.json"))
    if (source.get("lora") or {}).get("rank", 0) > 0:
      raise ConfigError(f"init_from={config.init_from!r} is a LoRA run (adapters only); "
                        f"merge it first: tools/convert_hf.py --jaxlm {config.init_from} "
                        f"--to_hf DIR, then init_from=DIR")
    theirs = source.get("model", {})
  for key, value in theirs.items():
    if key not in _TRAINING_FIELDS and key in config.model:
      setattr(config.model, key, value)
  m = config.model  # validation saw the config's own shape: check what it now is
  if m.family == "gpt2" and config.data.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds init_from's "
                      f"max_seq_len={m.max_seq_len} (learned positions)")


def inherited_tokenizer(config) -> str | None:
  """The tokenizer file of `init_from`: in the directory itself (a workdir, a HF model)
  or in the workdir of a checkpoint folder it names."""
  if not config.init_from:
    return None
  places = [config.init_from]
  if not hf.is_hf_dir(config.init_from):
    places.append(_init_from_workdir(config.init_from))
  return next(filter(None, (hf.tokenizer_file(p) for p in filter(None, places))), None)


def prepare_tokenizer(config, workdir: str, docs: DocumentSource):
  """`data.tokenizer`, else the `init_from` run's or model's (`tokenizer.model` or
  `tokenizer.json`), else one trained into the workdir (and reused on resume)."""
  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  inherited = inherited_tokenizer(config)
  if inherited:
    print(f"using the tokenizer of init_from: {inherited}", flush=True)
    return tokenizer_lib.load(inherited)
  path = os.path.join(workdir, "tokenizer.model")
  if jax.process_index() == 0 and not os.path.exists(path):
    print(f"training a {config.data.tokenizer_vocab_size}-piece SentencePiece tokenizer on "
          f"up to {config.data.tokenizer_sample_chars:,} characters -> {path}", flush=True)
    try:
      tokenizer_lib.train(docs.sample_text(config.data.tokenizer_sample_chars), path,
                          config.data.tokenizer_vocab_size)
    except ValueError as e:
      raise ConfigError(f"data.tokenizer_vocab_size={config.data.tokenizer_vocab_size}: {e}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("tokenizer")
  return tokenizer_lib.Tokenizer(path)


def keep_tokenizer(tok, workdir: str) -> None:
  """Copy the tokenizer (and the files beside it: tokenizer_config.json, ...) into the
  workdir, so the run is self-contained: a later init_from or an export finds it. Of a
  tokenizer.model / tokenizer.json pair (HF models ship both) only the one in use is
  kept. A workdir that already holds another tokenizer (an earlier run's, when init_from
  now brings a different one) is an error naming both: sampling and export would pair
  the wrong one with the model."""
  source = os.path.dirname(os.path.abspath(tok.path))
  if source == os.path.abspath(workdir):
    return
  held = [n for n in ("tokenizer.model", "tokenizer.json")
          if os.path.exists(os.path.join(workdir, n))]
  if held:
    kept = os.path.join(workdir, held[0])
    if (os.path.basename(tok.path).endswith(".json") != held[0].endswith(".json")
        or not filecmp.cmp(tok.path, kept, shallow=False)):
      raise ConfigError(f"--workdir {workdir} holds the tokenizer {kept}, which differs from "
                        f"the one this run trains with ({tok.path}); token ids would not "
                        f"agree. Use a new --workdir, or the same tokenizer")
    return
  if jax.process_count() > 1:  # every process has looked before process 0 copies
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("workdir tokenizer checked")
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  copied = hf.copy_tokenizer(source, workdir)
  name = os.path.basename(tok.path)
  kept = "tokenizer.json" if name.endswith(".json") else "tokenizer.model"
  if name not in copied:  # a file named otherwise, e.g. data.tokenizer=my_sp.model
    fileio.atomic_copy(tok.path, os.path.join(workdir, kept))
  other = "tokenizer.model" if kept == "tokenizer.json" else "tokenizer.json"
  if other in copied:  # only the one in use: later stages must read the same ids
    os.remove(os.path.join(workdir, other))


def set_vocab_size(config, tok: tokenizer_lib.Tokenizer):
  """model.vocab_size=0 takes the tokenizer's size, padded to model.vocab_multiple."""
  m = config.model
  if m.vocab_size == 0:
    padded = -(-tok.vocab_size // m.vocab_multiple) * m.vocab_multiple
    if padded != tok.vocab_size:
      print(f"vocabulary padded from {tok.vocab_size} to {padded} (model.vocab_multiple="
            f"{m.vocab_multiple})", flush=True)
    m.vocab_size = padded
  elif m.vocab_size < tok.vocab_size:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size} pieces ({tok.path})")


def lm_loss_fn(model_cfg, z_loss: float, sharder, lora_cfg=None):
  """Masked next-token cross-entropy on packed batches, as sums for the shared loop.

  With LoRA (`lora_cfg.rank > 0`) `params` are the adapters and `frozen` the base."""
  use_lora = lora_cfg is not None and lora_lib.enabled(lora_cfg)

  def loss_fn(params, batch, rng, frozen=None):
    weights, adapters = (frozen, lora_lib.as_model_lora(params, lora_cfg, rng)) if use_lora \
        else (params, None)
    h = model.hidden_states(weights, batch["tokens"], model_cfg,
                            segment_ids=batch["segment_ids"], positions=batch["positions"],
                            sharder=sharder, lora=adapters)
    log_z, target_logit, correct = model.token_stats(weights, h, batch["targets"], model_cfg,
                                                     sharder)
    loss_sum, z_sum, weight = losses.cross_entropy_from_stats(log_z, target_logit,
                                                              batch["loss_mask"], z_loss)
    correct = jnp.sum(correct * batch["loss_mask"])
    return loss_sum, {"loss": loss_sum, "nll": loss_sum - z_sum,
                      "mean_token_accuracy": correct, "weight": weight}
  return loss_fn


def model_parts(config, workdir: str, sharder, pin_base: bool = True) -> dict:
  """The Task fields that say what trains: every weight, or LoRA adapters over a frozen
  base (loaded from init_from, pinned in the workdir; not looked up without `pin_base`,
  for a caller that places the base itself, as the benchmark does)."""
  m, seq_len = config.model, config.data.seq_len
  if lora_lib.enabled(config.lora):  # adapters' own FLOPs (rank << d) are left out
    source = lora_base(workdir, config) if pin_base else ""
    return dict(init_params=lambda rng: lora_lib.init(m, config.lora, rng),
                param_axes=lora_lib.param_axes(m, config.lora),
                loss_fn=lm_loss_fn(m, config.loss.z_loss, sharder, config.lora),
                load_init=None, frozen_shapes=lambda rng: model.init(m, rng),
                frozen_axes=model.param_axes(m), frozen_source=source,
                flops_per_token=model.flops_per_token(m, seq_len, weight_grads=False))
  return dict(init_params=lambda rng: model.init(m, rng), param_axes=model.param_axes(m),
              loss_fn=lm_loss_fn(m, config.loss.z_loss, sharder),
              flops_per_token=model.flops_per_token(m, seq_len))


def lora_base(workdir: str, config) -> str:
  try:
    return hf.lora_base(workdir, config.init_from)
  except FileNotFoundError as e:
    raise ConfigError(f"init_from: {e}") from None


def summarize(m: dict) -> dict:
  out = dict(m)
  if "nll" in m:
    out["perplexity"] = math.exp(min(m["nll"], 80.0))
  return out


def _prepared_tokenizer(config, directory: str, key: str, tok=None) -> tokenizer_lib.Tokenizer:
  """A prepared corpus's tokenizer; it must agree with `data.tokenizer` or `tok` if given."""
  path = os.path.join(directory, prepare.read_manifest(directory)["tokenizer"])
  for other, what in ((config.data.tokenizer, "data.tokenizer"),
                      (inherited_tokenizer(config) or "", "init_from's tokenizer"),
                      (tok.path if tok else "", "the training tokenizer")):
    if other and not filecmp.cmp(other, path, shallow=False):
      raise ConfigError(f"{key}={directory!r}: its tokenizer {path} differs from {what} "
                        f"{other}; token ids would not agree")
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


def documents(spec: str, d, key: str, workdir: str) -> DocumentSource:
  """Globs, a TFDS split, or built-in generated text (`builtin:world_text:train`); the
  log says how many records were read, used and skipped (`data.on_error`)."""
  from jaxlm.data import sft  # pylint: disable=import-outside-toplevel
  if spec.strip().startswith(sft.BUILTIN_PREFIX):
    spec = ",".join(sft.resolve_builtin(spec.strip(), workdir, key))
  docs = open_documents(spec, d, key)
  if jax.process_index() == 0:
    print(sft.summary(key, docs), flush=True)
  return docs


def build(config, workdir: str, sharder) -> loop.Task:
  adopt_init_from_architecture(config)
  d = config.data
  pid, nproc = jax.process_index(), jax.process_count()
  local_batch = d.batch_size // nproc
  report = {}  # records read, used, skipped per split (a prepared corpus has its manifest)
  if prepare.is_prepared(d.train):
    tok = _prepared_tokenizer(config, d.train, "data.train")
    train_data = _prepared_data(config, d.train, "data.train", train=True)()
  else:
    train_docs = documents(d.train, d, "data.train", workdir)
    report.update(train_docs.report("train"))
    tok = prepare_tokenizer(config, workdir, train_docs)
    train_data = lm.sharded(
        lambda index, count, rows, prefetch: lm.lm_dataset(
            train_docs, tok.path, seq_len=d.seq_len, batch_size=rows, seed=config.seed,
            shuffle=d.shuffle, process_index=index, process_count=count, prefetch=prefetch,
            repeat=d.on_exhausted == "repeat"),
        batch_size=local_batch, shards=d.shards, process_index=pid, process_count=nproc,
        prefetch=d.prefetch)
  set_vocab_size(config, tok)
  keep_tokenizer(tok, workdir)
  eval_data = None
  if d.eval and prepare.is_prepared(d.eval):
    _prepared_tokenizer(config, d.eval, "data.eval", tok)
    eval_data = _prepared_data(config, d.eval, "data.eval", train=False)
  elif d.eval:
    eval_docs = documents(d.eval, d, "data.eval", workdir)
    report.update(eval_docs.report("eval"))
    eval_data = lambda: lm.sharded(  # pylint: disable=g-long-lambda
        lambda index, count, rows, prefetch: lm.lm_dataset(
            eval_docs, tok.path, seq_len=d.seq_len, batch_size=rows, seed=0, shuffle=False,
            process_index=index, process_count=count, prefetch=prefetch),
        batch_size=local_batch, shards=0, process_index=pid, process_count=nproc)
  return loop.Task(
      **model_parts(config, workdir, sharder),
      train_data=train_data,
      eval_data=eval_data,
      summarize=summarize,
      tokens_per_batch=d.batch_size * d.seq_len,
      data_report=report,
  )


def run(config, workdir: str):
  sharder = loop.make_sharder(config)
  task = build(config, workdir, sharder)
  loop.write_config(config, workdir)
  return loop.train(config, workdir, task, sharder)
