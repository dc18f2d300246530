"""Pure functions of arrays for policy-gradient training (PPO, GRPO). No model calls.

Shapes: [B, T] per token, with `mask` marking the completion tokens that count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def whiten(x, mask, shift_mean: bool = True):
  """(x - mean) / std over the masked entries (the mean kept when not `shift_mean`)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
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


def group_advantages(rewards_PG, scale: str):
  """GRPO: each completion's reward minus its group's mean, divided by the group's std
  ("group"), the batch's std ("batch", as in Dr. GRPO's critique) or nothing ("none")."""
  centered = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
  if scale == "group":
    return centered / (jnp.std(rewards_PG, axis=1, keepdims=True) + 1e-4)
  if scale == "batch":
    return centered / (jnp.std(rewards_PG) + 1e-4)
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
