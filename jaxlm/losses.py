"""Pure loss functions of arrays. No model calls, no config objects.

Losses return *sums* plus the weight they were summed over, so gradient accumulation
and data-parallel reduction give exactly the full-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
  """Masked next-token cross-entropy.

  Returns (loss_sum, z_loss_sum, weight): sum over unmasked tokens of
  -log softmax(logits)[target] + z_loss * log(Z)^2, the z-loss part alone, and the
  number of unmasked tokens.
  """
  logits = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  mask = mask_BT.astype(jnp.float32)
  nll_sum = jnp.sum((log_z_BT - target_logit_BT) * mask)
  z_sum = z_loss * jnp.sum(jnp.square(log_z_BT) * mask)
  return nll_sum + z_sum, z_sum, jnp.sum(mask)
