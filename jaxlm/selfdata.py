"""Data from the model itself (tools/selfdata.py is the command line):

  best_of_n     sample N completions per prompt, keep the one the reward source scores
                highest: SFT records (rejection sampling)
  pairs         sample N per prompt and label the best and worst by a reward source, or
                by a judge model asked which of two is better: preference records (RLAIF)
  constitution  sample a response, have the model critique it against a principle drawn
                from a list, then revise it: SFT records of the revisions, and preference
                pairs of revision over original

Prompts are RL prompt examples (jaxlm.data.prompts: `prompt`, `question` or Alpaca
fields); the reward source is jaxlm.reward_fns.Rewards. Records are conversational, so
SFT, reward and DPO read them as they are. Each mode returns its records and, by reason,
the prompts that yielded nothing (a tie, an empty completion).
"""

from __future__ import annotations

import collections
import random

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, sample
from jaxlm.data import sft


JUDGE_PROMPT = ("Which response answers the request better? Reply with A or B.\n\n"
                "Request: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}")
CRITIQUE_PROMPT = ("Principle: {principle}\n\nRequest: {prompt}\n\nResponse: {response}\n\n"
                   "Critique the response against the principle.")
REVISION_PROMPT = ("Principle: {principle}\n\nRequest: {prompt}\n\nResponse: {response}\n\n"
                   "Critique: {critique}\n\nRewrite the response so that it follows the "
                   "principle. Reply with the new response only.")


class Sampler(sample.TextSampler):
  """Chat completions from one model (runs.LanguageModel), stripped, `batch_size` rows
  decoding at once (a finished row takes the next conversation)."""

  def __init__(self, policy, *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, batch_size: int):
    super().__init__(policy, chat=True, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed)
    self.batch_size = batch_size

  def __call__(self, conversations: list) -> list[str]:
    """One completion per conversation [(role, text), ...]."""
    ids = [self.chat_ids(c) for c in conversations]
    return [text.strip() for text in self.complete(ids, rows=self.batch_size)]


def judge_prefers_first(judge, prompt: str, a: str, b: str) -> float:
  """The judge model's probability that A is better than B: the softmax over the first
  tokens of "A" and "B" at the start of its reply, averaged over both orders (to cancel
  position bias)."""
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


def _assistant(text: str):
  return [{"role": "assistant", "content": text}]


def _sample_groups(prompts, sampler, source, n: int):
  """n completions per prompt (prompt i's are texts[i * n:(i + 1) * n]) and, when a
  reward source is given, their scores (else None)."""
  texts = sampler([p.turns for p in prompts for _ in range(n)])
  if source is None:
    return texts, None
  fields = {k: [p.fields.get(k) for p in prompts for _ in range(n)]
            for k in sorted({k for p in prompts for k in p.fields})}
  scores, _ = source([p.text for p in prompts for _ in range(n)], texts, fields,
                     [_messages(p.turns) for p in prompts for _ in range(n)],
                     where=[p.where for p in prompts for _ in range(n)])
  return texts, scores


def best_of_n(prompts, sampler: Sampler, source, n: int):
  """Per prompt, the best scored of n non-empty completions, as an SFT record with its
  `reward` -> (records, Counter of skipped prompts by reason)."""
  texts, scores = _sample_groups(prompts, sampler, source, n)
  records, counts = [], collections.Counter()
  for i, p in enumerate(prompts):
    keep = [j for j in range(n) if texts[i * n + j]]
    if not keep:
      counts["skipped_empty_completion"] += 1
      continue
    best = i * n + max(keep, key=lambda j: scores[i * n + j])
    records.append({"prompt": _messages(p.turns), "completion": _assistant(texts[best]),
                    "reward": float(scores[best])})
  return records, counts


def pairs(prompts, sampler: Sampler, n: int, *, source=None, judge=None):
  """Per prompt, a preference record from n completions: with a `judge` model, its
  choice between the first two distinct ones (`judge_probability`); else the best and
  worst by the reward `source` (`score_chosen`, `score_rejected`) -> (records, Counter of
  skipped prompts by reason: an empty completion, all identical, a tie)."""
  texts, scores = _sample_groups(prompts, sampler, None if judge is not None else source, n)
  records, counts = [], collections.Counter()
  for i, p in enumerate(prompts):
    group = texts[i * n:(i + 1) * n]
    keep = [j for j, t in enumerate(group) if t]
    if len(keep) < 2:
      counts["skipped_empty_completion"] += 1
      continue
    if judge is not None:
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
    records.append({"prompt": _messages(p.turns), "chosen": _assistant(chosen),
                    "rejected": _assistant(rejected), **extra})
  return records, counts


def constitution(prompts, sampler: Sampler, principles: list[str], seed: int):
  """Per prompt, a response, its critique against a principle drawn (with `seed`) from
  `principles`, and its revision -> (SFT records of the revisions with `principle`,
  `original` and `critique`; preference records of a revision over a different non-empty
  original; Counter of skipped prompts by reason)."""
  rng = random.Random(seed)
  drawn = [rng.choice(principles) for _ in prompts]
  responses = sampler([p.turns for p in prompts])
  critiques = sampler([[("user", CRITIQUE_PROMPT.format(principle=c, prompt=p.text,
                                                        response=r))]
                       for p, r, c in zip(prompts, responses, drawn)])
  revisions = sampler([[("user", REVISION_PROMPT.format(principle=c, prompt=p.text,
                                                        response=r, critique=k))]
                       for p, r, k, c in zip(prompts, responses, critiques, drawn)])
  records, pair_records, counts = [], [], collections.Counter()
  for p, r, k, v, c in zip(prompts, responses, critiques, revisions, drawn):
    if not v:
      counts["skipped_empty_completion"] += 1
      continue
    records.append({"prompt": _messages(p.turns), "completion": _assistant(v),
                    "principle": c, "original": r, "critique": k})
    if v != r and r:
      pair_records.append({"prompt": _messages(p.turns), "chosen": _assistant(v),
                           "rejected": _assistant(r), "principle": c})
  return records, pair_records, counts
