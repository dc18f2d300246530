"""Direct preference optimization and its relatives, on the policy itself.

The loss compares how much more the policy than a reference prefers the chosen response
(jaxlm.losses.dpo: sigmoid/cDPO, robust, IPO, hinge, reference-free). A record's
responses go through one forward pass together (batch rows [B, G, T] flattened to
[B * G, T]), and sequence log-probs are summed over each response's tokens.

The reference, by `dpo.reference`:
  copy         frozen weights (dpo.reference_from, else init_from), sharded like the
               policy and run in the same step; with LoRA, the frozen base with the
               adapters off, so no second copy is held
  precomputed  one pass over the data before training with those weights, stored in
               the workdir (resumable, reused on resume); training holds one model
  none         reference-free
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxlm import console, loop, lora as lora_lib, losses, model, runs, sharding
from jaxlm.config import frozen_model
from jaxlm.data import preference
from jaxlm.errors import ConfigError, error_detail
from jaxlm.tasks import common


def sequence_logps(weights, batch, model_cfg, sharder, adapters=None):
  """Per-response sums of token log-probs [B, G], and per-response token counts."""
  B, G = batch["tokens"].shape[:2]
  h = model.hidden_states(weights, common.flat(batch["tokens"]), model_cfg,
                          segment_ids=common.flat(batch["segment_ids"]),
                          positions=common.flat(batch["positions"]), sharder=sharder, lora=adapters)
  log_z, target_logit, _ = model.token_stats(weights, h, common.flat(batch["targets"]), model_cfg,
                                             sharder)
  logps = losses.sequence_logps_from_stats(log_z, target_logit, common.flat(batch["loss_mask"]))
  return logps.reshape(B, G), jnp.sum(batch["loss_mask"], axis=-1).astype(jnp.float32)


def dpo_loss_fn(config, sharder):
  m, dpo = frozen_model(config.model), config.dpo
  def loss_fn(params, batch, rng, frozen=None):
    weights, adapters = lora_lib.split(params, frozen, config.lora, rng)
    policy, counts = sequence_logps(weights, batch, m, sharder, adapters)
    if dpo.reference == "precomputed":
      reference = batch["reference_logps"]
    elif dpo.reference == "copy":  # the frozen tree: a copy, or LoRA's base
      reference = jax.lax.stop_gradient(sequence_logps(frozen, batch, m, sharder)[0])
    else:
      reference = jnp.zeros_like(policy)
    pc, pr = losses.gather_pairs(policy, batch["pairs"])
    rc, rr = losses.gather_pairs(reference, batch["pairs"])
    lengths = losses.gather_pairs(counts, batch["pairs"])
    per_pair, chosen_rewards, rejected_rewards = losses.dpo(
        pc, pr, rc, rr, beta=dpo.beta, loss=dpo.loss, label_smoothing=dpo.label_smoothing,
        reference_free=dpo.reference == "none",
        lengths=lengths if dpo.length_normalize else None)
    valid = batch["pair_mask"]
    sums = {}
    if dpo.sft_weight:  # RPO: the chosen response's mean token NLL, added per pair
      nll = -pc / jnp.maximum(lengths[0], 1.0)
      per_pair = per_pair + dpo.sft_weight * nll
      sums["nll/chosen"] = jnp.sum(nll * valid)
    sums.update(common.pair_sums(chosen_rewards, rejected_rewards, per_pair, batch))
    # TRL's names, so dashboards carry over.
    sums["rewards/chosen"] = jnp.sum(chosen_rewards * valid)
    sums["rewards/rejected"] = jnp.sum(rejected_rewards * valid)
    sums["rewards/margins"] = sums.pop("margin")
    sums["rewards/accuracies"] = sums.pop("accuracy")
    sums["logps/chosen"] = jnp.sum(pc * valid)
    sums["logps/rejected"] = jnp.sum(pr * valid)
    return sums["loss"], sums
  return loss_fn


def reference_source(config, workdir: str) -> str:
  """The reference's weights, pinned at the run's first start (reference.json)."""
  try:
    if lora_lib.enabled(config.lora):
      return common.lora_base(workdir, config)
    return runs.pin(workdir, "reference.json", config.dpo.reference_from or config.init_from)
  except FileNotFoundError as e:
    key = "dpo.reference_from" if config.dpo.reference_from else "init_from"
    raise ConfigError(f"{key}: {e}") from None


def _fingerprint(examples, group: int, source: str) -> str:
  h = hashlib.sha256(f"{source}|{group}|{len(examples)}".encode())
  for ex in examples:
    for ids, sup in zip(ex["ids"], ex["supervised"]):
      h.update(ids.tobytes())
      h.update(sup.tobytes())
  return h.hexdigest()[:16]


def _load_npy(path: str) -> np.ndarray:
  """A saved array of reference log-probs; never a pickle (numpy refuses those here)."""
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(f"dpo.reference=precomputed: {path} is not a readable array file "
                      f"({error_detail(e)}); delete it to compute it again") from None


def precompute_reference(config, workdir: str, sharder, data: common.PreferenceData, source: str,
                         chunk_batches: int = 16) -> None:
  """Attach `reference_logps` (one per response) to every train and eval record.

  One pass of the reference over the data, in batches of a training microbatch. Results
  are written in parts under <workdir>/reference_logps/, each named by the records it
  covers, in a folder named by a fingerprint of the data and the reference: an
  interrupted pass resumes from its finished parts (whatever batch size wrote them), and
  a resumed run reuses the finished file."""
  m, d = frozen_model(config.model), config.data
  folder = os.path.join(workdir, "reference_logps")
  pending = []

  def attach(examples, values, path):
    if len(values) != len(examples):
      raise ConfigError(f"dpo.reference=precomputed: {path} holds {len(values)} records, the "
                        f"data {len(examples)}; delete it to compute it again")
    for ex, row in zip(examples, values):
      ex["reference_logps"] = row[:len(ex["ids"])]

  for split, examples in (("train", data.train), ("eval", data.eval)):
    if not examples:
      continue
    path = os.path.join(folder, f"{split}-{_fingerprint(examples, data.group, source)}.npy")
    if os.path.isfile(path):
      attach(examples, _load_npy(path), path)
      console.info(f"reference log-probs for {split}: {path}")
    else:
      pending.append((split, examples, path))
  if not pending:
    return

  abstract = jax.eval_shape(lambda r: model.init(m, r), jax.random.PRNGKey(0))
  weights = runs.load_params(source, sharder.placed(model.param_axes(m), abstract))
  fn = jax.jit(lambda w, b: sequence_logps(w, b, m, sharder)[0])
  rows_per_pass = d.batch_size // config.optimizer.grad_accum_steps  # a training microbatch
  started = time.perf_counter()
  for split, examples, path in pending:
    parts = path[:-len(".npy")] + ".parts"
    os.makedirs(parts, exist_ok=True)
    chunk = rows_per_pass * chunk_batches
    values = []
    for begin in range(0, len(examples), chunk):
      end = min(begin + chunk, len(examples))
      part = os.path.join(parts, f"{begin:09d}-{end:09d}.npy")
      if os.path.isfile(part):
        values.append(_load_npy(part))
        continue
      out = []
      for start in range(begin, end, rows_per_pass):
        rows = [preference.pad_group(ex, data.group, d.seq_len, True)
                for ex in examples[start:min(start + rows_per_pass, end)]]
        n = len(rows)
        rows += [jax.tree.map(np.zeros_like, rows[0])] * (rows_per_pass - n)
        host = {k: np.stack([r[k] for r in rows])
                for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        logps = fn(weights, sharding.global_batch(host, sharder))
        out.append(np.asarray(multihost_utils.process_allgather(logps, tiled=True))[:n])
      values.append(np.concatenate(out))
      if jax.process_index() == 0:
        np.save(part + ".tmp.npy", values[-1], allow_pickle=False)
        os.replace(part + ".tmp.npy", part)
    values = np.concatenate(values)
    attach(examples, values, path)
    if jax.process_index() == 0:
      np.save(path[:-4] + ".tmp.npy", values, allow_pickle=False)
      os.replace(path[:-4] + ".tmp.npy", path)
      shutil.rmtree(parts)
    console.info(f"reference log-probs for {split}: {len(examples)} records in "
                 f"{time.perf_counter() - started:.1f}s -> {path}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("reference_logps")


def build(config, workdir: str, sharder) -> loop.Task:
  data = common.PreferenceData(config, workdir, shifted=True)
  m, dpo, seq_len = frozen_model(config.model), config.dpo, config.data.seq_len
  parts = common.model_parts(config, workdir, sharder)
  parts["loss_fn"] = dpo_loss_fn(config, sharder)
  if dpo.reference != "none":
    source = reference_source(config, workdir)
    if dpo.reference == "precomputed":
      precompute_reference(config, workdir, sharder, data, source)
    elif not lora_lib.enabled(config.lora):  # a frozen copy beside the policy
      parts.update(frozen_shapes=lambda rng: model.init(m, rng),
                   frozen_axes=model.param_axes(m), frozen_source=source)
    if dpo.reference == "copy":  # the reference's forward pass, every step
      parts["flops_per_token"] += model.flops_per_token(m, seq_len) / 3
  return loop.Task(**parts, summarize=lambda s: s, **data.task_data())


def config_errors(config, ok) -> list[str]:
  """DPO's rules: the model it aligns, and where its reference comes from."""
  del ok
  dpo, errors = config.dpo, []
  if not config.init_from:
    errors.append("init_from: task='dpo' needs the model it aligns (a jaxlm run or a "
                  "Hugging Face directory); the policy starts there and, by default, "
                  "the reference is a copy of it")
  if dpo.reference_from and config.lora.rank:
    errors.append("dpo.reference_from: with LoRA the reference is the base (init_from) "
                  "with the adapters off; leave dpo.reference_from empty")
  if dpo.reference_from and not os.path.exists(dpo.reference_from):
    errors.append(f"dpo.reference_from: no such path {dpo.reference_from!r}")
  return errors
