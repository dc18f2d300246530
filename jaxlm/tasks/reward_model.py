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

from jaxlm import checkpoint, console, fileio, loop, losses, model, reward_model, runs
from jaxlm.config import frozen_model
from jaxlm.data import preference, sft as sft_data, sources
from jaxlm.errors import ConfigError
from jaxlm.tasks import common


def reward_loss_fn(model_cfg, center_coef: float, sharder):
  def loss_fn(params, batch, rng, frozen=None):
    del rng, frozen
    B, G = batch["tokens"].shape[:2]
    r = reward_model.rewards(params, common.flat(batch["tokens"]), model_cfg,
                       segment_ids=common.flat(batch["segment_ids"]),
                       positions=common.flat(batch["positions"]), sharder=sharder).reshape(B, G)
    chosen, rejected = losses.gather_pairs(r, batch["pairs"])
    per_pair = losses.bradley_terry(chosen, rejected, batch["margins"], center_coef)
    sums = common.pair_sums(chosen, rejected, per_pair, batch)
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


def build(config, workdir: str, sharder) -> loop.Task:
  if config.lora.rank:
    raise ConfigError("lora.rank: reward models train every weight; set lora.rank=0")
  data = common.PreferenceData(config, workdir, shifted=False)
  m = frozen_model(config.model)
  task = loop.Task(
      init_params=lambda rng: reward_model.init(m, rng),
      param_axes=reward_model.param_axes(m),
      loss_fn=reward_loss_fn(m, config.reward.center_coef, sharder),
      load_init=runs.reward_init_loader(m, sharder),
      summarize=summarize,
      # No unembedding: the FLOPs of a forward and backward without the output projection.
      flops_per_token=model.flops_per_token(m, config.data.seq_len)
      - 6 * m.d_model * m.vocab_size,
      **data.task_data(),
      after_training=(lambda: normalize(config, workdir, data)) if config.reward.normalize_on
      else None,
  )
  return task


def reference_sequences(config, workdir: str, data: common.PreferenceData) -> tuple[list, str, str]:
  """The id sequences rewards are normalized on (every distinct response of each record
  of `reward.normalize_on`), what that set was, and how its records were counted (the
  summary line: read, used, skipped, truncated)."""
  spec = config.reward.normalize_on
  if spec == "eval":
    return ([ids for ex in data.eval for ids in ex["ids"]], f"data.eval ({config.data.eval})",
            "as data.eval")
  groups = preference.load_groups(
      sft_data.spec_files(spec, workdir, "reward.normalize_on"), data.tok, data.template,
      max_ids=config.data.seq_len, truncation=config.data.truncation,
      on_error=config.data.on_error, max_bytes=config.data.max_record_bytes)
  counted = sources.summary("reward.normalize_on", groups)
  if jax.process_index() == 0:
    console.info(counted)
  return [ids for ex in groups.examples for ids in ex["ids"]], spec, counted


def normalize(config, workdir: str, data: common.PreferenceData) -> dict:
  """Score the reference set with the trained model; save mean and std beside its
  checkpoints, where `jaxlm.reward.load` finds them (rewards then come out as
  (r - mean) / std)."""
  rm = runs.load_reward_model(workdir)
  sequences, what, counted = reference_sequences(config, workdir, data)
  if not sequences:
    raise ConfigError(f"reward.normalize_on={config.reward.normalize_on!r}: no usable record "
                      f"({counted})")
  raw = reward_model.score_tokens(rm, sequences, batch_size=config.data.batch_size, normalize=False)
  step = checkpoint.step_of(workdir)
  stats = {"mean": float(np.mean(raw)), "std": float(max(np.std(raw), 1e-6)),
           "count": len(sequences), "step": step, "reference": what}
  if jax.process_index() == 0:
    path = os.path.join(workdir, reward_model.NORMALIZATION_FILE)
    fileio.atomic_write_json(path, stats)
    console.info(f"rewards normalized on {what}: {len(sequences)} responses, raw mean "
                 f"{stats['mean']:.4f}, std {stats['std']:.4f} -> {path}")
  return stats


def config_errors(config, ok) -> list[str]:
  """The reward model's rules: what its rewards are normalized on."""
  del ok
  spec = config.reward.normalize_on
  if spec == "eval" and not config.data.eval:
    return ["reward.normalize_on='eval' but data.eval is empty"]
  if spec and spec != "eval" and not spec.strip().startswith(sft_data.BUILTIN_PREFIX):
    try:
      fileio.expand_globs(spec, "reward.normalize_on")
    except ConfigError as e:
      return [str(e)]
  return []
