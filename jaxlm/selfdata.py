"""Data from the model itself: `python -m jaxlm.selfdata --mode MODE ...`.

  best_of_n     sample N completions per prompt, keep the one the reward source scores
                highest: SFT JSONL (rejection sampling)
  pairs         sample N per prompt and label the best and worst by a reward source, or
                by a judge model asked which of two is better: preference JSONL (RLAIF)
  constitution  sample a response, have the model critique it against a principle drawn
                from a file, then revise it: SFT JSONL of the revisions, and with
                --pairs_out, preference pairs of revision over original

Prompts are RL prompt records (jaxlm.data.prompts: `prompt`, `question` or Alpaca
fields); the reward source is jaxlm.rewards' (--reward_fn, --reward_model). Records are
conversational, so SFT, reward and DPO read the outputs as they are. Every prompt that
yields nothing (a tie, an empty completion) is counted by reason and reported.
"""

from __future__ import annotations

import collections
import json
import random
import sys

import jax
import numpy as np
from absl import app, flags

from jaxlm import console, fileio, generate
from jaxlm.data import sft

_MODE = flags.DEFINE_enum("mode", None, ["best_of_n", "pairs", "constitution"], "What to make.")
_MODEL = flags.DEFINE_string("model", None, "The model that samples (a jaxlm run or HF dir).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompt records (JSON/JSONL, gzip accepted).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSONL.")
_N = flags.DEFINE_integer("n", 4, "Completions sampled per prompt (best_of_n, pairs).")
_REWARD_FN = flags.DEFINE_string("reward_fn", "", "Reward functions, as config.reward.fn.")
_REWARD_MODEL = flags.DEFINE_string("reward_model", "", "A jaxlm reward run.")
_JUDGE = flags.DEFINE_string("judge", "", "pairs: a model asked which of two responses is "
                             "better (instead of a reward source).")
_PRINCIPLES = flags.DEFINE_string("principles", "", "constitution: a text file, one principle "
                                  "per paragraph.")
_PAIRS_OUT = flags.DEFINE_string("pairs_out", "", "constitution: also write revision-over-"
                                 "original preference pairs here.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N prompts (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Completions generated together.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens per completion at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

JUDGE_PROMPT = ("Which response answers the request better? Reply with A or B.\n\n"
                "Request: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}")
CRITIQUE_PROMPT = ("Principle: {principle}\n\nRequest: {prompt}\n\nResponse: {response}\n\n"
                   "Critique the response against the principle.")
REVISION_PROMPT = ("Principle: {principle}\n\nRequest: {prompt}\n\nResponse: {response}\n\n"
                   "Critique: {critique}\n\nRewrite the response so that it follows the "
                   "principle. Reply with the new response only.")


class Sampler:
  """Chat completions from one model, in batches, with the engine RL uses."""

  def __init__(self, policy, *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, batch_size: int):
    self.policy, self.batch_size = policy, batch_size
    tok = policy.tokenizer
    self.stop = generate.stop_ids(tok, sft.end_of_turn(policy.template))
    self.sampling = generate.Sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, stop=(self.stop,) if self.stop else ())
    self.engine = generate.Engine(policy.model_config, eos_id=tok.eos_id,
                                  vocab_size=tok.vocab_size)
    self.rng = jax.random.PRNGKey(seed)

  def prompt_ids(self, turns):
    return sft.generation_prompt(turns, self.policy.tokenizer, self.policy.template)

  def __call__(self, conversations: list) -> list[str]:
    """One completion per conversation [(role, text), ...]."""
    tok, out = self.policy.tokenizer, []
    for start in range(0, len(conversations), self.batch_size):
      chunk = [self.prompt_ids(c) for c in conversations[start:start + self.batch_size]]
      self.rng, key = jax.random.split(self.rng)
      gen = self.engine.generate(self.policy.params, chunk, key, self.sampling,
                                 rows=self.batch_size)
      for tokens, n in zip(gen.tokens, gen.lengths):
        out.append(tok.decode(generate.completion_ids(tokens, n, tok.eos_id, self.stop)).strip())
    return out


def judge_prefers_first(judge, prompt: str, a: str, b: str) -> float:
  """The judge model's probability that A is better than B: the softmax over the first
  tokens of "A" and "B" at the start of its reply, averaged over both orders (to cancel
  position bias)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxlm import model  # pylint: disable=import-outside-toplevel
  tok = judge.tokenizer
  ids_a, ids_b = tok.encode("A"), tok.encode("B")
  token_a, token_b = ids_a[-1], ids_b[-1]
  probs = []
  for first, second, flip in ((a, b, False), (b, a, True)):
    turns = [("user", JUDGE_PROMPT.format(prompt=prompt, a=first, b=second))]
    ids = sft.generation_prompt(turns, tok, judge.template)
    logits = model.forward(judge.params, jnp.asarray(ids)[None], judge.model_config)[0, -1]
    p_a = float(jax.nn.sigmoid(logits[token_a] - logits[token_b]))
    probs.append(1.0 - p_a if flip else p_a)
  return float(np.mean(probs))


def _messages(turns):
  return [{"role": r, "content": t} for r, t in turns]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet()  # orbax's INFO lines and async tracebacks, unless --verbosity
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    _main()
  except (ConfigError, sft.DataError, OSError, ValueError) as e:  # a file, a record, a key
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _main():
  from jaxlm import policy as policy_lib, rewards  # pylint: disable=import-outside-toplevel
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxlm.data import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  for name, flag in (("mode", _MODE), ("model", _MODEL), ("prompts", _PROMPTS), ("out", _OUT)):
    if not flag.value:
      raise app.UsageError(f"--{name} is required")
  try:
    policy = policy_lib.load(_MODEL.value)
    loaded = prompts_lib.load_prompts([_PROMPTS.value], on_error="skip")
    prompts = loaded.examples[:_LIMIT.value or None]
    sampler = Sampler(policy, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                      top_p=_TOP_P.value, seed=_SEED.value, batch_size=_BATCH.value)
    mode = _MODE.value
    source = judge = None
    if mode in ("best_of_n", "pairs") and not _JUDGE.value:
      source = rewards.Rewards(_REWARD_FN.value, _REWARD_MODEL.value)
    if mode == "pairs" and _JUDGE.value:
      judge = policy_lib.load(_JUDGE.value)
    principles = []
    if mode == "constitution":
      if not _PRINCIPLES.value:
        raise ConfigError("--principles: constitution needs a file of principles")
      with open(_PRINCIPLES.value, encoding="utf-8") as f:
        principles = [p.strip() for p in f.read().split("\n\n") if p.strip()]
      if not principles:
        raise ConfigError(f"--principles: {_PRINCIPLES.value} holds no principle")
  except (ConfigError, sft.DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

  counts = collections.Counter(records=loaded.counts["records"], prompts=len(prompts))
  counts.update({k: v for k, v in loaded.counts.items() if k.startswith("skipped_")})
  written, pairs_written = [], []
  if mode in ("best_of_n", "pairs"):
    n = _N.value
    texts = sampler([p.turns for p in prompts for _ in range(n)])
    scores = None
    if source is not None:
      fields = {k: [p.fields.get(k) for p in prompts for _ in range(n)]
                for k in sorted({k for p in prompts for k in p.fields})}
      scores, _ = source([p.text for p in prompts for _ in range(n)], texts, fields,
                         [_messages(p.turns) for p in prompts for _ in range(n)],
                         where=[p.where for p in prompts for _ in range(n)])
    for i, p in enumerate(prompts):
      group = texts[i * n:(i + 1) * n]
      keep = [j for j, t in enumerate(group) if t]
      if len(keep) < (1 if mode == "best_of_n" else 2):
        counts["skipped_empty_completion"] += 1
        continue
      if mode == "best_of_n":
        best = max(keep, key=lambda j: scores[i * n + j])
        written.append({"prompt": _messages(p.turns),
                        "completion": [{"role": "assistant", "content": group[best]}],
                        "reward": float(scores[i * n + best])})
        continue
      if judge is not None:  # compare the first two distinct completions
        distinct = list(dict.fromkeys(group[j] for j in keep))
        if len(distinct) < 2:
          counts["skipped_identical"] += 1
          continue
        a, b = distinct[:2]
        p_a = judge_prefers_first(judge, p.text, a, b)
        chosen, rejected, margin = (a, b, p_a) if p_a >= 0.5 else (b, a, 1 - p_a)
        extra = {"judge_probability": margin}
      else:
        ranked = sorted(keep, key=lambda j: scores[i * n + j])
        lo, hi = ranked[0], ranked[-1]
        if scores[i * n + hi] == scores[i * n + lo] or group[hi] == group[lo]:
          counts["skipped_tie"] += 1
          continue
        chosen, rejected = group[hi], group[lo]
        extra = {"score_chosen": float(scores[i * n + hi]),
                 "score_rejected": float(scores[i * n + lo])}
      written.append({"prompt": _messages(p.turns),
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], **extra})
  else:
    rng = random.Random(_SEED.value)
    drawn = [rng.choice(principles) for _ in prompts]
    responses = sampler([p.turns for p in prompts])
    critiques = sampler([[("user", CRITIQUE_PROMPT.format(principle=c, prompt=p.text,
                                                          response=r))]
                         for p, r, c in zip(prompts, responses, drawn)])
    revisions = sampler([[("user", REVISION_PROMPT.format(principle=c, prompt=p.text,
                                                          response=r, critique=k))]
                         for p, r, k, c in zip(prompts, responses, critiques, drawn)])
    for p, r, k, v, c in zip(prompts, responses, critiques, revisions, drawn):
      if not v:
        counts["skipped_empty_completion"] += 1
        continue
      written.append({"prompt": _messages(p.turns),
                      "completion": [{"role": "assistant", "content": v}],
                      "principle": c, "original": r, "critique": k})
      if v != r and r:
        pairs_written.append({"prompt": _messages(p.turns),
                              "chosen": [{"role": "assistant", "content": v}],
                              "rejected": [{"role": "assistant", "content": r}],
                              "principle": c})
  for path, records in ((_OUT.value, written), (_PAIRS_OUT.value, pairs_written)):
    if not path:
      continue
    fileio.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
  counts["written"] = len(written)
  line = f"{mode}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {_OUT.value}"
  if _PAIRS_OUT.value:
    line += f"; {len(pairs_written)} pairs -> {_PAIRS_OUT.value}"
  if loaded.first:
    line += "; first skipped at " + ", ".join(f"{r}: {w}" for r, w in loaded.first.items())
  print(line)


if __name__ == "__main__":
  app.run(main)
