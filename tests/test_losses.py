import jax.numpy as jnp
import numpy as np

from jaxlm import losses


def test_cross_entropy_equals_float64_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)) * 3
  targets = rng.integers(0, 11, size=(3, 5))
  mask = rng.integers(0, 2, size=(3, 5))
  z = 1e-2
  loss_sum, z_sum, weight = losses.cross_entropy(jnp.asarray(logits, jnp.float32),
                                                 jnp.asarray(targets), jnp.asarray(mask), z)
  log_z = np.log(np.exp(logits).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  expected_z = z * np.sum(log_z**2 * mask)
  np.testing.assert_allclose(float(loss_sum), np.sum(nll * mask) + expected_z, rtol=1e-5)
  np.testing.assert_allclose(float(z_sum), expected_z, rtol=1e-5)
  assert float(weight) == mask.sum()
