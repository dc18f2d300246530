"""The cost estimator (jaxlm.estimate, tools/estimate.py) against public figures."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from jaxlm import estimate as est
from jaxlm import model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "estimate.py")


def within(value, target, tolerance=0.25):
  return abs(value / target - 1) <= tolerance


def run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        cwd=ROOT, check=False, timeout=60)


def llama405b(mfu=0.40):
  return est.estimate(est.preset_model("llama3_405b"), tokens=est.parse_tokens("15.6T"),
                      hardware="h100", mfu=mfu, seq_len=8192)


def test_llama3_405b_flops():
  # Meta (Llama 3 paper, 2024): 3.8e25 FLOPs for 405B parameters on 15.6T tokens, i.e. 6ND.
  r = llama405b()
  assert 4.0e11 < r["params"] < 4.1e11
  assert within(r["total_flops_6nd"], 3.8e25, 0.02)    # 3.80e25
  # PaLM-style (attention at seq 8192 added, input embedding left out): 4.10e25, 1.08x.
  assert within(r["total_flops"], 3.8e25)
  assert r["total_flops"] > r["total_flops_6nd"]


@pytest.mark.parametrize("mfu", [0.38, 0.40, 0.43])
def test_llama3_405b_h100_hours(mfu):
  # Meta reports 30.84M H100-hours at 38-43% MFU. That figure includes restarts and the
  # long-context and annealing stages, so the bare formula lands below it. We assert the
  # estimator's own figure, accelerator_hours from the PaLM-style total_flops: 30.3M at
  # 38% (0.98x), 28.8M at 40% (0.93x), 26.8M at 43% (0.87x). (6ND would give 28.1M,
  # 26.7M, 24.8M: 0.80-0.91x, also inside 25%, but it is not what the estimator reports.)
  r = llama405b(mfu)
  assert r["accelerator_hours"] == pytest.approx(r["total_flops"] / (989e12 * mfu) / 3600)
  assert within(r["accelerator_hours"], 30.84e6)


def test_gpt3_175b():
  # Brown et al. 2020: 3.14e23 FLOPs on 300B tokens; Lambda Labs: 355 V100-years at
  # 28 TFLOP/s sustained. The estimator: 6ND 3.14e23 (1.00x), PaLM-style at seq 2048
  # 3.23e23 (1.03x), 365 V100-years from total_flops (1.03x).
  r = est.estimate(est.preset_model("gpt3_175b"), tokens=est.parse_tokens("300e9"),
                   hardware="v100", mfu=est.parse_mfu(28 / 125), seq_len=2048)
  assert 1.7e11 < r["params"] < 1.8e11
  assert within(r["total_flops_6nd"], 3.14e23, 0.02)
  assert within(r["total_flops"], 3.14e23)
  assert r["sustained_tflops"] == pytest.approx(28.0)
  assert within(r["accelerator_years"], 355)


@pytest.mark.parametrize("text, value", [
    ("15.6e12", 15.6e12), ("300e9", 300e9), ("15.6T", 15.6e12), ("300B", 300e9),
    ("2M", 2e6), ("500k", 5e5), ("1000", 1000.0)])
def test_parse_tokens(text, value):
  assert est.parse_tokens(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "3X", "-5B", "0"])
def test_parse_tokens_rejects(text):
  with pytest.raises(est.EstimateError):
    est.parse_tokens(text)


def test_parse_mfu():
  assert est.parse_mfu("0.4") == pytest.approx(0.4)
  assert est.parse_mfu("40") == pytest.approx(0.4)
  assert est.parse_mfu(1) == 1.0
  for bad in ("0", "-0.1", "101", "x"):
    with pytest.raises(est.EstimateError):
      est.parse_mfu(bad)


def test_json_cli():
  proc = run_tool("--preset", "tinyllama_1b", "--tokens", "1T", "--hardware", "h100",
                  "--mfu", "0.45", "--json")
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  for key in ("params", "flops_per_token", "total_flops", "accelerator_hours", "cost_usd",
              "total_flops_6nd", "accelerator_years", "hardware", "mfu", "price_per_hour",
              "tokens", "memory_gib", "fits"):
    assert key in r, key
  cfg = est.preset_model("tinyllama_1b")
  shapes = model.param_shapes_and_axes(cfg)
  n = sum(math.prod(s) for s, _ in
          jax.tree.leaves(shapes, is_leaf=model._is_spec))  # pylint: disable=protected-access
  assert r["params"] == n
  assert r["tokens"] == 10 ** 12 and r["mfu"] == 0.45 and r["hardware"] == "h100"
  assert r["flops_per_token"] == pytest.approx(model.flops_per_token(cfg, 2048))
  assert r["cost_usd"] == pytest.approx(r["accelerator_hours"] * 3.00)
  assert "total" in r["memory_gib"] and "step_time_s" not in r and "wall_days" not in r


def test_text_cli_with_devices_batch_and_price():
  proc = run_tool("--preset", "llama_150m", "--tokens", "3B", "--hardware", "tpu-v5e",
                  "--mfu", "50", "--devices", "8", "--batch", "64", "--seq", "1024",
                  "--price", "1.0")
  assert proc.returncode == 0, proc.stderr
  assert "accelerator-hours" in proc.stdout and "wall clock" in proc.stdout
  assert "step" in proc.stdout and "fits" in proc.stdout


def test_step_time_and_wall_days():
  cfg = est.preset_model("tinyllama_1b")
  r = est.estimate(cfg, tokens=1e12, hardware="h100", mfu=0.5, seq_len=2048, devices=64,
                   batch=512)
  assert r["tokens_per_step"] == 512 * 2048
  assert r["step_time_s"] == pytest.approx(512 * 2048 * r["flops_per_token"]
                                           / (64 * 989e12 * 0.5))
  assert r["wall_days"] == pytest.approx(r["accelerator_hours"] / 64 / 24)
  assert r["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}


def memory(remat="minimal", **kw):
  cfg = est.preset_model("llama3_8b")
  args = dict(tokens=1e12, hardware="h100", mfu=0.4, seq_len=8192, batch=64, remat=remat)
  args.update(kw)
  return est.estimate(cfg, **args)["memory_gib"]


def test_memory_shrinks_with_fsdp():
  small, large = memory(devices=8), memory(devices=64)
  for key in ("params", "grads", "optimizer"):
    assert large[key] == pytest.approx(small[key] / 8)
  n = est.count_params(est.preset_model("llama3_8b"))
  assert small["params"] == pytest.approx(n * 4 / 8 / 2 ** 30)      # float32
  assert small["optimizer"] == pytest.approx(n * 8 / 8 / 2 ** 30)   # two float32 moments
  # Data parallelism replicates the state; tensor parallelism shards it and activations.
  replicated = memory(devices=64, mesh={"data": 8, "fsdp": 8, "tensor": 1})
  assert replicated["params"] == pytest.approx(small["params"])
  tp = memory(devices=64, mesh={"data": 1, "fsdp": 8, "tensor": 8})
  assert tp["params"] == pytest.approx(large["params"])
  assert tp["activations"] == pytest.approx(memory(devices=8)["activations"] / 8)


def test_memory_remat_order():
  full, minimal, none = (memory(r, devices=8) for r in ("full", "minimal", "none"))
  assert full["activations"] < minimal["activations"] < none["activations"]
  assert full["params"] == minimal["params"] == none["params"]


def test_memory_logits_chunk():
  cfg = est.preset_model("llama3_8b")
  plain = est.estimate(cfg, tokens=1e9, hardware="h200", mfu=0.4, seq_len=8192, batch=8)
  cfg.logits_chunk = 1024
  chunked = est.estimate(cfg, tokens=1e9, hardware="h200", mfu=0.4, seq_len=8192, batch=8)
  assert chunked["memory_gib"]["logits"] == pytest.approx(plain["memory_gib"]["logits"] / 8)
  assert plain["memory_gib"]["logits"] == pytest.approx(8 * 8192 * 128256 * 4 / 2 ** 30)


def test_bf16_params_halve_params_and_grads():
  cfg = est.preset_model("llama3_8b")
  f32 = est.estimate(cfg, tokens=1e9, hardware="h100", mfu=0.4, seq_len=4096)
  cfg.param_dtype = "bfloat16"
  bf16 = est.estimate(cfg, tokens=1e9, hardware="h100", mfu=0.4, seq_len=4096)
  assert bf16["memory_gib"]["params"] == pytest.approx(f32["memory_gib"]["params"] / 2)
  assert bf16["memory_gib"]["optimizer"] == pytest.approx(f32["memory_gib"]["optimizer"])


def test_config_file():
  proc = run_tool("--config", "configs/pretrain_llama.py:preset=llama_150m", "--tokens",
                  "3B", "--hardware", "a100", "--mfu", "0.4", "--devices", "8", "--json")
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  assert r["params"] == est.count_params(est.preset_model("llama_150m"))
  assert r["seq_len"] == 2048 and r["batch"] == 16 and r["remat"] == "minimal"
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert {"activations", "logits", "total"} <= set(r["memory_gib"]) and r["fits"]
  assert r["step_time_s"] > 0 and r["wall_days"] > 0


@pytest.mark.parametrize("source", [("--config", "configs/pretrain_tiny.py"),
                                    ("--preset", "tiny")])
def test_vocab_size_zero_needs_vocab(source):
  args = (*source, "--tokens", "2M", "--hardware", "a100", "--mfu", "0.3")
  proc = run_tool(*args)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "--vocab" in proc.stderr
  proc = run_tool(*args, "--vocab", "4000", "--json")
  assert proc.returncode == 0, proc.stderr
  padded = est.preset_model("tiny")  # configs/pretrain_tiny.py's model too
  padded.vocab_size = 4096           # 4000 padded to model.vocab_multiple=128
  assert json.loads(proc.stdout)["params"] == est.count_params(padded)


@pytest.mark.parametrize("args, flag", [
    (("--preset", "nope"), "--preset"),
    (("--preset", "tiny", "--mfu", "0"), "--mfu"),
    (("--preset", "tiny", "--mfu", "150"), "--mfu"),
    (("--preset", "tiny", "--tokens", "lots"), "--tokens"),
    (("--preset", "tiny", "--hardware", "tpu-v9"), "--hardware"),
    (("--preset", "tiny", "--remat", "some"), "--remat"),
    (("--preset", "tiny", "--mesh", "data=3", "--devices", "8"), "--mesh"),
    (("--preset", "tiny", "--devices", "0"), "--devices"),
    (("--preset", "tiny", "--price", "-1"), "--price"),
    (("--preset", "tiny", "--config", "configs/pretrain_tiny.py"), "--config"),
    (("--tokens", "1B"), "--config"),
    (("--preset", "tiny", "--batch", "two"), "--batch"),
    (("--preset", "tiny", "--mesh", "fsdp=2,model=4"), "--mesh"),
    (("--preset", "tiny", "--vocab", ""), "--vocab"),
])
def test_bad_input_is_one_line_and_exit_2(args, flag):
  base = {"--tokens": "1B", "--hardware": "h100", "--mfu": "0.4", "--vocab": "32000"}
  given = dict(zip(args[::2], args[1::2]))
  argv = [a for k, v in {**base, **given}.items() if v for a in (k, v)]
  proc = run_tool(*argv)
  assert proc.returncode == 2, proc.stdout
  assert proc.stderr.strip() and proc.stderr.strip().count("\n") == 0, proc.stderr
  assert flag in proc.stderr, proc.stderr
  if flag == "--preset":
    assert "llama3_405b" in proc.stderr and "tinyllama_1b" in proc.stderr
