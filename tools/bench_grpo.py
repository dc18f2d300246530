"""GRPO end to end: jaxlm's training loop, and TRL's GRPOTrainer as the peer, on the same
model, prompts, reward and shapes.

  python tools/bench_grpo.py --preset tinyllama_1b --prompts ../shared/data/gsm8k_train.jsonl \
      --batch 16 --generations 8 --new_tokens 256 --steps 6 --peer trl --json grpo.json
  python tools/bench_grpo.py --preset tiny --prompts ../shared/data/gsm8k_train.jsonl \
      --batch 2 --generations 4 --new_tokens 16 --steps 3        # CPU, jaxlm only

The model is the preset's shape, randomly initialized, written as a Hugging Face
directory with a word-level tokenizer over the prompts' words (padded with filler words
to the preset's vocabulary) and a plain chat template; both trainers read that directory
unchanged. The reward is GSM8K's final-answer match (jaxlm's `math_answer`; for TRL the
same function on its completions). Each trainer runs in a process of its own, one after
the other (JAX and PyTorch each claim the device's memory).

jaxlm runs once per --staleness value (rl.max_staleness). Step times are the median
over the steps after --warmup; jaxlm's are split into generation (time/rollout_s: the
engine, rewards, rows) and the update (time/update_s: the reference forward, the policy
forward and backward, the optimizer; with staleness 1 the wait for the overlapped
rollout is time/rollout_wait_s). TRL's step is timed by a callback around each
optimizer step; its generation time is its own `generate` calls, timed by wrapping them.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from jaxlm import fileio

_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (jaxlm.config.MODEL_PRESETS).")
_PROMPTS = flags.DEFINE_string("prompts", None, "GSM8K-style JSONL: question, answer.")
_BATCH = flags.DEFINE_integer("batch", 16, "Prompts a step.")
_GENERATIONS = flags.DEFINE_integer("generations", 8, "Completions a prompt (G).")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens generated a completion at most.")
_STEPS = flags.DEFINE_integer("steps", 6, "Steps a run.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps not timed (compilation, warm-up).")
_STALENESS = flags.DEFINE_string("staleness", "0,1", "rl.max_staleness values for jaxlm.")
_PEER = flags.DEFINE_enum("peer", "none", ["none", "trl"], "Also run this peer.")
_JSON = flags.DEFINE_string("json", None, "Also write the results (a JSON list) here.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the model and runs go (default: a "
                               "temporary folder, removed after).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one trainer (jaxlm:STALENESS | trl).")
flags.mark_flag_as_required("prompts")

TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}Answer:{% endif %}")


def read_prompts(path: str, n: int) -> list[dict]:
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        out.append({"question": r["question"], "answer": r["answer"]})
      if len(out) == n:
        break
  return out


def write_model(preset: str, prompts: list[dict], folder: str) -> str:
  """The preset, randomly initialized, as a Hugging Face directory with a word-level
  tokenizer whose vocabulary is the prompts' words, then filler words."""
  import collections  # pylint: disable=import-outside-toplevel  # lazy: the child's own
  import jax  # pylint: disable=import-outside-toplevel  # lazy: the child's own
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders  # pylint: disable=import-outside-toplevel  # lazy
  from jaxlm import hf, model  # pylint: disable=import-outside-toplevel  # lazy
  from jaxlm.config import model_config  # pylint: disable=import-outside-toplevel  # lazy
  m = model_config(preset)
  m.param_dtype = "bfloat16"
  m.vocab_size = m.vocab_size or 2048  # a preset that takes its tokenizer's (tiny)
  specials = ["<unk>", "<s>", "</s>"]
  split = pre_tokenizers.Whitespace()
  counts = collections.Counter(w for p in prompts for text in (p["question"], p["answer"])
                               for w, _ in split.pre_tokenize_str(text))
  words = [w for w, _ in counts.most_common(m.vocab_size - len(specials))]
  words += [f"w{i}" for i in range(m.vocab_size - len(specials) - len(words))]
  vocab = {w: i for i, w in enumerate(specials + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = split
  tok.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
  params = model.init(m, jax.random.PRNGKey(0))
  with hf.staged_export(folder, "huggingface") as out:
    hf.write_hf(m, params, out, 5 * 2**30, extra_config={"bos_token_id": 1, "eos_token_id": 2})
    tok.save(os.path.join(out, "tokenizer.json"))
    fileio.atomic_write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "</s>", "chat_template": TEMPLATE})
  return folder


def run_jaxlm(hf_dir: str, prompts_file: str, workdir: str, staleness: int, shape: dict) -> dict:
  """jaxlm's GRPO (configs/grpo_tiny.py on the model) for shape["steps"] steps; the medians
  of its step times after the warm-up."""
  from jaxlm import tasks  # pylint: disable=import-outside-toplevel  # lazy: the child's own
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
  import grpo_tiny  # pylint: disable=import-outside-toplevel  # lazy
  c = grpo_tiny.get_config()
  c.init_from = hf_dir
  c.data.train = prompts_file
  c.data.chat_template = "hf"
  c.data.batch_size = shape["batch"]
  c.steps = shape["steps"]
  c.checkpoint_every = shape["steps"] + 1
  c.rl.num_generations = shape["generations"]
  c.rl.max_new_tokens = shape["new_tokens"]
  c.rl.temperature = 1.0
  c.rl.max_staleness = staleness
  c.reward.fn = "math_answer"
  c.model.remat = "minimal"
  # The loss reads [rows, P + N, vocab] float32 log-probs: 16 rows a micro-batch fit.
  c.optimizer.grad_accum_steps = max(1, shape["batch"] * shape["generations"] // 16)
  tasks.run(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [r for r in map(json.loads, f) if "time/update_s" in r][shape["warmup"]:]
  med = lambda k: statistics.median(r[k] for r in records) if records and k in records[0] else None  # noqa: E731
  rollout, update, wait = med("time/rollout_s"), med("time/update_s"), med("time/rollout_wait_s")
  step = (wait if staleness else rollout) + update
  tokens = med("completion_length") * shape["batch"] * shape["generations"]
  return {"trainer": "jaxlm", "max_staleness": staleness, "step_s": step,
          "generation_s": rollout, "update_s": update, "rollout_wait_s": wait,
          "generation_tokens_per_s": tokens / rollout, "completion_length": med("completion_length"),
          "timed_steps": len(records)}


def run_trl(hf_dir: str, prompts: list[dict], workdir: str, shape: dict) -> dict:
  """TRL's GRPOTrainer on the same model, prompts, reward and shapes."""
  import time  # pylint: disable=import-outside-toplevel  # lazy: the child's own
  import datasets  # pylint: disable=import-outside-toplevel  # lazy: the peer's
  import pyarrow  # pylint: disable=import-outside-toplevel  # lazy: the peer's
  import transformers  # pylint: disable=import-outside-toplevel  # lazy: the peer's
  import trl  # pylint: disable=import-outside-toplevel  # lazy: the peer's
  from jaxlm import reward_fns  # pylint: disable=import-outside-toplevel  # lazy
  gpu = transformers.utils.is_torch_cuda_available()

  def reward(prompts, completions, answer, **_):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return reward_fns.math_answer(prompts, texts, answer=answer)

  times, gen = [], []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

  rows = shape["batch"] * shape["generations"]
  # A fingerprint given: datasets hashes no Arrow table (its hashing fails on some
  # pyarrow builds).
  data = datasets.Dataset(datasets.table.InMemoryTable(pyarrow.Table.from_pylist(
      [{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]}
       for p in prompts])), fingerprint="bench_grpo")
  args = trl.GRPOConfig(
      output_dir=workdir, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
      num_generations=shape["generations"], max_completion_length=shape["new_tokens"],
      max_steps=shape["steps"], learning_rate=1e-4, beta=0.04, temperature=1.0, bf16=gpu,
      use_cpu=not gpu, gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[],
      use_vllm=False, seed=0)
  trainer = trl.GRPOTrainer(model=hf_dir, reward_funcs=reward, args=args, train_dataset=data,
                            callbacks=[Timer()])
  generate = trainer.model.generate

  def timed_generate(*a, **kw):
    t0 = time.perf_counter()
    out = generate(*a, **kw)
    gen.append((time.perf_counter() - t0, int(out.shape[0]) * (int(out.shape[1]) - int(
        (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]))))
    return out
  trainer.model.generate = timed_generate
  trainer.train()
  timed = times[shape["warmup"]:]
  gens = gen[shape["warmup"]:]
  gen_s = statistics.median(g[0] for g in gens) if gens else None
  return {"trainer": "trl", "version": trl.__version__, "step_s": statistics.median(timed),
          "generation_s": gen_s,
          "generation_tokens_per_s": (statistics.median(g[1] for g in gens) / gen_s
                                      if gens else None), "timed_steps": len(timed)}


def _shape() -> dict:
  return dict(batch=_BATCH.value, generations=_GENERATIONS.value, new_tokens=_NEW.value,
              steps=_STEPS.value, warmup=_WARMUP.value)


def _child(spec: str, root: str) -> dict:
  hf_dir = os.path.join(root, "model")
  if spec in ("model", "trl"):  # the prompts the vocabulary is made of, and TRL's data
    prompts = read_prompts(_PROMPTS.value, 4 * _BATCH.value * max(_STEPS.value, 1))
    if spec == "model":
      write_model(_PRESET.value, prompts, hf_dir)
      return {}
    return run_trl(hf_dir, prompts, os.path.join(root, "trl"), _shape())
  staleness = int(spec.split(":")[1])
  return run_jaxlm(hf_dir, _PROMPTS.value, os.path.join(root, f"jaxlm_{staleness}"), staleness,
                   _shape())


def _run_child(spec: str, root: str) -> dict:
  out = os.path.join(root, f"{spec.replace(':', '_')}.json")
  shared = (_PRESET, _PROMPTS, _BATCH, _GENERATIONS, _NEW, _STEPS, _WARMUP)
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={spec}", f"--workdir={root}",
         *[f"--{f.name}={f.value}" for f in shared], f"--json={out}"]
  subprocess.run(cmd, check=True)
  with open(out, encoding="utf-8") as f:
    return json.load(f)


def main(argv):
  del argv
  from jaxlm import console  # pylint: disable=import-outside-toplevel  # lazy: fast --help
  if _CHILD.value:
    result = _child(_CHILD.value, _WORKDIR.value)
    if result:  # where and from what it ran, also when a child is run alone
      result.update(console.environment())
    fileio.atomic_write_json(_JSON.value, result)
    return
  with tempfile.TemporaryDirectory() as tmp:
    root = _WORKDIR.value or tmp
    _run_child("model", root)
    results = [_run_child(f"jaxlm:{int(s)}", root) for s in _STALENESS.value.split(",") if s]
    if _PEER.value == "trl":
      results.append(_run_child("trl", root))
  command = "python tools/bench_grpo.py " + " ".join(sys.argv[1:])
  results = [{"preset": _PRESET.value, **_shape(), **r, "command": command} for r in results]
  jaxlm_sync = next((r for r in results if r.get("max_staleness") == 0), None)
  for r in results:
    if jaxlm_sync and r["trainer"] == "trl":
      r["jaxlm_speedup"] = r["step_s"] / jaxlm_sync["step_s"]
    print(json.dumps(r))
  if _JSON.value:
    fileio.atomic_write_json(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
