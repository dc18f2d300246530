"""What the training tasks share: resolving a config before it is validated (the
architecture from `init_from`, the vocabulary from the tokenizer), the tokenizer a run
uses and keeps, the language-model loss and parameters (full or LoRA), and the
preference data of the reward and DPO tasks. Each task module exports `build()` (and
`config_errors()` for its own rules); `jaxlm.tasks.run` is the one way they run.
"""

from __future__ import annotations

import filecmp
import math
import os

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp

from jaxlm import checkpoint, console, fileio, hf, lora as lora_lib, losses, model, runs
from jaxlm.config import frozen_model
from jaxlm.data import preference, prepare, sft, sources, tokenizer as tokenizer_lib
from jaxlm.data.sources import DocumentSource, open_documents
from jaxlm.errors import ConfigError


# Model fields a run keeps from its own config when its architecture comes from init_from.
_TRAINING_FIELDS = ("dtype", "param_dtype", "remat", "attention", "logits_chunk", "layer_loop",
                    "vocab_multiple", "init_std")


def init_from_workdir(init_from: str) -> str | None:
  """The jaxlm workdir (holding config.json) behind a workdir, checkpoints folder or
  step folder; None when there is no checkpoint or no config.json."""
  try:
    return runs.find_workdir(checkpoint.find_params_dir(init_from))
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
    workdir = init_from_workdir(config.init_from)
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


def inherited_tokenizer(config) -> str | None:
  """The tokenizer file of `init_from`: in the directory itself (a workdir, a HF model)
  or in the workdir of a checkpoint folder it names."""
  if not config.init_from:
    return None
  places = [config.init_from]
  if not hf.is_hf_dir(config.init_from):
    places.append(init_from_workdir(config.init_from))
  return next(filter(None, (hf.tokenizer_file(p) for p in filter(None, places))), None)


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
      console.info(f"vocabulary padded from {tok.vocab_size} to {padded} (model.vocab_multiple="
                   f"{m.vocab_multiple})")
    m.vocab_size = padded
  elif m.vocab_size < tok.vocab_size:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size} pieces ({tok.path})")


def lm_loss_fn(model_cfg, z_loss: float, sharder, lora_cfg=None):
  """Masked next-token cross-entropy on packed batches, as sums for the shared loop.

  With LoRA (`lora_cfg.rank > 0`) `params` are the adapters and `frozen` the base."""
  def loss_fn(params, batch, rng, frozen=None):
    weights, adapters = lora_lib.split(params, frozen, lora_cfg, rng)
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
  m, seq_len = frozen_model(config.model), config.data.seq_len
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
    return runs.lora_base(workdir, config.init_from)
  except FileNotFoundError as e:
    raise ConfigError(f"init_from: {e}") from None


def summarize(m: dict) -> dict:
  out = dict(m)
  if "nll" in m:
    out["perplexity"] = math.exp(min(m["nll"], 80.0))
  return out


def prepared_tokenizer(config, directory: str, key: str, tok=None) -> tokenizer_lib.Tokenizer:
  """A prepared corpus's tokenizer; it must agree with `data.tokenizer` or `tok` if given."""
  path = os.path.join(directory, prepare.read_manifest(directory)["tokenizer"])
  for other, what in ((config.data.tokenizer, "data.tokenizer"),
                      (inherited_tokenizer(config) or "", "init_from's tokenizer"),
                      (tok.path if tok else "", "the training tokenizer")):
    if other and not filecmp.cmp(other, path, shallow=False):
      raise ConfigError(f"{key}={directory!r}: its tokenizer {path} differs from {what} "
                        f"{other}; token ids would not agree")
  return tokenizer_lib.Tokenizer(path)


def documents(spec: str, d, key: str, workdir: str) -> DocumentSource:
  """Globs, a TFDS split, or built-in generated text (`builtin:world_text:train`); the
  log says how many records were read, used and skipped (`data.on_error`)."""
  if spec.strip().startswith(sft.BUILTIN_PREFIX):
    spec = ",".join(sft.resolve_builtin(spec.strip(), workdir, key))
  docs = open_documents(spec, d, key)
  if jax.process_index() == 0:
    console.info(sources.summary(key, docs))
  return docs


def tuned_tokenizer(config):
  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  inherited = inherited_tokenizer(config)
  if inherited:
    return tokenizer_lib.load(inherited)
  raise ConfigError(f"data.tokenizer: {config.task} needs the tokenizer of the model it "
                    f"tunes; set data.tokenizer, or init_from a run or HF directory that has one")


def tokenizer_and_template(config, workdir: str):
  """The tuned model's tokenizer (kept in the workdir, sizing the vocabulary) and the
  chat template conversations are rendered with."""
  tok = tuned_tokenizer(config)
  set_vocab_size(config, tok)
  keep_tokenizer(tok, workdir)
  return tok, sft.chat_template(config.data.chat_template, tok)


class PreferenceData:
  """Train and eval preference records of a run, tokenized and counted, and the grain
  datasets over them. `shifted` gives next-token targets and response masks (DPO);
  otherwise the sequences end at their last token (a reward read there)."""

  def __init__(self, config, workdir: str, *, shifted: bool):
    d = config.data
    self.config, self.shifted = config, shifted
    self.tok, self.template = tokenizer_and_template(config, workdir)
    max_ids = d.seq_len + 1 if shifted else d.seq_len
    self.report = {}

    def load(spec, key, split):
      groups = preference.load_groups(sft.spec_files(spec, workdir, key), self.tok, self.template,
                                      max_ids=max_ids, truncation=d.truncation,
                                      on_error=d.on_error, max_bytes=d.max_record_bytes)
      if jax.process_index() == 0:
        console.info(sources.summary(key, groups) + f", {groups.counts['pairs']} pairs")
      if not groups.examples:
        raise ConfigError(f"{key}: no usable preference record ({sources.summary(key, groups)})")
      self.report.update(groups.report(split))
      return groups.examples

    self.train = load(d.train, "data.train", "train")
    self.eval = load(d.eval, "data.eval", "eval") if d.eval else None
    self.group = preference.group_size(self.train, self.eval or [])

  def dataset(self, examples, *, train: bool):
    d, nproc = self.config.data, jax.process_count()
    return preference.preference_dataset(
        examples, group=self.group, seq_len=self.config.data.seq_len, shifted=self.shifted,
        batch_size=d.batch_size // nproc, seed=self.config.seed if train else 0,
        shuffle=d.shuffle and train, process_index=jax.process_index(), process_count=nproc,
        prefetch=d.prefetch if train else 0)

  def task_data(self) -> dict:
    """The Task fields for data: train stream, eval factory, report, tokens per step
    (every position of every sequence, padding included: what the step computes)."""
    d = self.config.data
    return dict(train_data=self.dataset(self.train, train=True),
                eval_data=(lambda: self.dataset(self.eval, train=False)) if self.eval else None,
                data_report=self.report, tokens_per_batch=d.batch_size * self.group * d.seq_len)


def flat(x):
  """[B, G, ...] -> [B * G, ...]: every response one sequence of the forward pass."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pair_sums(chosen, rejected, per_pair, batch) -> dict:
  """Summed pair statistics over valid pairs (the loop divides by `weight`, their count)."""
  valid = batch["pair_mask"]
  return {"loss": jnp.sum(per_pair * valid), "weight": jnp.sum(valid),
          "accuracy": jnp.sum((chosen > rejected) * valid),
          "margin": jnp.sum((chosen - rejected) * valid)}


def known_tokenizer(config, workdir: str = "") -> str | None:
  """The tokenizer file a run will use when one exists before it starts: `data.tokenizer`,
  a prepared corpus's, `init_from`'s, or the one an earlier start of this run trained
  into its workdir; None when the run is to train one (its size is known only then)."""
  d = config.data
  if d.tokenizer:
    return d.tokenizer if os.path.isfile(d.tokenizer) else None
  if prepare.is_prepared(d.train):
    try:
      return os.path.join(d.train, prepare.read_manifest(d.train)["tokenizer"])
    except (ConfigError, KeyError, OSError, ValueError):
      return None  # the task reports the corpus's problem
  inherited = inherited_tokenizer(config)
  if inherited:
    return inherited
  trained = os.path.join(workdir, "tokenizer.model") if workdir else ""
  return trained if trained and os.path.isfile(trained) else None


def resolve(config, workdir: str = "") -> None:
  """Fill in what a config leaves to its sources, before it is validated: the model's
  shape from `init_from` (its training fields stay this config's) and `model.vocab_size=0`
  from the tokenizer when it exists already. A run that trains its own tokenizer sets
  the vocabulary once that tokenizer exists (`set_vocab_size`, at build). Idempotent."""
  adopt_init_from_architecture(config)
  path = known_tokenizer(config, workdir)
  if path and config.model.vocab_size == 0:
    set_vocab_size(config, tokenizer_lib.load(path))

