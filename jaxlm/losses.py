"""Pure loss functions of arrays, every stage's: cross-entropy (pretraining, SFT),
Bradley-Terry (reward models), the DPO family, and the policy-gradient pieces (PPO, GRPO).
No model calls, no config objects.

Losses return *sums* plus the weight they were summed over, so gradient accumulation
and data-parallel reduction give exactly the full-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_stats(logits_BTV, targets_BT):
  """Per position, in float32: log Z (the log-sum-exp of the logits), the target's logit,
  and 1.0 where the target is the argmax. The log-prob of the target is their difference."""
  logits = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  correct_BT = (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32)
  return log_z_BT, target_logit_BT, correct_BT


def cross_entropy_from_stats(log_z_BT, target_logit_BT, mask_BT, z_loss: float = 0.0):
  """Masked next-token cross-entropy from `token_stats`.

  Returns (loss_sum, z_loss_sum, weight): sum over unmasked tokens of
  -log softmax(logits)[target] + z_loss * log(Z)^2, the z-loss part alone, and the
  number of unmasked tokens.
  """
  mask = mask_BT.astype(jnp.float32)
  nll_sum = jnp.sum((log_z_BT - target_logit_BT) * mask)
  z_sum = z_loss * jnp.sum(jnp.square(log_z_BT) * mask)
  return nll_sum + z_sum, z_sum, jnp.sum(mask)


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
  """`cross_entropy_from_stats` of full logits [B, T, V]."""
  log_z, target_logit, _ = token_stats(logits_BTV, targets_BT)
  return cross_entropy_from_stats(log_z, target_logit, mask_BT, z_loss)


# ---------------------------------------------------------------------------------------
# Preferences (reward modeling and the DPO family). Per-pair values; tasks sum them.


def bradley_terry(reward_chosen, reward_rejected, margin=None, center_coef: float = 0.0):
  """-log sigmoid(r_chosen - r_rejected - margin), plus the reward-centering term
  center_coef * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023), per pair."""
  diff = reward_chosen - reward_rejected
  if margin is not None:
    diff = diff - margin
  loss = -jax.nn.log_sigmoid(diff)
  if center_coef:
    loss = loss + center_coef * jnp.square(reward_chosen + reward_rejected)
  return loss


DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")


def dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *,
        beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
        reference_free: bool = False, lengths=None):
  """The DPO family on sequence log-probs, per pair -> (losses, chosen_rewards,
  rejected_rewards), the rewards being beta * (policy - reference) log-ratios.
  `lengths` (chosen, rejected token counts): each answer's log-probs are first divided
  by its length (TRL's IPO: the mean token log-ratio).

  h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected), with
  the reference terms taken as 0 when `reference_free`:
    sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)   (DPO; cDPO when e > 0)
    robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)   (Chowdhury et al.)
    ipo      (h - 1 / (2 beta))^2                         (Azar et al.)
    hinge    max(0, 1 - beta h)                           (SLiC)
  """
  if reference_free:
    reference_chosen = jnp.zeros_like(policy_chosen)
    reference_rejected = jnp.zeros_like(policy_rejected)
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  if lengths is not None:
    chosen_ratio = chosen_ratio / jnp.maximum(lengths[0], 1.0)
    rejected_ratio = rejected_ratio / jnp.maximum(lengths[1], 1.0)
  h = chosen_ratio - rejected_ratio
  e = label_smoothing
  if loss == "sigmoid":
    per_pair = -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
  elif loss == "robust":
    per_pair = (-(1 - e) * jax.nn.log_sigmoid(beta * h)
                + e * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
  elif loss == "ipo":
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))
  elif loss == "hinge":
    per_pair = jax.nn.relu(1.0 - beta * h)
  else:
    raise ValueError(f"dpo loss {loss!r}: one of {', '.join(DPO_LOSSES)}")
  return per_pair, beta * chosen_ratio, beta * rejected_ratio


def sequence_logps_from_stats(log_z_BT, target_logit_BT, mask_BT):
  """Per-row sums over masked positions of log softmax(logits)[target] -> [B] (float32):
  the log-probability a model gives each sequence's supervised tokens."""
  return jnp.sum((target_logit_BT - log_z_BT) * mask_BT.astype(jnp.float32), axis=-1)


def sequence_logps(logits_BTV, targets_BT, mask_BT):
  """`sequence_logps_from_stats` of full logits [B, T, V]."""
  log_z, target_logit, _ = token_stats(logits_BTV, targets_BT)
  return sequence_logps_from_stats(log_z, target_logit, mask_BT)


def gather_pairs(values_BG, pairs_BP2):
  """Per-sequence values [B, G] -> (chosen, rejected) values [B, P] of each pair."""
  return (jnp.take_along_axis(values_BG, pairs_BP2[..., 0], axis=1),
          jnp.take_along_axis(values_BG, pairs_BP2[..., 1], axis=1))


# ---------------------------------------------------------------------------------------
# Policy gradients (PPO, GRPO): KL estimates, advantages and clipped objectives.
# Shapes: [B, T] per token, with `mask` marking the completion tokens that count.


def kl_k1(logp, ref_logp):
  """log pi - log ref: the unbiased, high-variance per-token KL estimate (Schulman)."""
  return logp - ref_logp


def kl_k3(logp, ref_logp):
  """exp(ref - logp) - (ref - logp) - 1 >= 0: unbiased, lower variance (Schulman's k3,
  GRPO's KL term)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def masked_mean(x, mask, axis=None):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x, mask, shift_mean: bool = True, ddof: int = 0):
  """(x - mean) / std over the masked entries (the mean kept when not `shift_mean`);
  `ddof` 1: the variance Bessel-corrected (n / (n - 1)), as TRL's PPO whitened."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  if ddof:
    n = jnp.sum(mask.astype(jnp.float32))
    var = var * n / jnp.maximum(n - ddof, 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return out * mask


def gae(rewards, values, mask, gamma: float, lam: float):
  """Generalized advantage estimation over each row's masked tokens (a contiguous
  completion), bootstrapping 0 after its last token -> (advantages, returns)."""
  mask = mask.astype(jnp.float32)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  deltas = rewards + gamma * next_values * next_mask - values

  def step(carry, x):
    delta, m, nm = x
    adv = delta + gamma * lam * carry * nm
    return adv * m, adv * m

  _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0]),
                        (deltas.T, mask.T, next_mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def group_advantages(rewards_PG, scale: str, ddof: int = 0):
  """GRPO: each completion's reward minus its group's mean, divided by the group's std
  ("group"), the batch's std ("batch", as in Dr. GRPO's critique) or nothing ("none");
  `ddof` 1: the std Bessel-corrected, as TRL's."""
  centered = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
  if scale == "group":
    return centered / (jnp.std(rewards_PG, axis=1, keepdims=True, ddof=ddof) + 1e-4)
  if scale == "batch":
    return centered / (jnp.std(rewards_PG, ddof=ddof) + 1e-4)
  if scale == "none":
    return centered
  raise ValueError(f"advantage scale {scale!r}: group | batch | none")


def clipped_policy_loss(logp, old_logp, advantages, clip_low: float, clip_high: float):
  """Per token: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = pi / pi_old;
  also whether the clip was active, and the k1-style approximate KL to the old policy."""
  ratio = jnp.exp(logp - old_logp)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  clipfrac = (clipped < unclipped).astype(jnp.float32)
  approx_kl = 0.5 * jnp.square(logp - old_logp)
  return loss, clipfrac, approx_kl


def truncated_is_weights(logp, rollout_logp, cap: float):
  """Per token: the importance weight min(pi / pi_rollout, cap) that corrects for tokens
  sampled by an older policy (truncated importance sampling), and whether it was cut."""
  ratio = jnp.exp(logp - rollout_logp)
  return jnp.minimum(ratio, cap), (ratio > cap).astype(jnp.float32)


def clipped_value_loss(values, old_values, returns, clip: float):
  """Per token: 0.5 max((v - R)^2, (clip(v, v_old +- clip) - R)^2), and clip activity."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  a, b = jnp.square(values - returns), jnp.square(clipped - returns)
  return 0.5 * jnp.maximum(a, b), (b > a).astype(jnp.float32)


def aggregate(per_token, mask, how: str, max_tokens: int):
  """Sum for the loop to divide by the returned weight:
    sequence  mean over each sequence's tokens, then over sequences (GRPO)
    token     mean over every token of the batch (DAPO)
    constant  sum over tokens / (sequences * max_tokens) (Dr. GRPO)"""
  mask = mask.astype(jnp.float32)
  if how == "sequence":
    per_seq = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    rows = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
    return jnp.sum(per_seq * rows), jnp.sum(rows)
  if how == "token":
    return jnp.sum(per_token * mask), jnp.sum(mask)
  if how == "constant":
    rows = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(rows) * max_tokens
  raise ValueError(f"loss aggregation {how!r}: sequence | token | constant")
