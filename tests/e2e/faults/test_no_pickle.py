"""Loading never executes data: weights, checkpoints and precomputed arrays are read
without unpickling; a pickle offered as weights is refused with one line naming the file.

The pickles here are live: unpickling one creates a marker file (a control test shows it
does), and every test checks that the marker never appears."""

import ast
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import STDLIB
from jaxlm import hf, runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
V, D, I, H, KV = 512, 16, 32, 2, 1  # a one-layer Llama in Hugging Face's layout
HF_CONFIG = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=I,
                 num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=KV,
                 max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6)


class Payload:
  """Unpickling this creates `marker` (what a malicious checkpoint would do instead)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
  path = tmp_path / "UNPICKLED"
  yield path
  assert not path.exists(), "a pickle was executed"


def live_pickle(marker) -> bytes:
  return pickle.dumps(Payload(marker))


def test_the_payload_is_live(tmp_path):
  """The control: unpickling these bytes does run code, so the tests below mean something."""
  control = tmp_path / "control"
  pickle.loads(live_pickle(control)).close()
  assert control.exists()


def hf_tensors():
  rng = np.random.default_rng(0)
  f = lambda *shape: rng.normal(0, 0.02, shape).astype(np.float32)  # noqa: E731
  p = "model.layers.0."
  return {"model.embed_tokens.weight": f(V, D), "model.norm.weight": f(D),
          p + "input_layernorm.weight": f(D), p + "post_attention_layernorm.weight": f(D),
          p + "self_attn.q_proj.weight": f(H * D // H, D),
          p + "self_attn.k_proj.weight": f(KV * D // H, D),
          p + "self_attn.v_proj.weight": f(KV * D // H, D),
          p + "self_attn.o_proj.weight": f(D, H * D // H),
          p + "mlp.gate_proj.weight": f(I, D), p + "mlp.up_proj.weight": f(I, D),
          p + "mlp.down_proj.weight": f(D, I)}


def hf_dir(path, weights: dict | None = None):
  """A Hugging Face model directory: config.json and `weights` ({file name: bytes}), or
  real safetensors when None."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(HF_CONFIG, f)
  if weights is None:
    from safetensors.numpy import save_file
    save_file(hf_tensors(), os.path.join(path, "model.safetensors"))
  for name, data in (weights or {}).items():
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
  return str(path)


def torch_style_zip(marker) -> bytes:
  """torch.save's format: a zip archive with the pickle inside."""
  import io
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", live_pickle(marker))
  return buf.getvalue()


@pytest.mark.parametrize("name, kind", [
    ("model.safetensors", "pickle"),       # a pickle renamed: safetensors itself would say
    ("model.safetensors", "zip"),          # "header too large"; torch.save's zip, renamed
    ("pytorch_model.bin", "pickle"),
    ("consolidated.00.pth", "pickle"),     # Meta's original Llama checkpoints
    ("model.pt", "zip"),
    ("pytorch_model-00001-of-00002.bin", "pickle"),
])
def test_a_pickle_offered_as_weights_is_refused_naming_the_file(tmp_path, marker, name, kind):
  data = live_pickle(marker) if kind == "pickle" else torch_style_zip(marker)
  path = hf_dir(tmp_path / "hf", {name: data})
  assert hf.is_hf_dir(path)  # recognized as a model directory: refused, not "no checkpoint"
  with pytest.raises(hf.HFError) as e:
    hf.load_hf(path)
  message = str(e.value)
  assert "\n" not in message and name in message, message
  assert "pickle" in message, message


def test_a_sharded_index_naming_a_pickle_is_refused(tmp_path, marker):
  path = hf_dir(tmp_path / "hf", {"pytorch_model-00001-of-00001.bin": live_pickle(marker)})
  index = {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin"
                                          for k in hf_tensors()}}
  with open(os.path.join(path, hf.SAFETENSORS_INDEX), "w") as f:
    json.dump(index, f)
  with pytest.raises(hf.HFError, match=r"model.safetensors.index.json: weight_map names "
                                       r"'pytorch_model-00001-of-00001.bin'"):
    hf.load_hf(path)


def test_garbage_as_safetensors_is_one_line_naming_the_file(tmp_path):
  path = hf_dir(tmp_path / "hf", {"model.safetensors": b"\x10" + b"\x00" * 7 + b"{not json}"})
  with pytest.raises(hf.HFError) as e:
    hf.load_hf(path)
  assert "model.safetensors: not a readable safetensors file" in str(e.value)
  assert "\n" not in str(e.value)


def test_the_launcher_refuses_a_pickle_as_init_from(tmp_path, marker):
  from jaxlm.data import tokenizer
  path = hf_dir(tmp_path / "hf", {"model.safetensors": live_pickle(marker)})
  tok = str(tmp_path / "tok.model")
  tokenizer.train([open(os.path.join(STDLIB, "abc.py")).read()], tok, 480)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, "-m", "jaxlm.launch", "--config",
       os.path.join(ROOT, "configs", "pretrain_tiny.py"), "--workdir", str(tmp_path / "run"),
       f"--config.init_from={path}", f"--config.data.tokenizer={tok}",
       f"--config.data.train={STDLIB}/abc.py", "--config.data.eval=", "--config.steps=1",
       "--config.eval_every=0", "--config.data.seq_len=32", "--config.data.batch_size=8",
       "--config.model.dtype=float32"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  last = [line for line in p.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("config error: ") and f"{path}/model.safetensors" in last, last
  assert "pickle" in last, last


def test_a_pickled_npy_as_dpo_reference_is_refused(tmp_path, marker):
  """dpo.reference=precomputed reads <workdir>/reference_logps/*.npy, never with pickles."""
  from conftest import small_config
  from jaxlm.tasks import dpo
  examples = [{"ids": [np.arange(5, dtype=np.int32), np.arange(4, dtype=np.int32)],
               "supervised": [np.ones(5, bool), np.ones(4, bool)]}]
  data = types.SimpleNamespace(train=examples, eval=[], group=2)
  folder = tmp_path / "run" / "reference_logps"
  folder.mkdir(parents=True)
  path = folder / f"train-{dpo._fingerprint(examples, 2, 'src')}.npy"
  np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match="(?i)pickle"):
    dpo.precompute_reference(small_config(task="dpo"), str(tmp_path / "run"), None, data, "src")


@pytest.fixture
def no_unpickling(monkeypatch):
  """pickle's entry points fail for the test's duration."""
  def refuse(*args, **kwargs):
    raise AssertionError("something unpickled")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)


def test_weights_and_checkpoints_load_with_pickle_disabled(tmp_path, no_unpickling):
  """A Hugging Face directory, and the jaxlm checkpoint (orbax) made from it, both load
  while pickle.load/loads/Unpickler raise."""
  src = hf_dir(tmp_path / "hf")
  _, params = hf.load_hf(src)
  runs.import_hf(src, str(tmp_path / "jaxlm"))
  _, restored, _, _ = runs.load_jaxlm(str(tmp_path / "jaxlm"))
  np.testing.assert_array_equal(np.asarray(restored["embed"]), params["embed"])


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                  "shelve", "torch"}


def test_no_code_path_can_unpickle():
  """Statically: jaxlm and tools import no unpickler, call no torch.load or unsafe
  yaml.load, and every np.load says allow_pickle=False."""
  problems = []
  for folder in ("jaxlm", "tools"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if not name.endswith(".py"):
          continue
        file = os.path.join(dirpath, name)
        where = os.path.relpath(file, ROOT)
        tree = ast.parse(open(file, encoding="utf-8").read(), file)
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            problems += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                         if a.name.split(".")[0] in UNSAFE_MODULES]
          elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
              problems.append(f"{where}:{node.lineno} imports from {node.module}")
          elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            call = f"{owner}.{node.func.attr}"
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if node.func.attr == "load" and owner in ("np", "numpy", "jnp"):
              if keywords.get("allow_pickle") != "False":
                problems.append(f"{where}:{node.lineno} {call} without allow_pickle=False")
            elif node.func.attr in ("load", "unsafe_load", "full_load") and owner == "yaml":
              problems.append(f"{where}:{node.lineno} {call} (use yaml.safe_load)")
            elif call in ("torch.load", "pickle.load", "pickle.loads"):
              problems.append(f"{where}:{node.lineno} {call}")
  assert not problems, problems
