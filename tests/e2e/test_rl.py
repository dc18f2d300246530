"""Policy-gradient pieces against NumPy references: GAE, KL estimators, advantages,
clipped losses and loss aggregation; reward sources."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxlm import losses, reward_fns, runs
from jaxlm.errors import ConfigError


def test_gae_equals_a_numpy_loop():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  mask = np.zeros((3, 7))
  mask[0, 2:7], mask[1, 0:3], mask[2, 3:5] = 1, 1, 1
  gamma, lam = 0.97, 0.9
  adv, ret = losses.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
  want = np.zeros_like(r)
  for b in range(3):
    idx = np.flatnonzero(mask[b])
    last = 0.0
    for j in reversed(range(len(idx))):
      t = idx[j]
      next_v = v[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
      delta = r[b, t] + gamma * next_v - v[b, t]
      last = delta + gamma * lam * last
      want[b, t] = last
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), (want + v) * mask, rtol=1e-5, atol=1e-6)


def test_kl_estimators_equal_their_formulas():
  rng = np.random.default_rng(1)
  logp, ref = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
  np.testing.assert_allclose(np.asarray(losses.kl_k1(jnp.asarray(logp), jnp.asarray(ref))), logp - ref,
                             rtol=1e-6)
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  np.testing.assert_allclose(np.asarray(losses.kl_k3(jnp.asarray(logp), jnp.asarray(ref))), k3,
                             rtol=1e-5)
  assert (k3 >= 0).all()


def test_group_advantages_and_clipped_losses():
  r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
  a = np.asarray(losses.group_advantages(jnp.asarray(r), "group"))
  np.testing.assert_allclose(a[0], (r[0] - 0.5) / (0.5 + 1e-4), rtol=1e-5)
  assert np.allclose(a[1], 0)
  np.testing.assert_allclose(np.asarray(losses.group_advantages(jnp.asarray(r), "none")),
                             r - r.mean(1, keepdims=True))
  logp, old = np.log(np.array([[0.5, 0.9]])), np.log(np.array([[0.25, 0.9]]))
  adv = np.array([[1.0, -1.0]])
  loss, clipfrac, _ = losses.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(old),
                                             jnp.asarray(adv), 0.2, 0.28)
  # ratio 2 with A=1 is clipped at 1.28; ratio 1 is not.
  np.testing.assert_allclose(np.asarray(loss), [[-1.28, 1.0]], rtol=1e-5)
  assert np.asarray(clipfrac).tolist() == [[1.0, 0.0]]
  v, old_v, ret = jnp.array([2.0]), jnp.array([1.0]), jnp.array([0.0])
  vl, _ = losses.clipped_value_loss(v, old_v, ret, 0.2)
  np.testing.assert_allclose(np.asarray(vl), [0.5 * max(4.0, 1.2 ** 2)])


def test_truncated_importance_weights():
  logp, rollout = np.log(np.array([[0.5, 0.9, 0.1]])), np.log(np.array([[0.2, 0.9, 0.2]]))
  w, cut = losses.truncated_is_weights(jnp.asarray(logp), jnp.asarray(rollout), 2.0)
  np.testing.assert_allclose(np.asarray(w), [[2.0, 1.0, 0.5]], rtol=1e-6)  # 2.5 cut at 2
  assert np.asarray(cut).tolist() == [[1.0, 0.0, 0.0]]


def test_loss_aggregations():
  x = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  total, weight = losses.aggregate(x, mask, "sequence", 4)
  assert float(total / weight) == pytest.approx((2.0 + 4.0) / 2)
  total, weight = losses.aggregate(x, mask, "token", 4)
  assert float(total / weight) == pytest.approx(10.0 / 4)
  total, weight = losses.aggregate(x, mask, "constant", 4)
  assert float(total / weight) == pytest.approx(10.0 / 8)


def test_reward_sources():
  assert reward_fns.final_answer("so 3 + 4 = 7.\n#### 1,234") == 1234
  assert reward_fns.final_answer("it is 12, then 15.5 apples") == 15.5
  assert reward_fns.math_answer(["q"] * 3, ["#### 72", "The answer is 72.", "about 70"],
                             answer=["...\n#### 72"] * 3) == [1.0, 1.0, 0.0]
  assert reward_fns.format_reward(["q", "q"], ["x\n#### 5", "5"]) == [1.0, 0.0]
  assert reward_fns.overlap(["q"], ["the cat sat"], output=["a cat sat down"])[0] == pytest.approx(
      2 * 2 / 7)
  combined = reward_fns.Rewards("math_answer=2,format")
  total, means = combined(["q", "q"], ["#### 72", "72"], {"answer": ["#### 72", "#### 72"]})
  assert total.tolist() == [3.0, 2.0] and means == {"math_answer": 1.0, "format": 0.5}
  with pytest.raises(ConfigError, match="neither a built-in"):
    reward_fns.Rewards("nothing")
  with pytest.raises(ConfigError, match="can't load"):
    reward_fns.Rewards("no_such_module:f")


# ---------------------------------------------------------------------------------------
# GRPO and PPO on a verifiable rule


def starts_with_sure(prompts, completions, **fields):
  """A user reward function (reward.fn="test_rl:starts_with_sure")."""
  assert len(prompts) == len(completions) and "chosen" in fields
  return [1.0 if c.strip().startswith("sure") else 0.0 for c in completions]


def rl_config(world, **overrides):
  from conftest import small_config
  return small_config(**{"init_from": world["sft"], "data.train": world["train"], "data.eval": "",
                         "data.seq_len": 64, "data.batch_size": 8, "steps": 20, "eval_every": 0,
                         "checkpoint_every": 20, "optimizer.lr": 3e-3,
                         "optimizer.warmup_steps": 0, "reward.fn": "test_rl:starts_with_sure",
                         "rl.max_new_tokens": 8, "rl.temperature": 0.7, **overrides})


def rewards_of(workdir):
  import json
  import os
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "reward" in r]


@pytest.mark.parametrize("task, extra", [
    ("grpo", {}),
    ("ppo", {"rl.num_generations": 1, "data.batch_size": 16, "rl.epochs": 2,
             "rl.minibatches": 2, "rl.kl_estimator": "k1"})])
def test_rl_raises_a_verifiable_reward(world, tmp_path, task, extra):
  from jaxlm import tasks
  workdir = str(tmp_path / task)
  tasks.run(rl_config(world, task=task, **extra), workdir)
  records = rewards_of(workdir)
  assert len(records) == 20
  first = np.mean([r["reward"] for r in records[:3]])
  last = np.mean([r["reward"] for r in records[-3:]])
  assert last >= 0.8 and last > first + 0.4, [r["reward"] for r in records]
  kls = [r["objective/kl"] for r in records]
  # GRPO's is per token (k3); PPO's k1 is per completion of up to 8 tokens.
  bound = 10 if task == "grpo" else 25
  assert all(np.isfinite(k) and abs(k) < bound for k in kls), kls
  for name in ("policy/clipfrac_avg", "policy/approxkl_avg", "objective/entropy",
               "val/num_eos_tokens", "time/rollout_s", "time/update_s", "objective/scores"):
    assert name in records[-1], name
  if task == "ppo":
    assert "loss/value_avg" in records[-1] and "loss/policy_avg" in records[-1]
  _, params, _, _ = runs.load_jaxlm(workdir)
  assert "embed" in params and "critic" not in params


def test_rollout_rows_reproduce_the_engine_logprobs(world, tmp_path):
  """The rows the trainer sees (left-padded prompt, completion, the P-1 offset) give back
  the engine's log-probs under a training forward pass; `rl.rollout_rows` (8 rows
  decoding the 32 completions, refilled) changes how they are decoded, not what."""
  import jax
  from jaxlm import loop, model
  from jaxlm.tasks import common, rl as rl_task
  config = rl_config(world, task="grpo", **{"model.dtype": "float32"})
  common.adopt_init_from_architecture(config)
  sharder = loop.make_sharder(config)
  rollouts = rl_task.Rollouts(config, str(tmp_path), sharder)
  abstract = jax.eval_shape(lambda k: model.init(config.model, k), jax.random.PRNGKey(0))
  params = runs.load_params(world["sft"],
                                  sharder.placed(model.param_axes(config.model), abstract))
  rows, scores, _ = rollouts.sample(params, None, {"index": np.arange(8, dtype=np.int32)}, 0)
  assert len(scores) == 32 and rows["loss_mask"].sum() > 0
  logits = model.forward(params, jnp.asarray(rows["tokens"]), config.model,
                         segment_ids=jnp.asarray(rows["segment_ids"]),
                         positions=jnp.asarray(rows["positions"]))
  logp, _ = rl_task.token_logps(logits, jnp.asarray(rows["targets"]), config.rl.temperature)
  mask = rows["loss_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logp)[mask], rows["old_logps"][mask], atol=5e-5)
  config.rl.rollout_rows = 8
  refilled, again, _ = rl_task.Rollouts(config, str(tmp_path), sharder).sample(
      params, None, {"index": np.arange(8, dtype=np.int32)}, 0)
  np.testing.assert_array_equal(refilled["tokens"], rows["tokens"])
  np.testing.assert_allclose(refilled["old_logps"], rows["old_logps"], atol=1e-6)
  np.testing.assert_array_equal(again, scores)


def test_lora_rl_holds_one_frozen_base(world, tmp_path):
  """With LoRA the base serves as the policy's weights and, adapters off, as the
  reference: one frozen copy, not two; without LoRA and KL no reference at all."""
  from jaxlm import loop
  from jaxlm.tasks import rl as rl_task
  for task, extra, keys in (("grpo", {"lora.rank": 4}, {"policy"}),
                            ("ppo", {"lora.rank": 4, "rl.num_generations": 1}, {"policy"}),
                            ("grpo", {"rl.kl_coef": 0.0}, set()),
                            ("grpo", {}, {"reference"})):
    config = rl_config(world, task=task, **extra)
    built = rl_task.build(config, str(tmp_path / f"{task}{len(extra)}{len(keys)}"),
                          loop.make_sharder(config))
    assert set(built.frozen_source) == keys, (task, extra)


# ---------------------------------------------------------------------------------------
# Data from the model itself


def _selfdata(*args):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.path.join(root, "tests", "e2e") + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "tools/selfdata.py", *args], capture_output=True,
                        text=True, check=True, cwd=root, env=env).stdout


def test_best_of_n_pairs_and_constitution_write_trainable_records(world, tmp_path):
  import json
  from jaxlm.data import preference, sft
  common = ["--model", world["sft"], "--prompts", world["train"], "--limit", "6",
            "--max_new_tokens", "8", "--batch_size", "8", "--temperature", "1.0"]
  best = tmp_path / "best.jsonl"
  out = _selfdata("--mode", "best_of_n", "--n", "4", "--reward_fn", "test_rl:starts_with_sure",
                  "--out", str(best), *common)
  records = [json.loads(line) for line in open(best)]
  assert "written 6" in out and len(records) == 6, out
  picked = [r["reward"] for r in records]
  assert all(sft.to_turns(r, "auto") != "wrong_type" for r in records)
  pairs = tmp_path / "pairs.jsonl"
  out = _selfdata("--mode", "pairs", "--n", "4", "--reward_fn", "test_rl:starts_with_sure",
                  "--out", str(pairs), *common)
  written = [json.loads(line) for line in open(pairs)]
  assert all(r["score_chosen"] > r["score_rejected"] for r in written)
  assert all(not isinstance(preference.to_preference(r), str) for r in written)
  assert len(written) + sum(int(x.split()[-1]) for x in out.split(", ")
                            if x.startswith("skipped_")) == 6, out
  assert max(picked) >= 1.0 or not written  # best-of-4 finds the rule when pairs exist
  judged = tmp_path / "judged.jsonl"
  _selfdata("--mode", "pairs", "--n", "2", "--judge", world["sft"], "--out", str(judged), *common)
  assert all(0.5 <= json.loads(line)["judge_probability"] <= 1 for line in open(judged))
  (tmp_path / "principles.txt").write_text("Be polite.\n\nBe brief.\n")
  revised, revised_pairs = tmp_path / "revised.jsonl", tmp_path / "revised_pairs.jsonl"
  out = _selfdata("--mode", "constitution", "--principles", str(tmp_path / "principles.txt"),
                  "--out", str(revised), "--pairs_out", str(revised_pairs), *common)
  rows = [json.loads(line) for line in open(revised)]
  assert rows and all(r["principle"] in ("Be polite.", "Be brief.") for r in rows), out
  assert all({"original", "critique"} <= set(r) for r in rows)


@pytest.mark.slow  # fast sibling: GRPO's exact resume (max_staleness)
def test_ppo_resumes_exactly_with_its_adaptive_kl(world, tmp_path):
  """The adaptive KL coefficient is checkpointed with the data position: a run stopped
  and resumed matches one that ran straight through."""
  from jaxlm import tasks
  common = {"task": "ppo", "rl.num_generations": 1, "data.batch_size": 8, "rl.kl_target": 0.01,
            "optimizer.schedule": "constant", "checkpoint_every": 2}
  tasks.run(rl_config(world, **common, steps=4), str(tmp_path / "straight"))
  tasks.run(rl_config(world, **common, steps=2), str(tmp_path / "resumed"))
  tasks.run(rl_config(world, **common, steps=4), str(tmp_path / "resumed"))
  straight, resumed = rewards_of(str(tmp_path / "straight")), rewards_of(str(tmp_path / "resumed"))
  coef = lambda rs: [r["objective/kl_coef"] for r in rs if r["step"] > 2]  # noqa: E731
  assert coef(straight) == coef(resumed) and coef(straight)[-1] != 0.04
  assert [r["reward"] for r in straight if r["step"] > 2] == [
      r["reward"] for r in resumed if r["step"] > 2]


def test_max_staleness_rolls_out_a_step_ahead_and_resumes_exactly(world, tmp_path):
  """rl.max_staleness=1: each rollout after the first is made during the update before it,
  from the weights before that update (lag 1, importance weights away from 1); the step
  after a checkpoint rolls out afresh, so a stopped and resumed run matches one that ran
  straight through; the first step equals a synchronous run's."""
  from jaxlm import tasks
  common = {"task": "grpo", "checkpoint_every": 3, "optimizer.schedule": "constant"}
  tasks.run(rl_config(world, **common, steps=5, **{"rl.max_staleness": 1}),
            str(tmp_path / "straight"))
  tasks.run(rl_config(world, **common, steps=3, **{"rl.max_staleness": 1}),
            str(tmp_path / "resumed"))
  tasks.run(rl_config(world, **common, steps=5, **{"rl.max_staleness": 1}),
            str(tmp_path / "resumed"))
  tasks.run(rl_config(world, **common, steps=1), str(tmp_path / "sync"))
  straight, resumed = rewards_of(str(tmp_path / "straight")), rewards_of(str(tmp_path / "resumed"))
  sync = rewards_of(str(tmp_path / "sync"))
  assert [r["rollout/lag"] for r in straight] == [0, 1, 1, 0, 1]
  for r in straight:
    assert (r["rollout/is_weight"] == 1.0) == (r["rollout/lag"] == 0), r
    assert 0 <= r["rollout/is_clipfrac"] < 1 and r["time/rollout_wait_s"] >= 0
  key = lambda rs: [(r["step"], r["reward"], r["loss"], r["rollout/is_weight"]) for r in rs]  # noqa: E731
  assert key(resumed) == key(straight)
  assert (sync[0]["reward"], sync[0]["loss"]) == (straight[0]["reward"], straight[0]["loss"])
  assert "rollout/lag" not in sync[0]


def test_max_staleness_with_lora(world, tmp_path):
  """The overlapped rollouts decode from a snapshot of LoRA's adapters, and the current
  policy's forward (the importance weights) runs with them."""
  from jaxlm import tasks
  tasks.run(rl_config(world, task="grpo", steps=3, **{"rl.max_staleness": 1, "lora.rank": 4}),
            str(tmp_path / "lora"))
  records = rewards_of(str(tmp_path / "lora"))
  assert [r["rollout/lag"] for r in records] == [0, 1, 1]
  assert records[0]["rollout/is_weight"] == 1.0 and records[2]["rollout/is_weight"] != 1.0


def test_gsm8k_prompts_parse_and_their_answers_score(shared_data):
  import os
  from jaxlm.data import prompts
  loaded = prompts.load_prompts([os.path.join(shared_data, "gsm8k_test.jsonl")], on_error="raise")
  assert loaded.counts["records"] == loaded.counts["used"] == 1319
  first = loaded.examples[:50]
  answers = [p.fields["answer"] for p in first]
  # The reference solutions themselves earn the math reward and the format reward.
  assert reward_fns.math_answer([p.text for p in first], answers, answer=answers) == [1.0] * 50
  assert reward_fns.format_reward([p.text for p in first], answers) == [1.0] * 50
