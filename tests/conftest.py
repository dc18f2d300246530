"""Test set-up: 8 fake CPU devices for every sharding claim, and small shared configs."""

import json
import os
import sysconfig

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and the launcher processes tests start: the
# same small programs compile once, not once per test (JAX's persistent cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-jit-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Every program goes into that cache, however quick its compile: test processes and the
# launchers they start compile the same small programs again and again (each tasks.run
# builds new jitted functions, so JAX's in-memory cache misses where this one hits).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests compile far more than they run (tiny models, a few steps each), and XLA's full
# optimization of a CPU program takes about twice as long as XLA's cheap mode (JAX's
# documented switch for when optimizing costs more than running the program unoptimized).
# Like the two above, it reaches every process a test starts through the environment.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import base_config, model_config, set_key  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# The llama family's options, two by two: what Gemma 2/3 and Qwen3 switch on.
GEMMA_LIKE = dict(qk_norm=True, norm_plus_one=True, post_norms=True, mlp_activation="gelu_tanh",
                  scale_embeddings=True, query_scale=12.0, attn_softcap=3.0, final_softcap=4.0,
                  sliding_window=5, layer_pattern="LG", rope_local_theta=500.0, head_dim=24)
QWEN3_LIKE = dict(qk_norm=True, head_dim=8, tie_embeddings=True, sliding_window=4,
                  layer_pattern="LLG")


def small_model(**overrides):
  m = model_config("tiny", d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                   vocab_size=512, remat="none")
  for k, v in overrides.items():
    setattr(m, k, v)
  return m


def small_config(workdir_files=None, **overrides):
  """A pretraining config that runs in seconds on CPU."""
  c = base_config()
  c.model = small_model(vocab_size=0)
  c.steps = 20
  c.log_every = 1
  c.eval_every = 10
  c.eval_steps = 1
  c.checkpoint_every = 10
  c.async_checkpointing = False
  c.progress = "log"
  c.data.train = f"{STDLIB}/[a-f]*.py"
  c.data.eval = f"{STDLIB}/json/*.py"
  c.data.tokenizer_vocab_size = 512
  c.data.tokenizer_sample_chars = 300_000
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.prefetch = 0
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  for key, value in overrides.items():
    set_key(c, key, value)
  c.lock()
  return c


@pytest.fixture
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data is absent")
  return SHARED_DATA


# ---------------------------------------------------------------------------------------
# A learnable preference rule and a small SFT model that is neutral about it (for the
# reward, DPO and RL tests).

WORDS = "apple river stone cloud green quick seven table music light paper honey north ocean".split()


def rule_records(n, seed):
  """The rule: a reply that starts "sure," is preferred to one that starts "no,"."""
  rng = np.random.default_rng(seed)
  return [{"prompt": f"Reply to: {' '.join(rng.choice(WORDS, 3))}",
           "chosen": f"sure, {' '.join(rng.choice(WORDS, 4))}.",
           "rejected": f"no, {' '.join(rng.choice(WORDS, 4))}."} for _ in range(n)]


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def word_tokenizer(folder, words: str):
  """A 320-piece SentencePiece model trained in `folder` on 300 seeded lines of 12 of
  `words` each, every line ending ". 2 and 3 is 5?"."""
  from jaxlm.data import tokenizer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  text = [" ".join(rng.choice(words.split(), 12)) + ". 2 and 3 is 5?" for _ in range(300)]
  return tokenizer.train(text, str(folder / "t.model"), 320)


def bpe_tokenizer(folder, specials, texts, config: dict) -> str:
  """A byte-level BPE `tokenizer.json` (400 pieces, trained on `texts`) with `specials`,
  and `config` as its tokenizer_config.json; returns the tokenizer.json path."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(specials),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return str(folder / "tokenizer.json")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  """Rule data, a tokenizer, and an SFT model that saw both kinds of reply equally."""
  from jaxlm import tasks  # pylint: disable=import-outside-toplevel
  from jaxlm.data import tokenizer  # pylint: disable=import-outside-toplevel
  d = tmp_path_factory.mktemp("prefs")
  train = write_jsonl(d / "train.jsonl", rule_records(400, 0))
  held_out = write_jsonl(d / "eval.jsonl", rule_records(64, 1))
  text = [" ".join(r.values()) for r in rule_records(300, 2)]
  tok = str(d / "tok.model")
  tokenizer.train(text, tok, 320)
  both = [{"prompt": [{"role": "user", "content": r["prompt"]}],
           "completion": [{"role": "assistant", "content": r["chosen" if i % 2 else "rejected"]}]}
          for i, r in enumerate(rule_records(400, 3))]
  sft_data = write_jsonl(d / "sft.jsonl", both)
  tasks.run(small_config(**{"task": "sft", "data.train": sft_data, "data.eval": "",
                            "data.tokenizer": tok, "data.seq_len": 64, "steps": 40,
                            "eval_every": 0, "checkpoint_every": 40}), str(d / "sft"))
  return {"dir": d, "train": train, "eval": held_out, "tok": tok, "sft": str(d / "sft")}
