"""Evaluation of one checkpoint: `config.task = "eval"`, `tools/eval.py`, and the
pipeline after every stage.

For a language model (a jaxlm run, a LoRA or PPO run, or a Hugging Face directory):

    perplexity              on held-out text (`eval.text`)
    task_accuracy           greedy completions of `eval.tasks` whose `#### N` answer line
                            equals the reference (GSM8K's "strict match")
    task_accuracy_flexible  the same with the last number when there is no `####` line
    task_accuracy_sampled   strict, one sample each at `eval.temperature`
    well_formed             share of greedy completions with a `#### N` answer line
    task_accuracy/<kind>    strict, per the records' `kind` field when they have one
    reward_mean, win_rate   a reward model's (`eval.reward_model`) scores of the greedy
                            completions, and how often they beat `eval.baseline`'s (another
                            evaluation's samples.jsonl) on the same prompts (ties count half)
    kl_to_reference         mean over sampled completions of sum_t log p(y_t) - log q(y_t),
                            q the reference model (`eval.reference`); an unbiased estimate
                            of KL(p || q) when sampled at temperature 1 without top-k/p

For a reward model: `pairwise_accuracy` and `reward_margin` on held-out pairs
(`eval.pairs`). Results go to `<workdir>/eval.json` (metrics, sample completions) and
every completion to `<workdir>/samples.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import (checkpoint, config as config_lib, console, fileio, generate, hf, losses, model,
                   reward_fns, reward_model, runs)
from jaxlm.config import base_config
from jaxlm.data import lm, preference, prompts as prompts_lib, sft, sources
from jaxlm.errors import ConfigError, one_line
from jaxlm.tasks import common


EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


def strict_answer(text: str) -> float | None:
  """The number on the last `####` line; None without one."""
  return reward_fns.final_answer(text) if "####" in text else None


def _same(a: float | None, b: float | None) -> bool:
  return a is not None and b is not None and abs(a - b) < 1e-6


# ---------------------------------------------------------------------------------------
# Language models


def perplexity(policy, spec: str, workdir: str, *, seq_len: int, batch_size: int,
               batches: int) -> float:
  """exp(mean next-token NLL) over up to `batches` packed batches of `spec`'s documents."""
  data = base_config().data
  data.on_error = "skip"  # an empty file among many is no reason to stop; counted
  docs = common.documents(spec, data, "eval.text", workdir)
  if policy.model_config.family == "gpt2":
    seq_len = min(seq_len, policy.model_config.max_seq_len)
  ds = lm.lm_dataset(docs, policy.tokenizer.path, seq_len=seq_len, batch_size=batch_size, seed=0,
                     shuffle=False, repeat=False)
  cfg = policy.model_config

  @jax.jit
  def nll(params, b):
    logits = model.forward(params, b["tokens"], cfg, segment_ids=b["segment_ids"],
                           positions=b["positions"])
    loss, _, weight = losses.cross_entropy(logits, b["targets"], b["loss_mask"])
    return loss, weight

  total, weight = 0.0, 0.0
  for i, batch in enumerate(ds):
    if i == batches:
      break
    loss, w = nll(policy.params, {k: jnp.asarray(v) for k, v in batch.items()})
    total, weight = total + float(loss), weight + float(w)
  if not weight:
    raise ConfigError(f"eval.text={spec!r}: not one batch of {batch_size} x {seq_len} tokens")
  return math.exp(min(total / weight, 80.0))


def _sequence_logps(cfg, params, rows: list[np.ndarray], starts: list[int], batch: int = 32):
  """Per row, the sum of log p(token) over tokens from `starts[i]` on (teacher forced)."""
  fn = jax.jit(lambda p, t, m: losses.sequence_logps(
      model.forward(p, t[:, :-1], cfg), t[:, 1:], m[:, 1:]))
  length = generate.bucket(max(len(r) for r in rows))
  out = []
  for lo in range(0, len(rows), batch):
    chunk = rows[lo:lo + batch]
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for j, r in enumerate(chunk):
      tokens[j, :len(r)] = r
      mask[j, starts[lo + j]:len(r)] = 1
    out.append(np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))[:len(chunk)])
  return np.concatenate(out)


def _generate_all(policy, engine, prompt_ids, sampling, seed: int, rows: int):
  """Completions (token lists and texts) of every prompt, `rows` decoding at once."""
  stop = sampling.stop[0] if sampling.stop else ()
  out = engine.generate(policy.params, prompt_ids, jax.random.PRNGKey(seed), sampling, rows=rows)
  tokens = [[int(t) for t in out.tokens[i, :out.lengths[i]]] for i in range(len(prompt_ids))]
  texts = [policy.tokenizer.decode(generate.completion_ids(
      out.tokens[i], out.lengths[i], policy.tokenizer.eos_id, stop)) for i in range(len(tokens))]
  return tokens, texts


def task_metrics(records, greedy: list[str], sampled: list[str] | None) -> dict:
  """Strict and flexible accuracy against each record's `answer`, overall and per kind."""
  want = [reward_fns.final_answer(str(r.fields.get("answer", ""))) for r in records]
  strict = [_same(strict_answer(g), w) for g, w in zip(greedy, want)]
  m = {"task_accuracy": float(np.mean(strict)),
       "task_accuracy_flexible": float(np.mean([_same(reward_fns.final_answer(g), w)
                                                for g, w in zip(greedy, want)])),
       "well_formed": float(np.mean([strict_answer(g) is not None for g in greedy]))}
  if sampled is not None:
    m["task_accuracy_sampled"] = float(np.mean([_same(strict_answer(s), w)
                                                for s, w in zip(sampled, want)]))
  kinds = [r.fields.get("kind") for r in records]
  for kind in sorted({k for k in kinds if isinstance(k, str)}):
    hits = [s for s, k in zip(strict, kinds) if k == kind]
    m[f"task_accuracy/{kind}"] = float(np.mean(hits))
  return m


def _baseline(path: str) -> dict:
  """prompt text -> greedy completion, from another evaluation's samples.jsonl (or its
  folder)."""
  if os.path.isdir(path):
    path = os.path.join(path, SAMPLES_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"eval.baseline: no {SAMPLES_FILE} at {path!r}")
  with open(path, encoding="utf-8") as f:
    return {r["prompt"]: r["greedy"] for r in map(json.loads, f)}


def evaluate_policy(e, policy, workdir: str, log=console.info) -> tuple[dict, list[dict]]:
  """Every language-model metric `e` (the config's eval section) asks for, and the
  per-prompt samples."""
  metrics, samples = {}, []
  if e.text:
    t0 = time.perf_counter()
    metrics["perplexity"] = perplexity(policy, e.text, workdir, seq_len=e.seq_len,
                                       batch_size=e.batch_size, batches=e.text_batches)
    log(f"perplexity {metrics['perplexity']:.3f} on {e.text} "
        f"({time.perf_counter() - t0:.1f}s)")
  if not e.tasks:
    return metrics, samples
  loaded = prompts_lib.load_prompts(sft.spec_files(e.tasks, workdir, "eval.tasks"), on_error="skip")
  records = loaded.examples[:e.max_tasks or None]
  if not records:
    raise ConfigError(f"eval.tasks={e.tasks!r}: no usable prompt record ({dict(loaded.counts)})")
  if loaded.skipped:
    log(sources.summary("eval.tasks", loaded))
  metrics["tasks"] = len(records)
  tok, template = policy.tokenizer, policy.template
  stop = sft.end_of_turn_ids(tok, template)
  prompt_ids = [sft.generation_prompt(r.turns, tok, template) for r in records]
  engine = generate.Engine(policy.model_config, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
  t0 = time.perf_counter()
  greedy_sampling = generate.Sampling(e.max_new_tokens, 0.0, stop=(stop,) if stop else ())
  _, greedy = _generate_all(policy, engine, prompt_ids, greedy_sampling, e.seed, e.batch_size)
  sampled_tokens, sampled = None, None
  if e.temperature > 0:
    sampling = generate.Sampling(e.max_new_tokens, e.temperature, e.top_k, e.top_p,
                                 stop=(stop,) if stop else ())
    sampled_tokens, sampled = _generate_all(policy, engine, prompt_ids, sampling, e.seed + 1,
                                            e.batch_size)
  metrics.update(task_metrics(records, greedy, sampled))
  metrics["completion_chars"] = float(np.mean([len(g) for g in greedy]))
  log(f"{len(records)} tasks of {e.tasks}: accuracy {metrics['task_accuracy']:.3f} "
      f"(greedy, strict), {metrics.get('task_accuracy_sampled', float('nan')):.3f} (sampled) "
      f"({time.perf_counter() - t0:.1f}s)")
  texts = [r.text for r in records]
  if e.reference and sampled_tokens is not None:
    ref = runs.load_lm(e.reference)
    if ref.tokenizer.vocab_size != tok.vocab_size:
      raise ConfigError(f"eval.reference={e.reference!r}: its tokenizer differs from the model's")
    rows = [np.concatenate([p, np.asarray(s, np.int32)]) for p, s in zip(prompt_ids, sampled_tokens)]
    starts = [len(p) for p in prompt_ids]
    diff = (_sequence_logps(policy.model_config, policy.params, rows, starts)
            - _sequence_logps(ref.model_config, ref.params, rows, starts))
    metrics["kl_to_reference"] = float(np.mean(diff))
  scores = None
  if e.reward_model:
    rm = runs.load_reward_model(e.reward_model)
    messages = [[{"role": a, "content": b} for a, b in r.turns] for r in records]
    scores = reward_model.score(rm, messages, greedy)
    metrics["reward_mean"] = float(np.mean(scores))
    if e.baseline:
      base = _baseline(e.baseline)
      shared = [i for i, t in enumerate(texts) if t in base]
      if not shared:
        raise ConfigError(f"eval.baseline={e.baseline!r}: none of its prompts are these tasks'")
      base_scores = reward_model.score(rm, [messages[i] for i in shared],
                                 [base[texts[i]] for i in shared])
      ours = scores[shared]
      metrics["win_rate"] = float(np.mean((ours > base_scores) + 0.5 * (ours == base_scores)))
  for i, r in enumerate(records):
    s = {"prompt": texts[i], "answer": r.fields.get("answer"), "greedy": greedy[i],
         "correct": _same(strict_answer(greedy[i]),
                          reward_fns.final_answer(str(r.fields.get("answer", ""))))}
    if sampled is not None:
      s["sampled"] = sampled[i]
    if scores is not None:
      s["reward"] = float(scores[i])
    samples.append(s)
  return metrics, samples


# ---------------------------------------------------------------------------------------
# Reward models


def evaluate_reward_model(e, path: str, workdir: str, log=console.info) -> dict:
  """Pairwise accuracy and mean margin of a reward model on `eval.pairs`."""
  if not e.pairs:
    return {}
  rm = runs.load_reward_model(path)
  prompts, chosen, rejected = [], [], []
  counted = sft.Examples()  # for sft.summary's line
  for f in sft.spec_files(e.pairs, workdir, "eval.pairs"):
    for where, record in sft.read_records(f):
      counted.counts["records"] += 1
      pref = record if isinstance(record, str) else preference.to_preference(record)
      if isinstance(pref, str):  # counted with its place, as training data is
        counted.skip(where, pref, "skip")
        continue
      counted.counts["used"] += 1
      for c, r, _ in pref.pairs:
        messages = [{"role": a, "content": b} for a, b in pref.prompt]
        prompts.append(messages)
        chosen.append(c)
        rejected.append(r)
  if e.max_tasks:
    prompts, chosen, rejected = (x[:e.max_tasks] for x in (prompts, chosen, rejected))
  if not prompts:
    raise ConfigError(f"eval.pairs={e.pairs!r}: no usable pair "
                      f"({sources.summary('eval.pairs', counted)})")
  rc = reward_model.score(rm, prompts, chosen)
  rr = reward_model.score(rm, prompts, rejected)
  m = {"pairwise_accuracy": float(np.mean(rc > rr)), "reward_margin": float(np.mean(rc - rr)),
       "reward_chosen": float(np.mean(rc)), "reward_rejected": float(np.mean(rr))}
  log(sources.summary("eval.pairs", counted))
  log(f"{len(prompts)} pairs of {e.pairs}: pairwise accuracy {m['pairwise_accuracy']:.3f}")
  return m


# ---------------------------------------------------------------------------------------
# Entry points


def evaluate(e, path: str, workdir: str, log=console.info) -> dict:
  """Evaluate the checkpoint at `path` as `e` (a config's eval section) says; write
  eval.json and samples.jsonl into `workdir`; return the eval.json contents."""
  t0 = time.perf_counter()
  try:
    step = None if hf.is_hf_dir(path) else checkpoint.step_of(path)
  except FileNotFoundError as err:
    raise ConfigError(f"eval.model: {err}") from None
  samples = []
  if runs.is_reward_checkpoint(path):
    metrics = evaluate_reward_model(e, path, workdir, log)
  else:
    policy = runs.load_lm(path, e.chat_template)
    metrics, samples = evaluate_policy(e, policy, workdir, log)
    if e.lm_eval_tasks.strip():  # language models only: a reward model has no text to score
      metrics["lm_eval"] = _lm_eval(e, path, workdir, log)
  shown = min(e.show, len(samples))  # spread over the tasks, so of several kinds
  result = {"model": os.path.abspath(path), "step": step, "config": e.to_dict(),
            "metrics": metrics,
            "samples": [samples[i * len(samples) // shown] for i in range(shown)],
            "seconds": time.perf_counter() - t0}
  if jax.process_index() == 0:
    fileio.write_jsonl(os.path.join(workdir, SAMPLES_FILE), samples)
    fileio.atomic_write_json(os.path.join(workdir, EVAL_FILE), result)
  return result


def _lm_eval(e, path: str, workdir: str, log) -> dict:
  """lm-evaluation-harness's per-task results for `e.lm_eval_tasks` (its whole output
  goes to lm_eval.json in `workdir`)."""
  from jaxlm import harness  # lazy: imports lm_eval, an optional dependency
  t0 = time.perf_counter()
  output = harness.evaluate_tasks(e, path, batch_size=e.batch_size)
  if jax.process_index() == 0:  # every process ran the tasks alike; one writes
    os.makedirs(workdir, exist_ok=True)
    fileio.atomic_write_json(os.path.join(workdir, "lm_eval.json"), output)
  results = output["results"]
  for task, values in results.items():
    shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items()
                      if isinstance(v, float) and "stderr" not in k)
    log(f"lm_eval {task}: {shown} ({time.perf_counter() - t0:.1f}s)")
  return results


def run(config, workdir: str) -> dict:
  """`config.task = "eval"`: evaluate `eval.model` into `workdir`."""
  e = config.eval
  if not e.model:
    raise ConfigError("eval.model: empty; name the checkpoint to evaluate (a jaxlm run or a "
                      "Hugging Face directory)")
  result = evaluate(e, e.model, workdir)
  console.info(json.dumps(result["metrics"], indent=2))
  return result["metrics"]


def config_errors(config) -> list[str]:
  """`task="eval"`'s rules: a model to evaluate, and something to evaluate it on."""
  errors = []
  if not config.eval.model:
    errors.append("eval.model: empty; name the checkpoint to evaluate (a jaxlm run or a "
                  "Hugging Face directory)")
  elif not os.path.exists(config.eval.model):
    errors.append(f"eval.model: no such path {config.eval.model!r}")
  e = config.eval
  if not (e.tasks or e.text or e.pairs or e.lm_eval_tasks.strip()):
    errors.append("eval.tasks / eval.text / eval.pairs / eval.lm_eval_tasks: all empty; "
                  "nothing to evaluate")
  return errors


def path_errors(e) -> list[str]:
  """The files an eval section names (`@stage` paths are a pipeline's, checked when it
  runs; `builtin:` sets are generated)."""
  errors = []
  for key in ("tasks", "text", "pairs"):
    spec = e[key].strip()
    if spec and not spec.startswith(("builtin:", "@")):
      try:
        fileio.expand_globs(spec, f"eval.{key}")
      except ConfigError as err:
        errors.append(str(err))
  for key in ("reward_model", "baseline", "reference", "lm_eval_include"):
    if e[key] and not e[key].startswith("@") and not os.path.exists(e[key]):
      errors.append(f"eval.{key}: no such path {e[key]!r}")
  if e.lm_eval_tasks.strip():
    try:
      from jaxlm import harness  # lazy: imports lm_eval, an optional, heavy dependency
    except ImportError:
      errors.append(f"eval.lm_eval_tasks={e.lm_eval_tasks!r}: needs lm_eval "
                    "(pip install 'jaxlm[eval]')")
    else:
      if not e.lm_eval_include.startswith("@"):  # before any training or generation
        try:
          harness.task_names(e)
        except ConfigError as err:
          errors.append(str(err))
  return errors


def section_errors(e) -> list[str]:
  """The problems of an eval section alone (tools/eval.py's flags): its files, then its
  keys, types and ranges."""
  return [one_line(x) for x in path_errors(e)] + config_lib.section_errors("eval", e)
