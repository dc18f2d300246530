"""The report card's choices: objectives per stage, smoothing, which samples it shows,
and its notes."""

import json

from jaxlm import plots, report


def test_each_stage_plots_its_own_objective(tmp_path):
  for task, extra in [("pretrain", {}), ("dpo", {"dpo": {"loss": "ipo"}}), ("grpo", {})]:
    (tmp_path / task).mkdir()
    (tmp_path / task / "config.json").write_text(json.dumps({"task": task, **extra}))
  assert plots.objective(str(tmp_path / "pretrain")) == ("loss", "next-token cross-entropy")
  assert plots.objective(str(tmp_path / "dpo")) == ("loss", "DPO loss (ipo)")
  assert plots.objective(str(tmp_path / "grpo"))[0] == "reward"  # not the surrogate


def test_smoothing_is_a_trailing_mean():
  assert plots.smoothed([1.0, 2.0, 3.0, 4.0, 5.0], frac=0.4) == [1.0, 1.5, 2.5, 3.5, 4.5]
  assert plots.smoothed([]) == []


def test_samples_alternate_right_and_wrong():
  samples = [{"id": i, "correct": i in (0, 1, 2)} for i in range(6)]
  assert [x["id"] for x in report.shown(samples, 4)] == [0, 3, 1, 4]
  assert [x["id"] for x in report.shown(samples[:3], 4)] == [0, 1, 2]


def test_a_perplexity_rise_gets_its_note():
  stages = {"base": {"perplexity": 2.7}, "sft": {"perplexity": 13.4}, "reward": {}}
  assert "rises" in report.notes(stages)[1]
  assert report.notes({"base": {"perplexity": 3.0}, "sft": {"perplexity": 2.0}}) == []


def test_accuracy_gains_carry_their_paired_standard_errors():
  before = {"a": False, "b": False, "c": True, "d": True}
  after = {"a": True, "b": False, "c": True, "d": False, "new": True}
  stages = {"base": {"_correct": before}, "reward": {"_correct": {}},
            "sft": {"_correct": after}}
  report._add_gains(stages)
  assert stages["base"]["task_accuracy_se"] == 0.5 / 2  # sqrt(p (1 - p) / n), p = 0.5
  assert "task_accuracy_gain" not in stages["base"] and "task_accuracy_se" not in stages["reward"]
  # Per shared problem: +1, 0, 0, -1: mean 0, sample std sqrt(2/3), over sqrt(4).
  assert stages["sft"]["task_accuracy_gain"] == 0.0
  assert abs(stages["sft"]["task_accuracy_gain_se"] - (2 / 3) ** 0.5 / 2) < 1e-12


def test_the_report_lists_lm_eval_results(tmp_path):
  stage = tmp_path / "sft"
  (stage / "eval").mkdir(parents=True)
  (stage / "summary.json").write_text(json.dumps({"step": 3, "metrics": {"loss": 1.0}}))
  (stage / "eval" / "eval.json").write_text(json.dumps({"metrics": {
      "task_accuracy": 0.5, "lm_eval": {"jx_mc": {"alias": "jx_mc", "acc,none": 0.75,
                                                  "acc_stderr,none": 0.25}}}}))
  s = report.collect(str(tmp_path))["sft"]
  assert s["lm_eval/jx_mc/acc,none"] == 0.75 and s["lm_eval/jx_mc/acc_stderr,none"] == 0.25
  assert "lm_eval" not in s and "lm_eval/jx_mc/alias" not in s
  md = report._markdown({"environment": {}, "total_seconds": 1.0, "cost": dict(
      cpu_vm="vm", cpu_vm_price_per_hour=0.1, cpu_vm_cost=0.0, train_flops=0.0,
      accelerator="gpu", accelerator_mfu=0.3, accelerator_price_per_hour=1.0,
      accelerator_hours=0.0, accelerator_cost=0.0)}, {"sft": s}, [], str(tmp_path), {}, 0)
  assert "| lm_eval/jx_mc/acc,none | 0.75" in md
