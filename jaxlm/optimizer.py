"""optax AdamW with a weight-decay mask, learning-rate schedules and clipping."""

from __future__ import annotations

import jax
import optax


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine / linear / constant / warmup-stable-decay (wsd)."""
  lr, warmup = opt_cfg.lr, min(opt_cfg.warmup_steps, total_steps)
  end = lr * opt_cfg.min_lr_ratio
  rest = max(total_steps - warmup, 1)
  kind = opt_cfg.schedule
  if kind == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=opt_cfg.min_lr_ratio)
  elif kind == "linear":
    after = optax.linear_schedule(lr, end, rest)
  elif kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "wsd":
    decay = max(int(round(rest * opt_cfg.decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay])
  else:
    raise ValueError(f"optimizer.schedule={kind!r}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params, opt_cfg):
  """True where weight decay applies: matrices (LoRA's A and B among them) always;
  embeddings, norms and biases only when configured."""
  def decays(path, _):
    name = path[-1].key
    if name in ("embed", "pos_embed"):
      return bool(opt_cfg.decay_embeddings)
    if "norm" in name or (name.startswith("b") and name != "b"):  # "b" alone is LoRA's B
      return bool(opt_cfg.decay_norms_and_biases)
    return True
  return jax.tree_util.tree_map_with_path(decays, params)


def make(opt_cfg, total_steps: int):
  """(optax transformation, schedule)."""
  lr = schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay,
                           mask=lambda p: decay_mask(p, opt_cfg)))
  return optax.chain(*parts), lr
