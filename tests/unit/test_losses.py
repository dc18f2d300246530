import jax.numpy as jnp
import pytest
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


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_bradley_terry_equals_float64_formula():
  rng = np.random.default_rng(1)
  rc, rr, m = rng.normal(size=(3, 16)) * 2
  got = losses.bradley_terry(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(m), center_coef=0.01)
  want = -_log_sigmoid(rc - rr - m) + 0.01 * (rc + rr) ** 2
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", losses.DPO_LOSSES)
@pytest.mark.parametrize("smoothing, reference_free", [(0.0, False), (0.1, False), (0.0, True)])
def test_dpo_family_equals_float64_formulas(kind, smoothing, reference_free):
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = rng.normal(size=(4, 32)) * 3 - 40
  beta = 0.1
  got, chosen_rewards, rejected_rewards = losses.dpo(
      *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss=kind, label_smoothing=smoothing,
      reference_free=reference_free)
  if reference_free:
    rc, rr = np.zeros_like(rc), np.zeros_like(rr)
  h = (pc - rc) - (pr - rr)
  e = smoothing
  want = {
      "sigmoid": -(1 - e) * _log_sigmoid(beta * h) - e * _log_sigmoid(-beta * h),
      "robust": (-(1 - e) * _log_sigmoid(beta * h) + e * _log_sigmoid(-beta * h)) / (1 - 2 * e),
      "ipo": (h - 1 / (2 * beta)) ** 2,
      "hinge": np.maximum(0.0, 1 - beta * h),
  }[kind]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(chosen_rewards), beta * (pc - rc), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rejected_rewards), beta * (pr - rr), rtol=1e-5, atol=1e-6)


def test_sequence_logps_and_pair_gather_equal_float64_formulas():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 6, 9)) * 2
  targets = rng.integers(0, 9, size=(4, 6))
  mask = rng.integers(0, 2, size=(4, 6))
  got = losses.sequence_logps(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                              jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  values = rng.normal(size=(2, 3)).astype(np.float32)
  pairs = np.array([[[0, 1], [0, 2], [1, 2]], [[1, 0], [0, 0], [0, 0]]])
  chosen, rejected = losses.gather_pairs(jnp.asarray(values), jnp.asarray(pairs))
  np.testing.assert_array_equal(np.asarray(chosen), [values[0, [0, 0, 1]], values[1, [1, 0, 0]]])
  np.testing.assert_array_equal(np.asarray(rejected), [values[0, [1, 2, 2]], values[1, [0, 0, 0]]])


def test_length_normalized_ipo_equals_trls_formula():
  """dpo.length_normalize: TRL's IPO divides each answer's log-ratio by its token count
  (trl/trainer/dpo_trainer.py, loss_type "ipo") before the squared loss."""
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = rng.normal(size=(4, 16)) * 3 - 40
  nc, nr = rng.integers(1, 30, size=(2, 16)).astype(np.float64)
  beta = 0.1
  got, chosen_rewards, _ = losses.dpo(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss="ipo",
                                      lengths=(jnp.asarray(nc), jnp.asarray(nr)))
  delta = (pc - rc) / nc - (pr - rr) / nr
  np.testing.assert_allclose(np.asarray(got), (delta - 1 / (2 * beta)) ** 2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(chosen_rewards), beta * (pc - rc) / nc, rtol=1e-5)


def test_bessel_corrected_group_std_and_whitening_equal_float64_formulas():
  """rl.std_ddof=1: GRPO's std of each group's rewards (and the batch's) and PPO's masked
  whitening divide by n - 1 (at G=4 the advantages are sqrt(4/3) = 1.15x smaller)."""
  rng = np.random.default_rng(4)
  r = rng.normal(size=(3, 4))
  got = np.asarray(losses.group_advantages(jnp.asarray(r), "group", ddof=1))
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = np.asarray(losses.group_advantages(jnp.asarray(r), "group"))
  np.testing.assert_allclose(plain / got, np.sqrt(4 / 3), rtol=1e-3)
  got = np.asarray(losses.group_advantages(jnp.asarray(r), "batch", ddof=1))
  np.testing.assert_allclose(got, (r - r.mean(1, keepdims=True)) / (r.std(ddof=1) + 1e-4),
                             rtol=1e-5)
  x = rng.normal(size=(2, 6))
  mask = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], np.float64)
  v = x[mask > 0]
  want = (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8) * mask
  np.testing.assert_allclose(np.asarray(losses.whiten(jnp.asarray(x), jnp.asarray(mask), ddof=1)),
                             want, rtol=1e-5, atol=1e-6)


def test_bessel_corrected_group_std_equals_trls_own():
  """Against TRL's GRPO advantages: (r - group mean) / (trl.trainer.utils.nanstd + 1e-4)."""
  torch = pytest.importorskip("torch")
  trl_utils = pytest.importorskip("trl.trainer.utils")
  rng = np.random.default_rng(5)
  r = rng.normal(size=(5, 4))
  t = torch.tensor(r)
  std = trl_utils.nanstd(t, dim=1).unsqueeze(1)
  want = ((t - t.mean(1, keepdim=True)) / (std + 1e-4)).numpy()
  np.testing.assert_allclose(np.asarray(losses.group_advantages(jnp.asarray(r), "group", ddof=1)),
                             want, rtol=1e-5)
