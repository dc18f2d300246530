"""LoRA (Hu et al. 2021): low-rank adapters as a separate parameter tree over a frozen base.

For a targeted layer weight W (inputs `in...`, outputs `out...`) the adapter is
A [in..., r] and B [r, out...]; the layer computes x W + (alpha / r) dropout(x) A B.
B starts at zero, so training starts from the base model exactly. Adapters carry logical
axes like the weights they adapt (the rank axis is `lora_rank`), so the same sharding
rules place them.

    adapters = init(model_cfg, lora_cfg, rng)
    logits = model.forward(base, tokens, model_cfg, lora=as_model_lora(adapters, lora_cfg))
    merged = merge(base, adapters, lora_cfg)      # plain params: export, sampling
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from jaxlm import model
from jaxlm.errors import ConfigError


# How many leading (after `layers`) dimensions of each adaptable weight are its inputs.
IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def enabled(lora_cfg) -> bool:
  return lora_cfg.rank > 0


def scale(lora_cfg) -> float:
  return lora_cfg.alpha / lora_cfg.rank


def targets(model_cfg, lora_cfg) -> list[str]:
  """Layer weights whose path `layers/<name>` matches `lora.targets` (a regex)."""
  try:
    pattern = re.compile(lora_cfg.targets)
  except re.error as e:
    raise ConfigError(f"lora.targets={lora_cfg.targets!r}: not a regular expression ({e})")
  names = list(model.param_shapes_and_axes(model_cfg)["layers"])
  matched = [n for n in names if pattern.search(f"layers/{n}")]
  unsupported = [n for n in matched if n not in IN_DIMS]
  if unsupported:
    raise ConfigError(f"lora.targets={lora_cfg.targets!r} matches layers/{unsupported[0]}, "
                      f"which LoRA does not adapt; it adapts {', '.join(IN_DIMS)}")
  if not matched:
    raise ConfigError(f"lora.targets={lora_cfg.targets!r} matches no layer weight of "
                      f"{', '.join(n for n in names if n in IN_DIMS)}")
  return matched


def shapes_and_axes(model_cfg, lora_cfg) -> dict:
  """{"layers": {name: {"a": (shape, axes), "b": (shape, axes)}}}."""
  layer = model.param_shapes_and_axes(model_cfg)["layers"]
  r = lora_cfg.rank
  out = {}
  for name in targets(model_cfg, lora_cfg):
    (L, *dims), (_, *axes) = layer[name]
    n = IN_DIMS[name]
    out[name] = {"a": ((L, *dims[:n], r), ("layers", *axes[:n], "lora_rank")),
                 "b": ((L, r, *dims[n:]), ("layers", "lora_rank", *axes[n:]))}
  return {"layers": out}


def _is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_axes(model_cfg, lora_cfg) -> dict:
  return jax.tree.map(lambda s: s[1], shapes_and_axes(model_cfg, lora_cfg), is_leaf=_is_spec)


def init(model_cfg, lora_cfg, rng) -> dict:
  """A ~ N(0, 1/fan_in), B = 0, in float32 whatever the base's dtype (as PEFT keeps them):
  small, and their updates need the precision."""
  specs = shapes_and_axes(model_cfg, lora_cfg)
  dtype = jnp.float32
  out = {}
  for i, (name, ab) in enumerate(sorted(specs["layers"].items())):
    a_shape, b_shape = ab["a"][0], ab["b"][0]
    fan_in = math.prod(a_shape[1:-1])
    a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32) / math.sqrt(fan_in)
    out[name] = {"a": a.astype(dtype), "b": jnp.zeros(b_shape, dtype)}
  return {"layers": out}


def as_model_lora(adapters, lora_cfg, rng=None) -> model.Lora:
  return model.Lora(adapters, scale(lora_cfg), lora_cfg.dropout, rng)


def split(trainable, base, lora_cfg, rng=None):
  """The (weights, adapters) a forward pass runs with, the one place a task decides it:
  under LoRA the frozen `base` and the trainable tree as adapters (dropout when `rng` is
  given), else the trainable tree itself and no adapters."""
  if lora_cfg is not None and enabled(lora_cfg):
    return base, as_model_lora(trainable, lora_cfg, rng)
  return trainable, None


def merge(base, adapters, lora_cfg) -> dict:
  """The base parameters with each adapter's update folded in: W + (alpha/r) A B."""
  s = scale(lora_cfg)
  layers = dict(base["layers"])
  for name, ab in adapters["layers"].items():
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    delta = jax.vmap(lambda a_l, b_l: jnp.tensordot(a_l, b_l, axes=1))(a, b)
    w = layers[name]
    layers[name] = (w.astype(jnp.float32) + s * delta).astype(w.dtype)
  return {**base, "layers": layers}
