"""Reward modeling and DPO: preference tokens, the reward read and loss, a learnable rule
learned by a reward model and by DPO, the reference modes, the scoring API and tool, and
the real HH-RLHF sample."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rule_records, small_config, write_jsonl
from jaxlm import model, reward_model, runs, tasks
from jaxlm.validate import config_errors as validate
from jaxlm.data import preference, sft, tokenizer
from jaxlm.tasks import common as task_common, dpo as dpo_task, reward_model as reward_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------
# Data


def test_a_ranking_is_its_responses_once_with_pairs_as_indices(world):
  tok = tokenizer.Tokenizer(world["tok"])
  template = sft.TEMPLATES["jaxlm"]
  pref = preference.to_preference({"prompt": "Reply to: apple", "margin": 1.5,
                                   "responses": ["sure, stone.", "no, river.", "no, cloud."]})
  group, truncated = preference.tokenize_group(pref, tok, template, max_ids=64,
                                               truncation="truncate")
  assert not truncated and len(group["ids"]) == 3  # three sequences for three pairs
  assert group["pairs"].tolist() == [[0, 1], [0, 2], [1, 2]]
  assert group["margins"].tolist() == [1.5] * 3
  first = np.flatnonzero(group["supervised"][0])[0]
  for ids, sup in zip(group["ids"], group["supervised"]):
    assert ids[0] == tok.bos_id and np.array_equal(ids[:first], group["ids"][0][:first])
    assert not sup[:first].any() and sup[first:].all()  # the response and its end marker
  assert tok.decode(group["ids"][1][group["supervised"][1]]).startswith("no, river.")
  # Padded to a fixed group of 4: the fourth sequence and three pairs are padding.
  row = preference.pad_group(group, 4, 32, shifted=True)
  assert row["tokens"].shape == (4, 32) and row["pairs"].shape == (6, 2)
  assert row["pair_mask"].tolist() == [1, 1, 1, 0, 0, 0] and not row["segment_ids"][3].any()
  n = len(group["ids"][0])
  assert np.array_equal(row["targets"][0, :n - 1], group["ids"][0][1:])
  plain = preference.pad_group(group, 4, 32, shifted=False)  # reward: the ids themselves
  assert np.array_equal(plain["tokens"][0, :n], group["ids"][0]) and "targets" not in plain


def test_long_and_bad_records_are_counted_or_raised(world, tmp_path):
  tok = tokenizer.Tokenizer(world["tok"])
  template = sft.TEMPLATES["jaxlm"]
  long_reply = {"prompt": "Reply to: apple", "chosen": "sure, " + "apple " * 60,
                "rejected": "no, river."}
  long_prompt = {"prompt": "Reply to: " + "apple " * 80, "chosen": "sure.", "rejected": "no."}
  same = {"prompt": "x", "chosen": "same", "rejected": "same"}
  path = write_jsonl(tmp_path / "p.jsonl", [long_reply, long_prompt, same, rule_records(1, 0)[0]])
  groups = preference.load_groups([path], tok, template, max_ids=56, truncation="truncate",
                                  on_error="skip")
  c = groups.counts
  assert (c["records"], c["used"], c["truncated"], c["dropped_truncated_away"],
          c["skipped_identical_pair"]) == (4, 2, 1, 1, 1)
  assert groups.first["identical_pair"] == f"{path}:3"
  assert max(len(ids) for ex in groups.examples for ids in ex["ids"]) <= 56
  with pytest.raises(sft.DataError, match=f"{path}:3: identical_pair"):
    preference.load_groups([path], tok, template, max_ids=56, truncation="truncate",
                           on_error="raise")
  dropped = preference.load_groups([path], tok, template, max_ids=56, truncation="drop",
                                   on_error="skip")
  assert dropped.counts["dropped_too_long"] == 2 and dropped.counts["used"] == 1


def test_config_errors_name_their_keys():
  errors = validate(small_config(**{"task": "dpo", "dpo.label_smoothing": 0.5}), 8)
  assert any(e.startswith("dpo.label_smoothing=0.5") for e in errors), errors
  assert any(e.startswith("init_from: task='dpo' needs") for e in errors), errors
  assert not any("dpo" in e for e in validate(
      small_config(**{"task": "dpo", "init_from": ROOT}), 8))
  errors = validate(small_config(**{"task": "reward", "reward.normalize_on": "eval",
                                    "data.eval": ""}), 8)
  assert any("reward.normalize_on='eval'" in e for e in errors), errors


# ---------------------------------------------------------------------------------------
# Reward model


def test_reward_loss_reads_the_last_token_and_averages_a_rankings_pairs():
  cfg = small_config().model
  cfg.unlock()
  cfg.vocab_size, cfg.dtype = 64, "float32"
  params = reward_model.init(cfg, jax.random.PRNGKey(0))
  params["head"]["w"] = params["head"]["w"] * 50  # rewards far enough apart to see
  rng = np.random.default_rng(0)
  lengths = [[9, 5, 12], [7, 11, 0]]  # the second record: a pair, and a padding sequence
  seqs = [[rng.integers(1, 64, n) for n in row] for row in lengths]
  batch = {k: [] for k in ("tokens", "segment_ids", "positions", "pairs", "margins",
                           "pair_mask")}
  for row, pairs in zip(seqs, ([(0, 1), (0, 2), (1, 2)], [(1, 0)])):
    group = {"ids": [s for s in row if len(s)], "supervised": [np.ones(len(s), bool) for s in row
                                                             if len(s)],
             "pairs": np.array(pairs, np.int32), "margins": np.full(len(pairs), 0.5, np.float32)}
    padded = preference.pad_group(group, 3, 16, shifted=False)
    for k in batch:
      batch[k].append(padded[k])
  batch = {k: jnp.asarray(np.stack(v)) for k, v in batch.items()}
  loss, sums = reward_task.reward_loss_fn(cfg, 0.1, None)(params, batch, None)
  # Each sequence alone, unpadded: its reward is the head at its own last token.
  alone = [[float(reward_model.rewards(params, jnp.asarray(s)[None], cfg,
                                 segment_ids=jnp.ones((1, len(s)), jnp.int32))[0])
            if len(s) else 0.0 for s in row] for row in seqs]
  want = []
  for row, pairs in zip(alone, ([(0, 1), (0, 2), (1, 2)], [(1, 0)])):
    for i, j in pairs:
      d = row[i] - row[j] - 0.5
      want.append(np.log1p(np.exp(-d)) + 0.1 * (row[i] + row[j]) ** 2)
  np.testing.assert_allclose(float(loss), np.sum(want), rtol=1e-4)
  assert float(sums["weight"]) == 4  # every pair of the ranking counts, padding pairs not
  assert float(sums["rows"]) == 5


def test_reward_init_from_a_language_model_keeps_its_backbone(world):
  cfg = json.load(open(os.path.join(world["sft"], "config.json")))
  import ml_collections
  m = ml_collections.ConfigDict(cfg["model"])
  sharder = __import__("jaxlm.loop", fromlist=["x"]).make_sharder(small_config())
  fresh = reward_model.init(m, jax.random.PRNGKey(1))
  loaded = runs.reward_init_loader(m, sharder)(world["sft"], fresh)
  lm = runs.load_params(world["sft"], model.init(m, jax.random.PRNGKey(2)))
  assert "lm_head" not in loaded["backbone"]
  for name in ("embed", "final_norm"):
    np.testing.assert_array_equal(np.asarray(loaded["backbone"][name]), np.asarray(lm[name]))
  np.testing.assert_array_equal(np.asarray(loaded["head"]["w"]), np.asarray(fresh["head"]["w"]))
  # The first rewards, on real token sequences through the loaded backbone, are near 0.
  tokens = jax.random.randint(jax.random.PRNGKey(3), (16, 24), 4, m.vocab_size)
  first = reward_model.rewards(loaded, tokens, m, segment_ids=jnp.ones((16, 24), jnp.int32))
  assert float(jnp.max(jnp.abs(first))) < 0.5 and float(jnp.std(first)) > 0, first


def test_reward_model_learns_the_rule_and_scores(world, tmp_path):
  workdir = str(tmp_path / "rm")
  tasks.run(small_config(**{"task": "reward", "init_from": world["sft"],
                            "data.train": world["train"], "data.eval": world["eval"],
                            "data.seq_len": 64, "steps": 30, "eval_every": 30,
                            "eval_steps": 4, "checkpoint_every": 30, "optimizer.lr": 1e-3,
                            "reward.normalize_on": "eval"}), workdir)
  last = [r for r in metrics(workdir) if "eval_accuracy" in r][-1]
  assert last["eval_accuracy"] >= 0.97, last
  assert {"eval_loss", "eval_margin", "eval_reward_mean", "eval_reward_std"} <= set(last)
  first = metrics(workdir)[0]
  assert first["data/train_pairs"] == 400 and first["data/eval_used"] == 64

  rm = runs.load_reward_model(workdir)
  held_out = [json.loads(line) for line in open(world["eval"])]
  prompts = [r["prompt"] for r in held_out]
  chosen = reward_model.score(rm, prompts, [r["chosen"] for r in held_out])
  rejected = reward_model.score(rm, prompts, [r["rejected"] for r in held_out])
  assert np.mean(chosen > rejected) >= 0.97
  both = np.concatenate([chosen, rejected])  # normalized on exactly these responses
  assert abs(both.mean()) < 0.05 and abs(both.std() - 1) < 0.05
  raw = reward_model.score(rm, prompts[:3], [r["chosen"] for r in held_out[:3]], normalize=False)
  n = rm.normalization
  np.testing.assert_allclose((raw - n["mean"]) / n["std"], chosen[:3], rtol=1e-3, atol=1e-3)
  # A conversation prompt is the same text as a plain one.
  as_messages = reward_model.score(rm, [[{"role": "user", "content": prompts[0]}]], [held_out[0]["chosen"]])
  np.testing.assert_allclose(as_messages, chosen[:1], rtol=1e-5)
  # A run written before a model key existed still loads; the key takes its default.
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    run = json.load(f)
  del run["model"]["layer_loop"]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(run, f)
  again = reward_model.score(runs.load_reward_model(workdir), prompts[:3], [r["chosen"] for r in held_out[:3]])
  np.testing.assert_allclose(again, chosen[:3], rtol=1e-5)

  out = tmp_path / "scored.jsonl"
  inputs = write_jsonl(tmp_path / "in.jsonl", held_out[:8] + [{"nothing": 1}] + [
      {"prompt": prompts[0], "completion": held_out[0]["chosen"]}])
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "score.py"), "--model",
                           workdir, "--input", inputs, "--output", str(out)],
                          capture_output=True, text=True, check=True)
  assert "chosen above rejected in 8 of 8 pairs" in result.stdout, result.stdout
  assert f"missing_field: 1 (first at {inputs}:9)" in result.stdout
  scored = [json.loads(line) for line in open(out)]
  assert len(scored) == 9 and abs(scored[-1]["reward"] - scored[0]["reward_chosen"]) < 1e-4


# ---------------------------------------------------------------------------------------
# DPO


def first_token_preference(params, m, tok, held_out):
  """The policy's mean probability of starting its reply as the chosen one does rather
  than as the rejected one does (softmax over those two first tokens)."""
  template = sft.TEMPLATES["jaxlm"]
  probs = []
  for r in held_out:
    firsts = []
    for key in ("chosen", "rejected"):
      turns = [("user", r["prompt"], False), ("assistant", r[key], True)]
      ids, sup = sft.tokenize(turns, True, tok, template, "completion")
      start = int(np.flatnonzero(sup)[0])
      firsts.append(int(ids[start]))
    assert firsts[0] != firsts[1]
    logits = model.forward(params, jnp.asarray(ids[:start])[None], m)[0, -1]
    probs.append(float(jax.nn.sigmoid(logits[firsts[0]] - logits[firsts[1]])))
  return float(np.mean(probs))


def test_dpo_raises_implicit_reward_accuracy_and_moves_the_policy(world, tmp_path):
  workdir = str(tmp_path / "dpo")
  tasks.run(small_config(**{"task": "dpo", "init_from": world["sft"],
                            "data.train": world["train"], "data.eval": world["eval"],
                            "data.seq_len": 64, "steps": 30, "eval_every": 30, "eval_steps": 4,
                            "checkpoint_every": 30, "optimizer.lr": 1e-3}), workdir)
  records = metrics(workdir)
  step1 = next(r for r in records if r["step"] == 1 and "loss" in r)
  # The policy starts as the reference: every implicit reward is 0 (to rounding: the two
  # forward passes may fuse differently), the loss log 2.
  assert abs(step1["loss"] - np.log(2)) < 1e-5 and abs(step1["rewards/margins"]) < 1e-5
  final = [r for r in records if "eval_rewards/accuracies" in r][-1]
  assert final["eval_rewards/accuracies"] >= 0.9, final
  assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < 0.5
  for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
    assert f"eval_{name}" in final
  import ml_collections
  m = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json")))["model"])
  like = model.init(m, jax.random.PRNGKey(0))
  tok = tokenizer.Tokenizer(world["tok"])
  held_out = [json.loads(line) for line in open(world["eval"])][:32]
  before = first_token_preference(runs.load_params(world["sft"], like), m, tok, held_out)
  after = first_token_preference(runs.load_params(workdir, like), m, tok, held_out)
  assert after >= 0.75 and after > before + 0.2, (before, after)


@pytest.mark.slow  # fast sibling: DPO with the copied reference
def test_reference_modes_agree_and_precomputing_resumes(world, tmp_path):
  common = {"task": "dpo", "init_from": world["sft"], "data.train": world["train"],
            "data.eval": world["eval"], "data.seq_len": 64, "steps": 2, "eval_every": 2,
            "eval_steps": 2, "checkpoint_every": 2, "optimizer.lr": 1e-3}
  firsts = {}
  for mode in ("copy", "precomputed"):
    tasks.run(small_config(**common, **{"dpo.reference": mode}), str(tmp_path / mode))
    firsts[mode] = [r for r in metrics(str(tmp_path / mode)) if "loss" in r or "eval_loss" in r]
  for a, b in zip(firsts["copy"], firsts["precomputed"]):
    for k in ("loss", "grad_norm", "eval_loss", "eval_rewards/margins"):
      if k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  # LoRA: the reference is the base with the adapters off, so they start equal too.
  tasks.run(small_config(**common, **{"lora.rank": 4}), str(tmp_path / "lora"))
  lora_first = next(r for r in metrics(str(tmp_path / "lora")) if "loss" in r)
  assert abs(lora_first["loss"] - np.log(2)) < 1e-5
  assert os.path.isfile(tmp_path / "lora" / "lora_base.json")
  # An interrupted precomputation resumes from its parts: a finished part is reused as
  # written (here, marked), the rest computed again.
  folder = tmp_path / "precomputed" / "reference_logps"
  final = next(f for f in os.listdir(folder) if f.startswith("train-"))
  values = np.load(folder / final)
  os.remove(folder / final)
  parts = folder / (final[:-4] + ".parts")
  os.makedirs(parts)
  marked = values[:16] - 1.0
  np.save(parts / f"{0:09d}-{16:09d}.npy", marked)  # records 0-15, finished before
  np.save(parts / f"{16:09d}-{20:09d}.npy", values[16:20] + 5.0)  # another chunking's: unused
  config = small_config(**common, **{"dpo.reference": "precomputed"})
  from jaxlm import loop
  sharder = loop.make_sharder(config)
  data = task_common.PreferenceData(config, str(tmp_path / "precomputed"), shifted=True)
  source = dpo_task.reference_source(config, str(tmp_path / "precomputed"))
  dpo_task.precompute_reference(config, str(tmp_path / "precomputed"), sharder, data, source,
                                chunk_batches=2)
  again = np.load(folder / final)
  np.testing.assert_array_equal(again[:16], marked)
  np.testing.assert_allclose(again[16:], values[16:], rtol=1e-5, atol=1e-5)
  assert not os.path.exists(parts)
  assert np.array_equal(data.train[20]["reference_logps"], again[20][:2])


# ---------------------------------------------------------------------------------------
# The real HH-RLHF sample


def test_hh_rlhf_sample_parses_and_trains(shared_data, tmp_path):
  path = os.path.join(shared_data, "hh_rlhf_harmless_test.jsonl.gz")
  texts = (r["chosen"] for _, r in sft.read_records(path))
  tok = str(tmp_path / "tok.model")
  tokenizer.train(texts, tok, 1024)
  common = {"data.train": path, "data.eval": "", "data.tokenizer": tok, "data.seq_len": 128,
            "data.batch_size": 8, "data.on_error": "skip", "steps": 3, "eval_every": 0,
            "checkpoint_every": 3}
  tasks.run(small_config(**common, task="reward"), str(tmp_path / "rm"))
  tasks.run(small_config(**common, **{"task": "dpo", "dpo.reference": "none"}),
            str(tmp_path / "dpo"))
  for run in ("rm", "dpo"):
    records = metrics(str(tmp_path / run))
    report = records[0]
    skipped = sum(v for k, v in report.items() if k.startswith("data/train_skipped_"))
    dropped = sum(v for k, v in report.items() if k.startswith("data/train_dropped_"))
    assert report["data/train_records"] == 2312
    assert report["data/train_used"] + skipped + dropped == 2312 and skipped <= 10, report
    assert report["data/train_used"] > 1000  # the rest: prompts too long for 128 tokens
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
