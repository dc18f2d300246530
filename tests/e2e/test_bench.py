"""tools/bench.py on the CPU: every task's real step runs on synthetic tokens and reports
what the benchmark table needs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import bench, model
from jaxlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("task", ["sft", "dpo", "decode"])
def test_each_task_measures_its_real_step(task):
  batch = 16 if task == "dpo" else 8  # 8 records: one per device of the 8-device mesh
  spec = bench.Spec(preset="tiny", task=task, batch=batch, seq=64, new_tokens=8, steps=2,
                    warmup=1)
  r = bench.run(spec)
  assert r["step_s"] > 0 and r["compile_s"] > 0 and r["jax"] and r["device"]
  if task == "decode":
    assert r["tokens_per_step"] == 8 * 8  # every prompt generated all its tokens
    assert r["new_tokens_per_s"] == pytest.approx(64 / r["step_s"])
    assert r["copy_tb_s"] > 0 and 0 < r["cache_live_gb"] < r["cache_gb"]
    assert r["of_floor"] == pytest.approx(r["floor_ms_per_token_step"] / r["ms_per_token_step"])
    return
  assert np.isfinite(r["loss"])
  assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
  cfg = bench.make_config(spec).model
  per_token = model.flops_per_token(cfg, 64)
  assert r["tokens_per_step"] == batch * 64
  if task == "dpo":  # records of a chosen and a rejected row; the reference's forward
    assert r["params_frozen"] == r["params_trained"]
    assert r["flops_per_token"] == pytest.approx(per_token * 4 / 3)
  else:
    assert r["flops_per_token"] == per_token


def test_decode_with_groups_shares_each_prompts_prefill():
  spec = bench.Spec(preset="tiny", task="decode", batch=8, seq=32, new_tokens=8, steps=1,
                    warmup=0, samples=4)
  r = bench.run(spec)
  assert r["samples"] == 4 and r["tokens_per_step"] == 8 * 8  # 2 prompts x 4 rows
  with pytest.raises(ConfigError, match="whole groups"):
    bench.run(bench.Spec(preset="tiny", task="decode", batch=8, seq=32, new_tokens=8,
                         steps=1, warmup=0, samples=3))


def test_a_mixed_length_workload_times_continuous_against_static_batching():
  spec = bench.Spec(preset="tiny", task="decode", batch=8, seq=16, new_tokens=16, steps=1,
                    warmup=0, requests=24, min_new_tokens=2)
  r = bench.run(spec)
  want = bench.budgets(24, 2, 16)
  assert want.min() >= 2 and want.max() <= 16 and len(set(want.tolist())) > 4
  assert r["requests"] == 24 and r["tokens_per_step"] == want.sum()  # each its own budget
  assert r["continuous_speedup"] == pytest.approx(r["static_s"] / r["step_s"])
  assert r["ms_per_new_token"] == pytest.approx(1000 * r["step_s"] / want.sum())
  assert "of_floor" not in r and "continuous batching" in bench.format_workload(r)


def test_the_decode_floor_is_the_bytes_a_step_must_read_at_copy_bandwidth():
  cfg = bench.make_config(bench.Spec(preset="tiny", task="decode")).model
  params = model.init(cfg, jax.random.PRNGKey(0))
  B, P, N = 4, 10, 7
  r = bench.decode_floor(cfg, params, B, P, N, step_s=0.07, copy_bytes_s=1e9)
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      model.compute_weights(params, cfg)))
  kv = 2 * cfg.num_layers * B * cfg.num_kv_heads * model.head_dim(cfg) * 2  # bf16, a slot
  per_slot = kv + B  # and the slot's valid flags
  assert r["weight_gb"] * 1e9 == weights
  assert r["cache_gb"] * 1e9 == pytest.approx(per_slot * (P + N))
  assert r["cache_live_gb"] * 1e9 == pytest.approx(per_slot * (P + 3))  # P + n, n = 0..6
  floor_s = (weights + per_slot * (P + 3)) / 1e9
  assert r["floor_ms_per_token_step"] == pytest.approx(1000 * floor_s)
  assert r["floor_new_tokens_per_s"] == pytest.approx(B / floor_s)
  assert r["of_floor"] == pytest.approx(floor_s / 0.01)  # 0.07 s over 7 token steps
  assert "% of the floor" in bench.format_floor(
      dict(r, preset="tiny", batch=B, seq=P, new_tokens=N, ms_per_token_step=10.0))


def test_synthetic_sft_rows_are_packed_examples_with_masked_prompts():
  c = bench.make_config(bench.Spec(preset="tiny", task="sft", batch=8, seq=256))
  b = bench.synthetic_batch(c, "sft", 0)
  assert b["tokens"].shape == (8, 256)
  assert b["segment_ids"].max() > 1            # several examples a row
  assert 0 < b["loss_mask"].mean() < 1         # prompts carry no loss
  assert np.all(b["positions"][b["segment_ids"] == 0] == 0)


def test_cli_prints_a_table_and_json_and_rejects_bad_settings(tmp_path):
  out = tmp_path / "r.json"
  cmd = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--preset=tiny",
         "--task=pretrain", "--batch=8", "--seq=64", "--steps=2", "--warmup=1",
         "--set=model.remat=full", f"--json={out}"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "| tiny | pretrain | 8 x 64 |" in p.stdout
  (r,) = json.loads(out.read_text())
  assert r["remat"] == "full" and r["tokens_per_s"] > 0 and r["overrides"] == ["model.remat=full"]
  assert json.loads(p.stdout.strip().splitlines()[-1])["tokens_per_s"] == r["tokens_per_s"]
  with pytest.raises(ConfigError, match="model.nope"):
    bench.make_config(bench.Spec(overrides=("model.nope=1",)))
  with pytest.raises(ConfigError, match="model.remat"):
    bench.make_config(bench.Spec(overrides=("model.remat=sometimes",)))


def test_grpo_bench_writes_a_model_both_trainers_read_and_times_jaxlm(shared_data, tmp_path):
  """tools/bench_grpo.py: the random model is a Hugging Face directory transformers loads
  (tokenizer and chat template included), and jaxlm's GRPO on it reports the step split."""
  import importlib.util
  import transformers
  spec = importlib.util.spec_from_file_location("bench_grpo",
                                                os.path.join(ROOT, "tools", "bench_grpo.py"))
  bench_grpo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_grpo)
  gsm8k = os.path.join(shared_data, "gsm8k_train.jsonl")
  prompts = bench_grpo.read_prompts(gsm8k, 64)
  hf_dir = bench_grpo.write_model("tiny", prompts, str(tmp_path / "model"))
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = tok.apply_chat_template([{"role": "user", "content": prompts[0]["question"]}],
                                 tokenize=False, add_generation_prompt=True)
  assert text == prompts[0]["question"] + "\nAnswer:"
  assert tok.unk_token_id not in tok(prompts[0]["question"])["input_ids"]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  assert hf_model.config.vocab_size == len(tok)
  shape = dict(batch=2, generations=4, new_tokens=8, steps=3, warmup=1)
  r = bench_grpo.run_jaxlm(hf_dir, gsm8k, str(tmp_path / "jaxlm"), 1, shape)
  assert r["timed_steps"] == 2 and 0 < r["completion_length"] <= 8
  assert r["step_s"] == pytest.approx(r["rollout_wait_s"] + r["update_s"])
  assert r["generation_tokens_per_s"] > 0
