"""Reward modeling: a scalar head on the language model, trained with Bradley-Terry on
preference pairs.

Each batch row is one record: its responses (two for a pair, K for a ranking) as
separate sequences after the prompt, and its pairs as indices into them, so a ranking's
K(K-1)/2 comparisons cost K forward passes and share one batch (InstructGPT). Rewards
are read at each sequence's last token (jaxlm.reward). Start from an SFT or pretrained
run, or a Hugging Face model, with `init_from`.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, loop, losses, model, reward
from jaxlm.config import ConfigError
from jaxlm.data import preference, sft as sft_data
from jaxlm.tasks import pretrain, sft


class PreferenceData:
  """Train and eval preference records of a run, tokenized and counted, and the grain
  datasets over them. `shifted` gives next-token targets and response masks (DPO);
  otherwise the sequences end at their last token (a reward read there)."""

  def __init__(self, config, workdir: str, *, shifted: bool):
    d = config.data
    self.config, self.shifted = config, shifted
    self.tok, self.template = sft.tokenizer_and_template(config, workdir)
    max_ids = d.seq_len + 1 if shifted else d.seq_len
    self.report = {}

    def load(spec, key, split):
      groups = preference.load_groups(sft.files(spec, workdir, key), self.tok, self.template,
                                      max_ids=max_ids, truncation=d.truncation,
                                      on_error=d.on_error, max_bytes=d.max_record_bytes)
      if jax.process_index() == 0:
        print(sft_data.summary(key, groups) + f", {groups.counts['pairs']} pairs", flush=True)
      if not groups.examples:
        raise ConfigError(f"{key}: no usable preference record ({sft_data.summary(key, groups)})")
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


def reward_loss_fn(model_cfg, center_coef: float, sharder):
  def loss_fn(params, batch, rng, frozen=None):
    del rng, frozen
    B, G = batch["tokens"].shape[:2]
    r = reward.rewards(params, flat(batch["tokens"]), model_cfg,
                       segment_ids=flat(batch["segment_ids"]),
                       positions=flat(batch["positions"]), sharder=sharder).reshape(B, G)
    chosen, rejected = losses.gather_pairs(r, batch["pairs"])
    per_pair = losses.bradley_terry(chosen, rejected, batch["margins"], center_coef)
    sums = pair_sums(chosen, rejected, per_pair, batch)
    rows = (batch["segment_ids"][:, :, 0] > 0).astype(jnp.float32)
    # Ratios of these give the mean and spread of every response's reward.
    sums.update(rows=jnp.sum(rows), reward_sum=jnp.sum(r * rows),
                reward_sq_sum=jnp.sum(jnp.square(r) * rows))
    return sums["loss"], sums
  return loss_fn


def summarize(m: dict) -> dict:
  out = {k: v for k, v in m.items() if k not in ("rows", "reward_sum", "reward_sq_sum")}
  if m.get("rows"):
    mean = m["reward_sum"] / m["rows"]
    out["reward_mean"] = mean
    out["reward_std"] = math.sqrt(max(m["reward_sq_sum"] / m["rows"] - mean * mean, 0.0))
  return out


def build(config, workdir: str, sharder) -> tuple[loop.Task, PreferenceData]:
  if config.lora.rank:
    raise ConfigError("lora.rank: reward models train every weight; set lora.rank=0")
  pretrain.adopt_init_from_architecture(config)
  data = PreferenceData(config, workdir, shifted=False)
  m = config.model
  task = loop.Task(
      init_params=lambda rng: reward.init(m, rng),
      param_axes=reward.param_axes(m),
      loss_fn=reward_loss_fn(m, config.reward.center_coef, sharder),
      load_init=reward.load_init(m, sharder),
      summarize=summarize,
      # No unembedding: the FLOPs of a forward and backward without the output projection.
      flops_per_token=model.flops_per_token(m, config.data.seq_len)
      - 6 * m.d_model * m.vocab_size,
      **data.task_data(),
  )
  return task, data


def reference_sequences(config, workdir: str, data: PreferenceData) -> tuple[list, str, str]:
  """The id sequences rewards are normalized on (every distinct response of each record
  of `reward.normalize_on`), what that set was, and how its records were counted (the
  summary line: read, used, skipped, truncated)."""
  spec = config.reward.normalize_on
  if spec == "eval":
    return ([ids for ex in data.eval for ids in ex["ids"]], f"data.eval ({config.data.eval})",
            "as data.eval")
  groups = preference.load_groups(
      sft.files(spec, workdir, "reward.normalize_on"), data.tok, data.template,
      max_ids=config.data.seq_len, truncation=config.data.truncation,
      on_error=config.data.on_error, max_bytes=config.data.max_record_bytes)
  counted = sft_data.summary("reward.normalize_on", groups)
  if jax.process_index() == 0:
    print(counted, flush=True)
  return [ids for ex in groups.examples for ids in ex["ids"]], spec, counted


def normalize(config, workdir: str, data: PreferenceData) -> dict:
  """Score the reference set with the trained model; save mean and std beside its
  checkpoints, where `jaxlm.reward.load` finds them (rewards then come out as
  (r - mean) / std)."""
  rm = reward.load(workdir)
  sequences, what, counted = reference_sequences(config, workdir, data)
  if not sequences:
    raise ConfigError(f"reward.normalize_on={config.reward.normalize_on!r}: no usable record "
                      f"({counted})")
  raw = reward.score_tokens(rm, sequences, batch_size=config.data.batch_size, normalize=False)
  step = checkpoint.step_of(workdir)
  stats = {"mean": float(np.mean(raw)), "std": float(max(np.std(raw), 1e-6)),
           "count": len(sequences), "step": step, "reference": what}
  if jax.process_index() == 0:
    path = os.path.join(workdir, reward.NORMALIZATION_FILE)
    checkpoint.write_json(path, stats)
    print(f"rewards normalized on {what}: {len(sequences)} responses, raw mean "
          f"{stats['mean']:.4f}, std {stats['std']:.4f} -> {path}", flush=True)
  return stats


def run(config, workdir: str):
  sharder = loop.make_sharder(config)
  task, data = build(config, workdir, sharder)
  loop.write_config(config, workdir)
  last = loop.train(config, workdir, task, sharder)
  if config.reward.normalize_on:
    normalize(config, workdir, data)
  return last
