"""The whole pipeline in one command (task=pipeline), evaluation (task=eval, tools/eval.py),
the report card and tools/plot.py, at a size CI runs in a minute or two."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import evaluate, pipeline, reward_fns
from jaxlm.config import config_beside
from jaxlm.errors import ConfigError
from jaxlm.data import prompts as prompts_lib, world

from conftest import SHARED_DATA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_DIRS = ("pretrain", "sft", "reward", "dpo", "rl")

# A config file that loads a shipped pipeline config and shrinks every stage.
SMALL = '''
import importlib.util, os

def get_config(arg=None):
  path = os.path.join({configs!r}, {name!r} + ".py")
  spec = importlib.util.spec_from_file_location({name!r}, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  stages = [c[s] for s in ("pretrain", "sft", "reward", "dpo", "rl")] if c.task == "pipeline" else [c]
  if c.task == "pipeline":
    c.tokenizer.vocab_size = 384
    c.tokenizer.sample_chars = 200_000
  for s in stages:
    s.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64)
    s.steps = 6
    s.checkpoint_every = 3
    s.keep_checkpoints = 3
    s.async_checkpointing = False
    s.log_every = 1
    s.data.batch_size = 8
    s.data.prefetch = 0
    if s.task in ("pretrain", "sft"):
      s.data.seq_len = 64
    s.eval.update(max_tasks=8, text_batches=1, batch_size=8, max_new_tokens=8, seq_len=64)
  if c.task == "pipeline":
    c.rl.steps = 2
    c.rl.rl.num_generations = 2
    c.rl.rl.max_new_tokens = 8
  return c
'''


def small_config_file(tmp_path, name="pipeline_tiny") -> str:
  path = tmp_path / f"small_{name}.py"
  path.write_text(SMALL.format(configs=os.path.join(REPO, "configs"), name=name))
  return str(path)


def launch(*args, check=True) -> subprocess.CompletedProcess:
  """The launcher in a process of its own, on one CPU device: sharding is tested
  elsewhere, and one device compiles each stage's programs in a third of the time."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "jaxlm.launch", *args], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=900)
  if check and out.returncode:
    raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  return out


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------
# The task world and the answer checks


def test_world_data_splits_formats_and_noise(tmp_path):
  def rows(name, split):
    with open(world.write(name, split, str(tmp_path / f"{name}.{split}.jsonl"))) as f:
      return [json.loads(line) for line in f]

  sft_train = rows("world_sft", "train")
  held_out = rows("world_prompts", "eval")
  train_questions = {r["messages"][0]["content"] for r in sft_train}
  train_questions |= {r["prompt"] for r in rows("world_pairs", "train")}
  train_questions |= {r["prompt"] for r in rows("world_prompts", "train")}
  # No held-out problem is trained on, in any phrasing, and every kind is held out.
  assert not train_questions & {r["prompt"] for r in held_out}
  def sums(questions):  # (a, b) of every addition asked, in any of its phrasings
    return {tuple(re.findall(r"\d+", q)) for q in questions
            if q.startswith("Add ") or " + " in q or " plus " in q}
  assert sums(train_questions) and sums(r["prompt"] for r in held_out)
  assert not sums(train_questions) & sums(r["prompt"] for r in held_out)
  assert {r["kind"] for r in held_out} == set(world.KINDS)
  # The demonstrations are as imperfect as documented: counting answers never have the
  # answer line, the others now and then; a tenth are wrong.
  for counting, share in ((True, world.SLOPPY["count"]), (False, world.SLOPPY["add"])):
    replies = [r["messages"][1]["content"] for r in sft_train
               if ("[" in r["messages"][0]["content"]) == counting]  # only counting has lists
    sloppy = np.mean([evaluate.strict_answer(t) is None for t in replies])
    assert abs(sloppy - share) < 0.03, counting
  # Preference pairs: chosen is right and well formed; rejected is sloppy or wrong.
  for r in rows("world_pairs", "train")[:300]:
    chosen, rejected = evaluate.strict_answer(r["chosen"]), evaluate.strict_answer(r["rejected"])
    assert chosen is not None and chosen == reward_fns.final_answer(r["chosen"].split("\n")[0])
    assert rejected is None or rejected != chosen
  # Held-out tasks' reference answers are right (recomputed from the question).
  for r in held_out:
    q, a = r["prompt"], float(r["answer"])
    if r["kind"] == "count":
      assert a == q[q.index("[") + 1:q.index("]")].count(",") + 1
    elif r["kind"] == "next":
      assert a == float(q.split()[-1].rstrip("?.")) + 1
  # Deterministic: the same bytes again.
  a = open(world.write("world_sft", "train", str(tmp_path / "a.jsonl"))).read()
  b = open(world.write("world_sft", "train", str(tmp_path / "b.jsonl"))).read()
  assert a == b


def test_strict_and_flexible_answers():
  assert evaluate.strict_answer("3 + 4 = 7\n#### 7") == 7
  assert evaluate.strict_answer("#### 1,234") == 1234
  assert evaluate.strict_answer("3 + 4 = 7") is None
  records = [prompts_lib.Prompt([("user", q)], q, {"answer": a, "kind": k})
             for q, a, k in (("a", "7", "add"), ("b", "#### 3", "add"), ("c", "5", "max"),
                             ("d", "2", "max"))]
  greedy = ["3 + 4 = 7\n#### 7", "x = 3", "#### 5", "#### 9"]
  sampled = ["#### 7", "#### 3", "5", "#### 1"]
  m = evaluate.task_metrics(records, greedy, sampled)
  assert m["task_accuracy"] == 0.5                 # rows a, c
  assert m["task_accuracy_flexible"] == 0.75       # b's last number counts too
  assert m["well_formed"] == 0.75
  assert m["task_accuracy_sampled"] == 0.5         # a, b
  assert m["task_accuracy/add"] == 0.5 and m["task_accuracy/max"] == 0.5


# ---------------------------------------------------------------------------------------
# The pipeline, end to end


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pipeline")
  config = small_config_file(tmp)
  workdir = str(tmp / "run")
  out = launch("--config", config, "--workdir", workdir)
  return config, workdir, out.stdout + out.stderr


def test_pipeline_runs_every_stage_and_hands_checkpoints_on(pipeline_run):
  _, workdir, output = pipeline_run
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.model"))
  for name in STAGE_DIRS:
    summary = read_json(os.path.join(workdir, name, "summary.json"))
    assert summary["finished"], name
    assert read_json(os.path.join(workdir, name, "eval", "eval.json"))["step"] == summary["step"]
  starts = {name: read_json(os.path.join(workdir, name, "config.json"))["init_from"]
            for name in STAGE_DIRS}
  assert starts == {"pretrain": "", "sft": os.path.join(workdir, "pretrain"),
                    "reward": os.path.join(workdir, "sft"), "dpo": os.path.join(workdir, "sft"),
                    "rl": os.path.join(workdir, "dpo")}
  tokenizer = os.path.join(workdir, "tokenizer", "tokenizer.model")
  for name in STAGE_DIRS:  # one tokenizer through every stage
    assert open(os.path.join(workdir, name, "tokenizer.model"), "rb").read() == \
        open(tokenizer, "rb").read()
  assert "initialized params from " + os.path.join(workdir, "pretrain") in output


def test_report_card(pipeline_run):
  _, workdir, _ = pipeline_run
  report = read_json(os.path.join(workdir, "report.json"))
  stages = report["stages"]
  assert list(stages) == ["base", "sft", "reward", "dpo", "rl"]
  for name in ("base", "sft", "dpo", "rl"):
    assert 0.0 <= stages[name]["task_accuracy"] <= 1.0
    assert stages[name]["perplexity"] > 1.0
    assert stages[name]["steps"] > 0 and stages[name]["tokens"] > 0
    assert stages[name]["train_seconds"] > 0
  assert 0.0 <= stages["reward"]["pairwise_accuracy"] <= 1.0
  for name in ("dpo", "rl"):  # judged by the reward model, measured against SFT
    assert 0.0 <= stages[name]["win_rate"] <= 1.0
    assert np.isfinite(stages[name]["kl_to_reference"])
  # DPO's KL to SFT recomputed from its samples: both models' log-probs of them.
  assert report["environment"]["jax"] and report["environment"]["git"]
  assert report["cost"]["cpu_vm_cost"] > 0 and report["cost"]["train_flops"] > 0
  md = open(os.path.join(workdir, "report.md")).read()
  assert "| metric | base | sft | reward | dpo | rl |" in md
  task_row = next(line for line in md.splitlines() if line.startswith("| task accuracy, greedy (strict"))
  assert task_row.count("|") == 7
  assert "## Sample completions" in md and "### sft" in md and "## Estimated cost" in md
  for png in ("loss.png", "rl.png", "accuracy.png"):
    path = os.path.join(workdir, "plots", png)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"(plots/{png})" in md


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(pipeline_run):
  config, workdir, _ = pipeline_run
  attempts = {n: read_json(os.path.join(workdir, n, "stage.json"))["attempts"] for n in STAGE_DIRS}
  out = launch("--config", config, "--workdir", workdir).stdout
  for name in STAGE_DIRS:
    assert f"[{name}] finished" in out and f"[{name}] evaluated" in out
  assert attempts == {n: read_json(os.path.join(workdir, n, "stage.json"))["attempts"]
                      for n in STAGE_DIRS}
  # Interrupt DPO after its checkpoint at step 3: its last checkpoint and summary gone.
  dpo = os.path.join(workdir, "dpo")
  before = [json.loads(line) for line in open(os.path.join(dpo, "metrics.jsonl"))]
  shutil.rmtree(os.path.join(dpo, "checkpoints", "6"))
  os.remove(os.path.join(dpo, "summary.json"))
  out = launch("--config", config, "--workdir", workdir).stdout
  assert "[sft] finished" in out and f"resumed from {dpo}/checkpoints/3" in out
  assert "[dpo] evaluating step 6" in out
  after = [json.loads(line) for line in open(os.path.join(dpo, "metrics.jsonl"))]
  losses = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
  assert losses(after) == pytest.approx(losses(before), rel=1e-5)  # resumed exactly
  assert read_json(os.path.join(dpo, "stage.json"))["attempts"] == attempts["dpo"] + 1
  # A finished stage asked to train otherwise is not silently kept: one line, its name.
  out = launch("--config", config, "--workdir", workdir, "--config.dpo.dpo.beta=0.3",
               check=False)
  assert out.returncode == 2 and out.stderr.startswith("config error: dpo: ")
  assert "its config (dpo.*) changed" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_a_stage_alone_and_a_subset(pipeline_run, tmp_path):
  config, workdir, _ = pipeline_run
  # One stage's own config, its @paths in the pipeline's workdir.
  out = launch("--config", f"{config}:stage=sft,from={workdir}", "--workdir",
               str(tmp_path / "sft2"), "--config.steps=2").stdout
  assert read_json(str(tmp_path / "sft2" / "config.json"))["init_from"] == \
      os.path.join(workdir, "pretrain")
  assert "step 2/2" in out
  # A subset whose inputs do not exist yet is a one-line error naming the key.
  out = launch("--config", config, "--workdir", str(tmp_path / "empty"),
               "--config.stages=sft", check=False)
  assert out.returncode == 2
  assert out.stderr.startswith("config error: sft.")
  assert "; run the" in out.stderr and "stage first" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_stage_runs_lm_eval_tasks_into_the_report(pipeline_run, tmp_path, monkeypatch):
  """`<stage>.eval.lm_eval_tasks`: lm-evaluation-harness beside the stage's own metrics,
  on a task defined here (nothing downloaded), listed by the report card. (Slow tier: CI
  runs the same evaluation through tools/eval.py in test_harness.py, and the report's
  rows in tests/unit/test_plots.py.)"""
  pytest.importorskip("lm_eval")
  _, workdir, _ = pipeline_run
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  rows = [{"q": "What is 2 + 3?", "choices": [" 2 + 3 = 5", " 2 + 3 = 9"], "a": 0},
          {"q": "What number comes after 7?", "choices": [" 7 + 1 = 3", " 7 + 1 = 8"], "a": 1}]
  (tmp_path / "world_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "world_mc.yaml").write_text(
      f"task: world_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {tmp_path / 'world_mc.jsonl'}\ntest_split: test\n"
      "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
      "doc_to_target: '{{a}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the launcher's process inherits them
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  out = launch("--config", pipeline_run[0], "--workdir", run, "--config.stages=sft",
               "--config.sft.eval.lm_eval_tasks=world_mc",
               f"--config.sft.eval.lm_eval_include={tmp_path}")
  assert "[sft] evaluating" in out.stderr + out.stdout  # the eval settings changed
  report = read_json(os.path.join(run, "report.json"))["stages"]
  assert 0 <= report["sft"]["lm_eval/world_mc/acc,none"] <= 1
  assert "lm_eval/world_mc/acc,none" not in report["base"]
  assert "| lm_eval/world_mc/acc,none |" in open(os.path.join(run, "report.md")).read()
  assert read_json(os.path.join(run, "sft", "eval", "lm_eval.json"))["results"]["world_mc"]


def test_eval_task_and_tool(pipeline_run, tmp_path, shared_data):
  _, workdir, _ = pipeline_run
  # config.task = "eval" through the launcher, on the SFT model.
  launch("--config", os.path.join(REPO, "configs", "eval.py"), "--workdir", str(tmp_path / "e"),
         f"--config.eval.model={workdir}/sft", "--config.eval.max_tasks=8",
         "--config.eval.max_new_tokens=8", "--config.eval.text_batches=1",
         "--config.eval.seq_len=64")
  result = read_json(str(tmp_path / "e" / "eval.json"))
  assert {"task_accuracy", "task_accuracy_sampled", "perplexity"} <= set(result["metrics"])
  with open(tmp_path / "e" / "samples.jsonl") as f:
    assert len(f.readlines()) == 8
  # tools/eval.py: GSM8K-format accuracy on the real test file; a reward model's pairs.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, key in ((["--model", f"{workdir}/sft", "--tasks",
                      os.path.join(SHARED_DATA, "gsm8k_test.jsonl")], "task_accuracy"),
                    (["--model", f"{workdir}/reward", "--pairs",
                      os.path.join(SHARED_DATA, "hh_rlhf_harmless_test.jsonl.gz")],
                     "pairwise_accuracy")):
    out_dir = str(tmp_path / key)
    subprocess.run([sys.executable, "tools/eval.py", *args, "--max_tasks=4",
                    "--max_new_tokens=8", "--temperature=0", "--out", out_dir], check=True,
                   cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    metrics = read_json(os.path.join(out_dir, "eval.json"))["metrics"]
    assert 0.0 <= metrics[key] <= 1.0


def test_sequence_log_probs_behind_kl_sum_each_answer_token():
  """kl_to_reference is the mean over answers of the difference of two of these sums:
  log p of every token from the answer's start on, teacher forced, padding ignored."""
  import jax
  from jaxlm import model
  from conftest import small_model
  cfg = small_model(vocab_size=128, dtype="float32")
  params = model.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  rows = [rng.integers(1, 128, n).astype(np.int32) for n in (5, 9, 17)]
  starts = [3, 2, 10]
  got = evaluate._sequence_logps(cfg, params, rows, starts, batch=2)  # two batches, padded
  for row, start, value in zip(rows, starts, got):
    logp = jax.nn.log_softmax(model.forward(params, row[None], cfg)[0], axis=-1)
    want = sum(float(logp[t - 1, row[t]]) for t in range(start, len(row)))
    assert value == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_plot_tool_overlays_runs(pipeline_run, tmp_path):
  _, workdir, _ = pipeline_run
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("checkpoints"))
  out = subprocess.run([sys.executable, "tools/plot.py", workdir, other, "--labels", "a,b",
                        "--out", str(tmp_path / "plots")], cwd=REPO, capture_output=True,
                       text=True, check=True, timeout=300).stdout
  for png in ("loss.png", "rl.png", "accuracy.png"):
    assert str(tmp_path / "plots" / png) in out
  same = subprocess.run([sys.executable, "tools/plot.py", workdir, other, "--labels", "a,a"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert same.returncode != 0 and "share a name" in same.stderr


def load_config_module(name):
  return config_beside(os.path.join(REPO, "configs", name + ".py"), name)


def test_pipeline_config_errors_name_the_stage_key():
  module = load_config_module("pipeline_tiny")
  c = module.get_config()
  assert pipeline.config_errors(c, 8) == []
  assert pipeline.config_errors(module.get_config("rl=ppo"), 8) == []
  gpu = load_config_module("pipeline_gpu").get_config()  # the speedrun: ~150M parameters
  assert pipeline.config_errors(gpu, 1) == [] and gpu.rl.model.d_model == 1024
  assert load_config_module("pipeline_gpu").get_config("stage=dpo").init_from.endswith(
      os.path.join("runs", "pipeline_gpu", "sft"))
  c.sft.optimizer.lr = -1.0
  c.stages = "tokenizer,sft"
  assert pipeline.config_errors(c, 8) == ["sft.optimizer.lr=-1.0: must be > 0"]
  c.stages = "tokenizer,sft,magic"
  assert "stages=" in pipeline.config_errors(c, 8)[0]
  with pytest.raises(ConfigError):
    pipeline.selected(c)


@pytest.mark.parametrize("stages", [
    "tokenizer,pretrain,sft",
    pytest.param("tokenizer,pretrain,sft,reward,dpo,rl", marks=pytest.mark.slow)])
def test_real_data_pipeline_config(shared_data, tmp_path, stages):
  """The real-file config (Shakespeare, Alpaca, HH-RLHF, GSM8K) runs its stages; CI runs
  the first three (HH-RLHF and GSM8K training are test_reward_dpo's and test_rl's)."""
  config = small_config_file(tmp_path, "pipeline_shakespeare")
  launch("--config", f"{config}:data={SHARED_DATA}", "--workdir", str(tmp_path / "run"),
         f"--config.stages={stages}")
  report = read_json(str(tmp_path / "run" / "report.json"))["stages"]
  names = {"pretrain": "base", "sft": "sft", "reward": "reward", "dpo": "dpo", "rl": "rl"}
  assert set(report) == {names[s] for s in stages.split(",")[1:]}
  for name in set(report) - {"reward"}:  # GSM8K accuracy, strict and flexible
    assert {"task_accuracy", "task_accuracy_flexible"} <= set(report[name])
  run = read_json(str(tmp_path / "run" / "sft" / "config.json"))
  assert run["data"]["train"].endswith("alpaca_5000.json")


@pytest.mark.slow
def test_gpu_pipeline_config_runs_shrunk(tmp_path):
  """configs/pipeline_gpu.py, every stage at the shrunk size: its stages fit together
  (the GPU run itself is README's speedrun)."""
  launch("--config", small_config_file(tmp_path, "pipeline_gpu"), "--workdir",
         str(tmp_path / "run"))
  report = read_json(str(tmp_path / "run" / "report.json"))["stages"]
  assert set(report) == {"base", "sft", "reward", "dpo", "rl"}
  assert read_json(str(tmp_path / "run" / "rl" / "config.json"))["rl"]["num_generations"] == 2
