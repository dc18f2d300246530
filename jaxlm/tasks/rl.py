"""Reinforcement learning from rewards: GRPO and PPO on the shared loop.

Every step is one rollout batch: `data.batch_size` prompts, each sampled
`rl.num_generations` times by jaxlm.generate with the current weights (on the same
devices; nothing is copied out), scored by the reward sources (jaxlm.rewards), turned
into advantages, then `rl.epochs` x `rl.minibatches` clipped policy-gradient updates in
one jitted step. Token log-probs of the rollout come from the engine, which computes
them as the training forward does (the tests check they agree).

GRPO: advantage = the completion's reward against its group's (mean, and std by
`rl.advantage_scale`); KL to the reference by the k3 estimator, `rl.kl_coef` (0: no
reference). PPO: a critic (a value head, from `rl.critic_from`: a reward run or an LM)
and GAE(gamma, lambda) over per-token rewards, the score at the last token and the KL
to the reference in the reward (k1) or in the loss (k3); clipped value loss.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxlm import (console, generate, loop, lora as lora_lib, losses, model, reward_fns,
                   reward_model, runs, sharding)
from jaxlm.config import frozen_model
from jaxlm.data import prompts as prompts_lib, sft as sft_data, sources
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.tasks import common


class _WithState:
  """The prompt stream, whose checkpointed state also carries the rollout's own state
  (PPO's adaptive KL coefficient), so a resumed run continues exactly."""

  def __init__(self, dataset, state: dict):
    self.dataset, self.state = dataset, state
    self.current = None  # the iterator the loop reads (rollouts read one batch ahead)

  def __iter__(self):
    self.current = _StatefulIterator(iter(self.dataset), self.state)
    return self.current


class _StatefulIterator:
  """The loop's batches; `peek` reads the next one early (rl.max_staleness), and the
  checkpointed position stays that of the batches the loop has taken."""

  def __init__(self, inner, state: dict):
    self.inner, self.state = inner, state
    self.ahead = None  # (the position before it, the batch read ahead)

  def __next__(self):
    if self.ahead is not None:
      batch, self.ahead = self.ahead[1], None
      return batch
    return next(self.inner)

  def peek(self):
    if self.ahead is None:
      position = self.inner.get_state()
      self.ahead = (position, next(self.inner))
    return self.ahead[1]

  def get_state(self):
    data = self.ahead[0] if self.ahead is not None else self.inner.get_state()
    return {"data": data, "rollout": dict(self.state), "scope": "global"}

  def set_state(self, state):
    if state.get("scope") != "global" and jax.process_count() > 1:
      raise CheckpointError(
          "this RL checkpoint was written on several processes before every process read "
          "the whole prompt stream (each then held its own share): its data position "
          "cannot be resumed exactly; start the run again in a new workdir")
    self.inner.set_state(state["data"])
    self.ahead = None
    self.state.update(state["rollout"])


def token_logps(logits, targets, temperature: float):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], logp


class Rollouts:
  """Prompts, the engine and the reward sources of a run, and the batches they make."""

  def __init__(self, config, workdir: str, sharder):
    d, r = config.data, config.rl
    self.config, self.sharder = config, sharder
    self.tok, self.template = common.tokenizer_and_template(config, workdir)
    self.rewards = reward_fns.Rewards(config.reward.fn, config.reward.model,
                                   config.reward.model_weight)
    # A prompt and its reply fit in the model's context: longer prompts are cut or dropped.
    max_prompt = config.model.max_seq_len - r.max_new_tokens
    if max_prompt < 2:
      raise ConfigError(f"rl.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in "
                        f"model.max_seq_len={config.model.max_seq_len}")
    loaded = prompts_lib.load_prompts(
        sft_data.spec_files(d.train, workdir, "data.train"), on_error=d.on_error, check=self.rewards.check,
        tok=self.tok, template=self.template, max_len=max_prompt, truncation=d.truncation,
        max_bytes=d.max_record_bytes)
    if jax.process_index() == 0:
      console.info(sources.summary("data.train", loaded))
    if not loaded.examples:
      raise ConfigError(f"data.train: no usable prompt ({sources.summary('data.train', loaded)})")
    self.prompts, self.report = loaded.examples, loaded.report("train")
    self.ids = [p.ids for p in self.prompts]
    longest = max(len(i) for i in self.ids)
    self.prompt_len = min(generate.bucket(longest), max_prompt)
    self.seq_len = self.prompt_len + r.max_new_tokens
    try:
      generate.check_length(config.model, self.prompt_len, r.max_new_tokens)
    except ValueError as e:
      raise ConfigError(f"rl.max_new_tokens: {e} (data.train's longest prompt is {longest} "
                        f"tokens)") from None
    self.stop = sft_data.end_of_turn_ids(self.tok, self.template)
    self.sampling = generate.Sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                      top_k=r.top_k, top_p=r.top_p,
                                      stop=(self.stop,) if self.stop else ())
    self.engine = generate.Engine(config.model, eos_id=self.tok.eos_id,
                                  vocab_size=self.tok.vocab_size, sharder=sharder)

  def dataset(self):
    """Global batches of prompt indices, shuffled and repeated (checkpointable). Every
    process reads the whole stream (indices only): the rollouts, which every process
    makes whole, are then the same rows in the same order on any process count."""
    d = self.config.data
    ds = sft_data.record_stream(grain.MapDataset.range(len(self.prompts)), seed=self.config.seed,
                                shuffle=d.shuffle, repeat=True, process_index=0, process_count=1)
    return ds.map(lambda i: {"index": np.int32(i)}).batch(d.batch_size, drop_remainder=True)

  def completion_text(self, tokens, length) -> str:
    return self.tok.decode(generate.completion_ids(tokens, length, self.tok.eos_id, self.stop))

  def sample(self, weights, adapters, host_batch, step):
    """Generate and score one batch -> (rows of numpy arrays, scores, metrics)."""
    r = self.config.rl
    unique = np.asarray(host_batch["index"]).reshape(-1)
    index = np.repeat(unique, r.num_generations)
    started = time.perf_counter()
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
    # One prefill a prompt; its group's samples decode from copies of its cache.
    out = self.engine.generate(weights, [self.ids[i] for i in unique], rng, self.sampling,
                               prompt_len=self.prompt_len, lora=adapters,
                               samples=r.num_generations, rows=r.rollout_rows)
    rollout_s = time.perf_counter() - started
    texts = [self.completion_text(t, n) for t, n in zip(out.tokens, out.lengths)]
    prompts = [self.prompts[i] for i in index]
    fields = {}
    for key in sorted({k for p in prompts for k in p.fields}):
      fields[key] = [p.fields.get(key) for p in prompts]
    scores, means = self.rewards([p.text for p in prompts], texts, fields,
                                 [[{"role": a, "content": b} for a, b in p.turns] for p in prompts],
                                 where=[p.where for p in prompts])
    raw = scores.copy()
    if r.missing_eos_penalty:
      scores = scores - r.missing_eos_penalty * (~out.finished)
    # Rows: left-padded prompt, completion, padding; inputs and next-token targets, P + N
    # of them (one padding column more, so rows keep the bucket's round length).
    R, P, N = len(index), self.prompt_len, r.max_new_tokens
    seq = np.zeros((R, P + N + 1), np.int32)
    valid = np.zeros((R, P + N + 1), np.int32)
    positions = np.zeros((R, P + N + 1), np.int32)
    for i, (pid, n) in enumerate(zip(index, out.lengths)):
      p = self.ids[pid]
      seq[i, P - len(p):P] = p
      seq[i, P:P + n] = out.tokens[i, :n]
      valid[i, P - len(p):P + n] = 1
      positions[i, P - len(p):P + n] = np.arange(len(p) + n)
    mask = np.zeros((R, P + N), np.int32)
    old = np.zeros((R, P + N), np.float32)
    for i, n in enumerate(out.lengths):
      mask[i, P - 1:P - 1 + n] = 1
      old[i, P - 1:P - 1 + n] = out.logprobs[i, :n]
    rows = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "segment_ids": valid[:, :-1],
            "positions": positions[:, :-1], "loss_mask": mask, "old_logps": old}
    metrics = {"reward": float(raw.mean()), "reward_std": float(raw.std()),
               "objective/scores": float(scores.mean()),
               "completion_length": float(out.lengths.mean()),
               "val/num_eos_tokens": float(out.finished.sum()),
               "time/rollout_s": rollout_s,
               "rollout/tokens_per_s": float(out.lengths.sum()) / max(rollout_s, 1e-9)}
    metrics.update({f"reward/{k}": v for k, v in means.items()})
    return rows, scores, metrics


# ---------------------------------------------------------------------------------------
# GRPO


def grpo_loss_fn(config, sharder, use_lora: bool, max_new_tokens: int):
  m, r = frozen_model(config.model), config.rl
  ref_key = "policy" if use_lora else "reference"  # LoRA: the base, adapters off

  def loss_fn(params, batch, rng, frozen=None):
    policy, adapters = lora_lib.split(params, (frozen or {}).get("policy"), config.lora, rng)
    logits = model.forward(policy, batch["tokens"], m, segment_ids=batch["segment_ids"],
                           positions=batch["positions"], sharder=sharder, lora=adapters)
    logp, logp_all = token_logps(logits, batch["targets"], r.temperature)
    mask = batch["loss_mask"]
    adv = batch["advantages"][:, None]
    per_token, clipfrac, approx_kl = losses.clipped_policy_loss(logp, batch["old_logps"], adv,
                                                            r.clip_low, r.clip_high)
    if "is_weight" in batch:  # rl.max_staleness: tokens from an older policy
      per_token = per_token * batch["is_weight"]
    sums = {}
    agg = lambda x: losses.aggregate(x, mask, r.loss_agg, max_new_tokens)[0]  # noqa: E731
    if r.kl_coef > 0:
      ref_logits = model.forward(frozen[ref_key], batch["tokens"], m,
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 sharder=sharder)
      ref = jax.lax.stop_gradient(token_logps(ref_logits, batch["targets"], r.temperature)[0])
      kl = losses.kl_k3(logp, ref)
      per_token = per_token + r.kl_coef * kl
      sums["objective/kl"] = agg(kl)
    total, weight = losses.aggregate(per_token, mask, r.loss_agg, max_new_tokens)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    sums.update({"loss": total, "weight": weight, "policy/clipfrac_avg": agg(clipfrac),
                 "policy/approxkl_avg": agg(approx_kl), "objective/entropy": agg(entropy)})
    return total, sums
  return loss_fn


# ---------------------------------------------------------------------------------------
# PPO


def values_of(critic, batch, cfg, sharder):
  """The critic's value at every position [B, T] (float32)."""
  h = model.hidden_states(critic["backbone"], batch["tokens"], cfg,
                          segment_ids=batch["segment_ids"], positions=batch["positions"],
                          sharder=sharder)
  return h.astype(jnp.float32) @ critic["head"]["w"] + critic["head"]["b"]


def ppo_loss_fn(config, sharder, use_lora: bool):
  m, r = frozen_model(config.model), config.rl
  ref_key = "policy" if use_lora else "reference"  # LoRA: the base, adapters off

  def loss_fn(params, batch, rng, frozen=None):
    policy, adapters = lora_lib.split(params["policy"], (frozen or {}).get("policy"),
                                      config.lora, rng)
    logits = model.forward(policy, batch["tokens"], m, segment_ids=batch["segment_ids"],
                           positions=batch["positions"], sharder=sharder, lora=adapters)
    logp, logp_all = token_logps(logits, batch["targets"], r.temperature)
    mask = batch["loss_mask"]
    pg, clipfrac, approx_kl = losses.clipped_policy_loss(logp, batch["old_logps"],
                                                     batch["advantages"], r.clip_low, r.clip_high)
    if "is_weight" in batch:  # rl.max_staleness: tokens from an older policy
      pg = pg * batch["is_weight"]
    values = values_of(params["critic"], batch, m, sharder)
    vf, vf_clipfrac = losses.clipped_value_loss(values, batch["old_values"], batch["returns"],
                                            r.value_clip)
    per_token = pg + r.vf_coef * vf
    sums = {}
    if r.kl_estimator == "k3" and r.kl_coef > 0:  # KL as a loss term
      ref = jax.lax.stop_gradient(token_logps(
          model.forward(frozen[ref_key], batch["tokens"], m, segment_ids=batch["segment_ids"],
                        positions=batch["positions"], sharder=sharder),
          batch["targets"], r.temperature)[0])
      kl = losses.kl_k3(logp, ref)
      per_token = per_token + batch["kl_coef"][:, None] * kl
    total, weight = losses.aggregate(per_token, mask, "token", 0)
    agg = lambda x: losses.aggregate(x, mask, "token", 0)[0]  # noqa: E731
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    sums.update({"loss": total, "weight": weight, "loss/policy_avg": agg(pg),
                 "loss/value_avg": agg(vf), "policy/clipfrac_avg": agg(clipfrac),
                 "val/clipfrac_avg": agg(vf_clipfrac), "policy/approxkl_avg": agg(approx_kl),
                 "objective/entropy": agg(entropy)})
    return total, sums
  return loss_fn


# ---------------------------------------------------------------------------------------


# long: GRPO and PPO in one build (policy, reference, critic, rollout), shared line by line
def build(config, workdir: str, sharder) -> loop.Task:
  ppo = config.task == "ppo"
  m, r = frozen_model(config.model), config.rl
  use_lora = lora_lib.enabled(config.lora)
  if r.max_staleness and jax.process_count() > 1:
    raise ConfigError("rl.max_staleness=1 runs its rollouts in a thread of one process; "
                      f"this run has {jax.process_count()} processes: use 0")
  data = Rollouts(config, workdir, sharder)
  source = (common.lora_base(workdir, config) if use_lora
            else runs.pin(workdir, "reference.json", config.init_from))
  # Frozen trees: LoRA's base (the policy's weights and, adapters off, the reference: one
  # copy), or a reference copy; GRPO with kl_coef 0 and no LoRA holds none.
  frozen_shapes, frozen_axes, frozen_source = {}, {}, {}
  if use_lora:
    frozen_shapes["policy"], frozen_axes["policy"] = lambda k: model.init(m, k), model.param_axes(m)
    frozen_source["policy"] = source
  elif r.kl_coef > 0:
    frozen_shapes["reference"] = lambda k: model.init(m, k)
    frozen_axes["reference"] = model.param_axes(m)
    frozen_source["reference"] = source
  frozen = dict(frozen_shapes=(lambda k: {n: f(k) for n, f in frozen_shapes.items()})
                if frozen_shapes else None,
                frozen_axes=frozen_axes or None, frozen_source=frozen_source)

  if use_lora:
    policy_init = lambda k: lora_lib.init(m, config.lora, k)  # noqa: E731
    policy_axes = lora_lib.param_axes(m, config.lora)
  else:
    policy_init, policy_axes = (lambda k: model.init(m, k)), model.param_axes(m)

  if ppo:
    critic_from = r.critic_from or config.init_from
    init_params = lambda k: {"policy": policy_init(k), "critic": reward_model.init(m, k)}  # noqa: E731
    param_axes = {"policy": policy_axes, "critic": reward_model.param_axes(m)}
    critic_loader = runs.reward_init_loader(m, sharder)

    def load_init(path, params):
      policy = params["policy"] if use_lora else runs.load_params(path, params["policy"])
      return {"policy": policy, "critic": critic_loader(critic_from, params["critic"])}
    loss_fn = ppo_loss_fn(config, sharder, use_lora)
  else:
    init_params, param_axes = policy_init, policy_axes
    load_init = None if use_lora else runs.load_params
    loss_fn = grpo_loss_fn(config, sharder, use_lora, r.max_new_tokens)

  state = {"kl_coef": r.kl_coef}
  ref_key = "policy" if use_lora else "reference"
  jit_values = jax.jit(lambda c, b: values_of(c, b, m, sharder))
  jit_ref = jax.jit(lambda w, b: token_logps(model.forward(
      w, b["tokens"], m, segment_ids=b["segment_ids"], positions=b["positions"],
      sharder=sharder), b["targets"], r.temperature)[0])

  # The adapters' arrays only: LoRA's scale and dropout stay Python numbers in the trace.
  jit_current = jax.jit(lambda w, a, b: token_logps(model.forward(
      w, b["tokens"], m, segment_ids=b["segment_ids"], positions=b["positions"],
      sharder=sharder, lora=a and lora_lib.as_model_lora(a, config.lora)),
      b["targets"], r.temperature)[0])
  train_data = _WithState(data.dataset(), state)
  ahead = {}  # step -> its rollout, started during the step before (rl.max_staleness)
  pool = concurrent.futures.ThreadPoolExecutor(1, "rollout") if r.max_staleness else None

  def lagged(rows, metrics, lag: int, weights, adapters):
    """rl.max_staleness: the rollout policy's log-probs against the current one's. The
    ratio's anchor becomes the current policy (what this update starts from) and each
    token's loss is weighted by min(pi_current / pi_rollout, rl.is_cap)."""
    mask = rows["loss_mask"].astype(np.float32)
    if lag:
      inputs = {k: rows[k] for k in ("tokens", "targets", "segment_ids", "positions")}
      current = np.asarray(multihost_utils.process_allgather(
          jit_current(weights, adapters and adapters.adapters,
                      sharding.global_batch(inputs, sharder)), tiled=True))
      weight, cut = map(np.asarray, losses.truncated_is_weights(current, rows["old_logps"],
                                                                r.is_cap))
      rows["old_logps"] = (current * mask).astype(np.float32)
    else:
      weight, cut = np.ones_like(mask), np.zeros_like(mask)
    rows["is_weight"] = (weight * mask).astype(np.float32)
    tokens = max(float(mask.sum()), 1.0)
    metrics.update({"rollout/lag": lag, "rollout/is_weight": float((weight * mask).sum()) / tokens,
                    "rollout/is_clipfrac": float((cut * mask).sum()) / tokens})

  def rollout(params, frozen_tree, host_batch, step):
    policy_params = params["policy"] if ppo else params
    weights, adapters = lora_lib.split(policy_params, (frozen_tree or {}).get("policy"),
                                       config.lora)
    waited = time.perf_counter()
    pending = ahead.pop(step, None)
    rows, scores, metrics = (pending.result() if pending is not None
                             else data.sample(weights, adapters, host_batch, step))
    if r.max_staleness:
      following = step + 1
      # After a checkpoint the next rollout is made afresh (lag 0), as a resumed run makes
      # it: resumes stay exact.
      if following < config.steps and following % config.checkpoint_every:
        # Taken before this step's update is dispatched (it updates the params in place).
        snapshot = data.engine.snapshot(weights, adapters)
        ahead[following] = pool.submit(data.sample, snapshot, None, train_data.current.peek(),
                                       following)
      lagged(rows, metrics, int(pending is not None), weights, adapters)
      # The step's time outside its update: what was left of the overlapped rollout, the
      # snapshot, and the current policy's forward.
      metrics["time/rollout_wait_s"] = time.perf_counter() - waited
    R = len(scores)
    if not ppo:
      adv = losses.group_advantages(jnp.asarray(scores.reshape(-1, r.num_generations)),
                                r.advantage_scale, r.std_ddof)
      rows["advantages"] = np.asarray(adv, np.float32).reshape(R)
      metrics["objective/rlhf_reward"] = metrics["objective/scores"]
      return sharding.global_batch(rows, sharder), metrics
    batch = sharding.global_batch(rows, sharder)
    values = np.asarray(multihost_utils.process_allgather(jit_values(params["critic"], batch),
                                                          tiled=True))
    mask = rows["loss_mask"].astype(np.float32)
    kl = np.zeros_like(mask)
    if r.kl_coef > 0:
      ref = np.asarray(multihost_utils.process_allgather(jit_ref(frozen_tree[ref_key], batch),
                                                         tiled=True))
      kl = (rows["old_logps"] - ref) * mask  # k1 per token
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    per_token = np.zeros_like(mask)
    per_token[np.arange(R), last] = scores  # the score sits on the final token
    if r.kl_estimator == "k1":
      per_token -= state["kl_coef"] * kl
    if r.whiten_rewards:
      per_token = np.asarray(losses.whiten(jnp.asarray(per_token), jnp.asarray(mask), False,
                                           r.std_ddof))
    adv, ret = losses.gae(jnp.asarray(per_token), jnp.asarray(values * mask), jnp.asarray(mask),
                      r.gamma, r.lam)
    adv = losses.whiten(adv, jnp.asarray(mask), ddof=r.std_ddof)
    rows.update(advantages=np.asarray(adv, np.float32), returns=np.asarray(ret, np.float32),
                old_values=(values * mask).astype(np.float32),
                kl_coef=np.full(R, state["kl_coef"], np.float32))
    mean_kl = float((kl.sum(1)).mean())
    metrics.update({"objective/kl": mean_kl, "objective/kl_coef": state["kl_coef"],
                    "objective/rlhf_reward": float(scores.mean() - state["kl_coef"] * mean_kl)})
    if r.kl_target > 0:  # adaptive KL (Ziegler et al.): steer the per-token KL to the target
      n_tokens = max(float(mask.sum(1).mean()), 1.0)
      error = np.clip(mean_kl / n_tokens / r.kl_target - 1.0, -0.2, 0.2)
      state["kl_coef"] *= 1.0 + error * 0.1
    return sharding.global_batch(rows, sharder), metrics

  rows = config.data.batch_size * r.num_generations
  flops = model.flops_per_token(m, data.seq_len, weight_grads=not use_lora)
  return loop.Task(
      init_params=init_params, param_axes=param_axes, loss_fn=loss_fn, load_init=load_init,
      **frozen, train_data=train_data, data_report=data.report,
      rollout=rollout,
      epochs=r.epochs, minibatches=r.minibatches,
      tokens_per_batch=rows * data.seq_len * r.epochs, flops_per_token=flops)


def config_errors(config, ok) -> list[str]:
  """GRPO's and PPO's rules: a policy to start from, a reward source (each reward
  function imported and its signature checked), groups, minibatches and temperature."""
  rl_cfg, errors = config.rl, []
  if not config.init_from:
    errors.append(f"init_from: task={config.task!r} needs the policy to start from")
  if not config.reward.fn and not config.reward.model:
    errors.append("reward.fn / reward.model: set a reward source (e.g. reward.fn=math_answer)")
  if config.reward.fn:
    errors += reward_fns.spec_errors(config.reward.fn)
  if config.reward.model and not os.path.exists(config.reward.model):
    errors.append(f"reward.model: no such path {config.reward.model!r}")
  if config.task == "grpo" and ok("rl.num_generations") and rl_cfg.num_generations < 2:
    errors.append(f"rl.num_generations={rl_cfg.num_generations}: GRPO needs groups of >= 2")
  if ok("data.batch_size", "rl.num_generations", "rl.minibatches", "optimizer.grad_accum_steps"):
    rows = config.data.batch_size * rl_cfg.num_generations
    accum = config.optimizer.grad_accum_steps
    if rows % rl_cfg.minibatches:
      errors.append(f"rl.minibatches={rl_cfg.minibatches} does not divide the "
                    f"{rows} completions of a step (data.batch_size * rl.num_generations)")
    elif (rows // rl_cfg.minibatches) % accum:
      errors.append(f"optimizer.grad_accum_steps={accum} does not divide the "
                    f"{rows // rl_cfg.minibatches} completions of a minibatch")
  if ok("rl.temperature") and not rl_cfg.temperature > 0:
    errors.append(f"rl.temperature={rl_cfg.temperature}: must be > 0 (the policy's "
                  f"log-probs are taken at it)")
  return errors
