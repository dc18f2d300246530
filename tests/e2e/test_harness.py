"""lm-evaluation-harness on jaxlm models (jaxlm.harness): a tiny trained run scores
multiple-choice and rolling-loglikelihood requests as lm_eval's own `hf` backend scores
its export (float32, per request), generate_until stops at its `until` strings, and the
command lines (`python -m jaxlm.harness`, tools/eval.py --lm_eval_tasks) write results.
Tasks are local YAML + JSONL files; nothing is downloaded."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from conftest import small_config, write_jsonl  # noqa: E402
from jaxlm import runs, tasks  # noqa: E402
from jaxlm.data import sft  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")
pytest.importorskip("transformers")
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxlm import harness  # noqa: E402  (registers the `jaxlm` model)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
       "JAX_PLATFORMS": "cpu"}

MC = [{"question": "def parse(self, text):\n    return", "choices": [" text", " self", " None"],
       "answer": 0},
      {"question": "import", "choices": [" os", " json", " sys\n", " re"], "answer": 2},
      {"question": "class Decoder(object):\n", "choices": ["    def", "x", "\n\n"], "answer": 0},
      {"question": "for i in range(", "choices": ["10):", "len(x)):", " n)"], "answer": 1}]
ROLLING = [{"text": "def f(x):\n    return x + 1\n"},
           {"text": "import os\nimport sys\n\nclass A:\n    pass\n" * 3},  # > max_length 64
           {"text": "x"}]
GEN = [{"prompt": "def f(x):\n", "answer": ""}, {"prompt": "import os\n", "answer": ""}]


def _tasks(d, until):
  """Three local tasks in `d`: multiple choice, rolling loglikelihood, generate_until."""
  files = {name: write_jsonl(d / f"{name}.jsonl", rows)
           for name, rows in (("mc", MC), ("rolling", ROLLING), ("gen", GEN))}
  common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"  # noqa: E731
                         f"    test: {files[name]}\ntest_split: test\n")
  (d / "mc.yaml").write_text(
      "task: jx_mc\n" + common("mc") + "output_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
  (d / "rolling.yaml").write_text(
      "task: jx_rolling\n" + common("rolling") + "output_type: loglikelihood_rolling\n"
      "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  (d / "gen.yaml").write_text(
      "task: jx_gen\n" + common("gen") + "output_type: generate_until\n"
      "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
      f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: 12\n"
      "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
  return str(d)


def _evaluate(lm, names, include):
  out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(
      include_path=include), log_samples=True, verbosity="ERROR")
  return out


def _responses(out, task):
  return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny pretraining run, its Hugging Face export and the local tasks."""
  d = tmp_path_factory.mktemp("harness")
  tasks.run(small_config(**{"steps": 6, "eval_every": 0, "checkpoint_every": 6,
                            "model.max_seq_len": 64}), str(d / "run"))
  runs.export_hf(str(d / "run"), str(d / "hf"))
  (d / "tasks").mkdir()
  return {"dir": d, "run": str(d / "run"), "hf": str(d / "hf"),
          "tasks": _tasks(d / "tasks", ["\n\n"])}


def test_loglikelihoods_equal_the_hf_backend(setup):
  from lm_eval.models.huggingface import HFLM  # lazy: torch, only for this comparison
  ours = harness.JaxLM(pretrained=setup["run"], dtype="float32", batch_size=4)
  ours_sharded = harness.JaxLM(pretrained=setup["hf"], batch_size=3, data_parallel=2)
  assert ours.max_length == 64 and ours_sharded.batch_size == 4  # rounded up to the mesh
  # hf's own BOS (its tokenizer adds it) for contexts; rolling windows start from its
  # prefix token, so it must not add a second one there.
  hf = HFLM(pretrained=setup["hf"], dtype="float32", device="cpu", batch_size=4)
  hf_plain = HFLM(pretrained=setup["hf"], dtype="float32", device="cpu", batch_size=4,
                  add_bos_token=False, max_length=64)
  assert hf.max_length == 64
  got = _evaluate(ours, ["jx_mc", "jx_rolling"], setup["tasks"])
  sharded = _evaluate(ours_sharded, ["jx_mc", "jx_rolling"], setup["tasks"])
  want_mc = _evaluate(hf, ["jx_mc"], setup["tasks"])
  want_rolling = _evaluate(hf_plain, ["jx_rolling"], setup["tasks"])
  mc, mc_sharded, mc_hf = (_responses(o, "jx_mc") for o in (got, sharded, want_mc))
  assert [len(r) for r in mc] == [len(x["choices"]) for x in MC]
  for ours_doc, sharded_doc, hf_doc in zip(mc, mc_sharded, mc_hf):
    for (a,), (b,), (c,) in zip(ours_doc, sharded_doc, hf_doc):
      assert abs(a[0] - c[0]) < 1e-3 and abs(b[0] - c[0]) < 1e-3, (a, b, c)
      assert a[1] == b[1] == c[1]
      assert a[0] < 0
  assert got["results"]["jx_mc"]["acc,none"] == want_mc["results"]["jx_mc"]["acc,none"]
  rolling, rolling_sharded, rolling_hf = (_responses(o, "jx_rolling")
                                          for o in (got, sharded, want_rolling))
  for ([a],), ([b],), ([c],) in zip(rolling, rolling_sharded, rolling_hf):
    assert abs(a - c) < 1e-3 and abs(b - c) < 1e-3, (a, b, c)
  # the long text spans several windows: it is not the sum of a single 64-token row
  assert rolling[1][0][0] < rolling[0][0][0] * 3


def test_generate_until_stops_at_its_strings(setup):
  lm = harness.JaxLM(pretrained=setup["run"], dtype="float32", batch_size=2)

  class Request:
    def __init__(self, context, gen_kwargs):
      self.args = (context, gen_kwargs)

  prompts = ["def f(x):\n", "import os\n", "class A"]
  free = lm.generate_until([Request(p, {"until": [], "max_gen_toks": 16}) for p in prompts])
  assert all(free), free
  stops, want = [], []
  for text in free:  # a stop string from the middle of each free completion
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stops.append(stop)
    want.append(text[:text.index(stop)])
  cut = lm.generate_until([Request(p, {"until": [s, "\x00never"], "max_gen_toks": 16})
                           for p, s in zip(prompts, stops)])
  assert cut == want
  assert all(s not in c for s, c in zip(stops, cut))
  assert harness._cut("a b. c. d", [" c", "."]) == "a b"


def test_chat_prompts_encode_as_jaxlm_generation_prompts(setup):
  lm = harness.JaxLM(pretrained=setup["run"], dtype="float32")
  history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name one."}]
  text = lm.apply_chat_template(history)
  assert text.endswith("<|assistant|>\n") and "Name one." in text
  want = sft.generation_prompt([(m["role"], m["content"]) for m in history], lm.tok, lm.template)
  assert lm.tok_encode(text) == [int(i) for i in want]
  assert lm.chat_template(True) and lm.chat_template(False) is None


def test_the_command_lines_write_results(setup, tmp_path):
  out = tmp_path / "lm_eval"
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.harness", "--model", "jaxlm", "--model_args",
       f"pretrained={setup['run']},dtype=float32", "--tasks", "jx_mc,jx_gen",
       "--include_path", setup["tasks"], "--batch_size", "4", "--output_path", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  written = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
  assert written, os.listdir(out)
  results = json.loads(open(written[0], encoding="utf-8").read())["results"]
  assert 0 <= results["jx_mc"]["acc,none"] <= 1 and "exact_match,none" in results["jx_gen"]

  eval_out = tmp_path / "eval"
  result = subprocess.run(
      [sys.executable, "tools/eval.py", f"--model={setup['hf']}", f"--out={eval_out}",
       "--lm_eval_tasks=jx_mc", f"--lm_eval_include={setup['tasks']}", "--lm_eval_dtype=float32"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads((eval_out / "eval.json").read_text())
  assert written["metrics"]["lm_eval"]["jx_mc"]["acc,none"] == results["jx_mc"]["acc,none"]


def test_an_unknown_lm_eval_task_is_one_line(setup, tmp_path):
  result = subprocess.run(
      [sys.executable, "tools/eval.py", f"--model={setup['run']}", f"--out={tmp_path / 'e'}",
       "--lm_eval_tasks=jx_mc,jx_nope", f"--lm_eval_include={setup['tasks']}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: eval.lm_eval_tasks: no lm_eval task 'jx_nope' (nor in {setup['tasks']})")
