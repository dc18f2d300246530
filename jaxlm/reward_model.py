"""Reward models: the language model's backbone with a scalar head, and the scoring API.

A reward model's parameters are `{"backbone": the model's parameters without its output
projection, "head": {"w": [D], "b": []}}`. The reward of a sequence is the head applied
to the final hidden state of its last non-pad token: for a chat, the end of the response
(its end-of-turn marker), which has seen the prompt and the whole response.

Later stages score with it through `load` and `score`:

    rm = jaxlm.reward.load("runs/reward_tiny")
    rewards = jaxlm.reward.score(rm, prompts, responses)   # np.ndarray [N]
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxlm import console, generate, model, sharding
from jaxlm.config import ModelConfig
from jaxlm.data import sft


NORMALIZATION_FILE = "reward_normalization.json"


def backbone_axes(cfg) -> dict:
  axes = model.param_axes(cfg)
  axes.pop("lm_head", None)
  return axes


def param_axes(cfg) -> dict:
  return {"backbone": backbone_axes(cfg), "head": {"w": ("norm",), "b": ()}}


def init_head(cfg, rng) -> dict:
  """w ~ N(0, 1/D^2), b = 0: with unit-scale hidden states the first rewards have a
  standard deviation near 1/sqrt(D), close to zero, yet every weight gets a gradient."""
  w = jax.random.normal(rng, (cfg.d_model,), jnp.float32) / cfg.d_model
  return {"w": w, "b": jnp.zeros((), jnp.float32)}


def init(cfg, rng) -> dict:
  backbone_rng, head_rng = jax.random.split(rng)
  backbone = model.init(cfg, backbone_rng)
  backbone.pop("lm_head", None)
  return {"backbone": backbone, "head": init_head(cfg, head_rng)}


def rewards(params, tokens, cfg, *, segment_ids, positions=None, sharder=None, lora=None,
            backbone=None):
  """Float32 rewards [N] for sequences [N, T] (left-aligned, padding is segment 0).

  `backbone` overrides params["backbone"] (a frozen base under LoRA, with `lora`)."""
  weights = params["backbone"] if backbone is None else backbone
  h = model.hidden_states(weights, tokens, cfg, segment_ids=segment_ids, positions=positions,
                          sharder=sharder, lora=lora)
  last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return h_last @ params["head"]["w"] + params["head"]["b"]


# ---------------------------------------------------------------------------------------
# Scoring API


@dataclasses.dataclass
class RewardModel:
  """A trained reward model ready to score: its arrays and how to read text."""
  params: dict
  model_config: ModelConfig
  tokenizer: object
  template: object               # jaxlm.data.sft.ChatTemplate
  max_len: int                   # longer sequences are cut to this (and reported)
  sharder: sharding.Sharder
  normalization: dict | None = None  # {"mean", "std", ...}: rewards become (r - mean) / std
  _fn: object = None


def _as_turns(prompt) -> list[tuple[str, str, bool]]:
  if isinstance(prompt, str):
    return [("user", prompt, False)]
  turns = []
  for m in prompt:
    role, text = (m["role"], m["content"]) if isinstance(m, dict) else m
    turns.append((role, text, False))
  return turns


def encode(rm: RewardModel, prompt, response: str) -> np.ndarray:
  """BOS, the prompt and the response as an assistant turn, as the reward task encodes
  them (the id sequence whose last token the reward is read at)."""
  tokenized = sft.tokenize(_as_turns(prompt) + [("assistant", response, True)], True,
                           rm.tokenizer, rm.template, "completion")
  if isinstance(tokenized, str):
    raise sft.DataError(f"the chat template can't render this conversation: {tokenized}")
  return tokenized[0]


def score_tokens(rm: RewardModel, sequences: list[np.ndarray], *, batch_size: int = 32,
                 normalize: bool = True) -> np.ndarray:
  """Rewards for id sequences (BOS first). Batched by similar length, padded to a power
  of two and to `batch_size` rows, so each shape bucket compiles once."""
  if rm._fn is None:
    rm._fn = jax.jit(lambda p, t, s: rewards(p, t, rm.model_config, segment_ids=s,
                                             sharder=rm.sharder))
  dp = rm.sharder.data_parallel_size
  batch_size = -(-batch_size // dp) * dp
  order = np.argsort([len(s) for s in sequences], kind="stable")
  out = np.zeros(len(sequences), np.float32)
  cut = 0
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    # Lengths compile in powers of two (from 16), so a few shapes serve all.
    length = min(generate.bucket(max(len(sequences[i]) for i in chunk)), rm.max_len)
    tokens = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(chunk):
      seq = sequences[i][:length]
      cut += len(sequences[i]) > length
      tokens[row, :len(seq)] = seq
      segments[row, :len(seq)] = 1
    batch = sharding.global_batch({"tokens": tokens, "segments": segments}, rm.sharder)
    r = rm._fn(rm.params, batch["tokens"], batch["segments"])
    out[chunk] = np.asarray(multihost_utils.process_allgather(r, tiled=True))[:len(chunk)]
  if cut:
    console.warning(f"{cut} of {len(sequences)} sequences were longer than {rm.max_len} tokens "
                    f"and scored on their first {rm.max_len}")
  if normalize and rm.normalization:
    out = (out - rm.normalization["mean"]) / rm.normalization["std"]
  return out


def score(rm: RewardModel, prompts: list, responses: list[str], *, batch_size: int = 32,
          normalize: bool = True) -> np.ndarray:
  """Rewards [N] for N (prompt, response) pairs. A prompt is a string (one user turn)
  or a list of {"role", "content"} messages; rewards are normalized when the run saved
  a normalization and `normalize` is on."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  return score_tokens(rm, [encode(rm, p, r) for p, r in zip(prompts, responses)],
                      batch_size=batch_size, normalize=normalize)
