"""Exports and TPU commands a user can trust: an export is written whole or not at all and
never mixes with what was there; HF JSON that is deep, cut short or mistyped is one line
naming the file and field; convert_hf.py's mistakes are one line; and no user string can
run a command on a TPU worker."""

import errno
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import fileio, hf, model, runs, tpu
from jaxlm.config import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def tiny(seed: int, untied: bool = True):
  """A small Llama config and random float32 params (no jax init: numpy only)."""
  m = model_config("tiny", d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=32,
                   vocab_size=32, remat="none", tie_embeddings=not untied)
  m.vocab_multiple, m.dtype = 1, "float32"
  rng = np.random.default_rng(seed)
  params = {}
  for name, spec in model.param_shapes_and_axes(m).items():
    if name == "layers":
      params[name] = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in spec.items()}
    else:
      params[name] = rng.normal(size=spec[0]).astype(np.float32)
  return m, params


def same(a, b) -> bool:
  import jax
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def staging_folders(parent) -> list[str]:
  staging = fileio.STAGING
  return sorted(n for n in os.listdir(parent) if staging in n)


# ---------------------------------------------------------------------------------------
# Item 1: exports are written whole, into nothing but an earlier export


def test_a_single_file_export_replaces_a_sharded_one_whole(tmp_path):
  out = str(tmp_path / "out")
  m, old = tiny(0)
  hf.save_hf(m, old, out, max_shard_bytes=2_000)
  assert os.path.isfile(os.path.join(out, hf.SAFETENSORS_INDEX))
  _, new = tiny(1)
  hf.save_hf(m, new, out)
  assert sorted(os.listdir(out)) == ["config.json", hf.EXPORT_MARKER, "model.safetensors"]
  assert same(hf.load_hf(out)[1], new)
  assert staging_folders(tmp_path) == []


@pytest.mark.parametrize("case", ["user_files", "export_with_a_file_added", "a_file",
                                  "other_kind", "a_subfolder_added"])
def test_a_target_that_is_not_an_earlier_export_is_refused_untouched(tmp_path, case):
  out = tmp_path / "out"
  m, params = tiny(0)
  if case == "user_files":  # e.g. an HF model folder of the user's own
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "notes.txt").write_text("mine")
  elif case == "export_with_a_file_added":
    hf.save_hf(m, params, str(out))
    (out / "README.md").write_text("my model card")
  elif case == "a_subfolder_added":
    hf.save_hf(m, params, str(out))
    (out / "eval").mkdir()
  elif case == "a_file":
    out.write_text("not a folder")
  else:  # a jaxlm import (tools/convert_hf.py --to_jaxlm) is not a Hugging Face export
    hf.save_hf(m, params, str(out))
    marker = json.loads((out / hf.EXPORT_MARKER).read_text())
    (out / hf.EXPORT_MARKER).write_text(json.dumps({**marker, "jaxlm_export": "jaxlm"}))
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(hf.HFError) as e:
    hf.save_hf(m, tiny(1)[1], str(out))
  message = str(e.value)
  assert "\n" not in message and message.startswith(str(out)), message
  if case in ("export_with_a_file_added", "a_subfolder_added"):
    assert ("README.md" if case == "export_with_a_file_added" else "eval") in message
  after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  assert after == before  # nothing changed, nothing staged beside it


KILL_POINTS = ("rename", "replace", "fsync", "mkdir", "unlink", "remove", "rmdir")


class Killed(BaseException):
  """What a SIGKILL does to the export: it stops, and no handler runs."""


def export_killed_at(monkeypatch, n: int, export) -> bool:
  """Run `export` with a kill just before its n-th filesystem call (a rename, fsync,
  mkdir, unlink, safetensors write ...); whether the kill happened."""
  import safetensors.numpy
  calls = [0]

  def wrap(fn):
    def killing(*args, **kwargs):
      calls[0] += 1
      if calls[0] == n:
        raise Killed
      return fn(*args, **kwargs)
    return killing

  with monkeypatch.context() as patch:
    for name in KILL_POINTS:  # fsync a point but not done: only a power cut would tell
      patch.setattr(os, name, wrap(getattr(os, name) if name != "fsync" else lambda fd: None))
    patch.setattr(safetensors.numpy, "save_file", wrap(safetensors.numpy.save_file))
    try:
      export()
    except Killed:
      return True
  return False


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "rename_aside"])
def test_a_kill_at_any_moment_leaves_one_whole_export(tmp_path, monkeypatch, exchange):
  """Kill the export before each of its filesystem calls in turn: the target holds the
  old export or the new one, whole (or, without an atomic exchange, between its two
  renames, none and the old one whole beside it), and the next export ends with the
  new one alone, every staging folder gone."""
  if not exchange:
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
  monkeypatch.setattr(os, "fsync", lambda fd: None)  # only a power cut would tell: faster
  out = str(tmp_path / "out")
  m, old = tiny(0)
  _, new = tiny(1)
  hf.save_hf(m, old, out, max_shard_bytes=6_000)  # sharded: 3 files and an index
  old_files = sorted(os.listdir(out))
  n, outcomes = 1, set()
  while export_killed_at(monkeypatch, n, lambda: hf.save_hf(m, new, out)):
    left = staging_folders(tmp_path)
    if os.path.exists(out):
      _, params = hf.load_hf(out)
      files = sorted(os.listdir(out))
      if same(params, old):
        assert files == old_files, n
        outcomes.add("old")
      else:
        assert same(params, new) and files == ["config.json", hf.EXPORT_MARKER,
                                               "model.safetensors"], n
        outcomes.add("new")
      assert len(left) <= 1, (n, left)
    else:  # only between the two renames of rename_aside
      assert not exchange and len(left) == 2, (n, left)
      assert any(same(hf.load_hf(str(tmp_path / d))[1], old) for d in left), n
      outcomes.add("none")
    hf.save_hf(m, old, out, max_shard_bytes=6_000)  # the next export cleans up, and resets
    assert staging_folders(tmp_path) == [] and sorted(os.listdir(out)) == old_files, n
    n += 1
  assert n > 20 and same(hf.load_hf(out)[1], new)  # every call of the export was a kill point
  assert outcomes == ({"old", "new"} if exchange else {"old", "new", "none"}), outcomes
  assert staging_folders(tmp_path) == []


def test_a_full_disk_during_an_export_keeps_the_old_one(tmp_path, monkeypatch):
  import safetensors.numpy
  out = str(tmp_path / "out")
  m, old = tiny(0)
  hf.save_hf(m, old, out)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  with pytest.raises(OSError) as e:
    hf.save_hf(m, tiny(1)[1], out)
  assert str(e.value) == (f"{out}: writing the export failed (No space left on device); "
                          f"{out} is as it was")
  assert same(hf.load_hf(out)[1], old) and staging_folders(tmp_path) == []


def test_a_staging_folder_of_another_name_or_without_a_marker_is_left_alone(tmp_path):
  out = tmp_path / "out"
  m, params = tiny(0)
  mine = tmp_path / f".out{fileio.STAGING}0a1b2c3d"
  mine.mkdir()
  (mine / "data.bin").write_bytes(b"the user's")   # its name, but no marker: not ours
  other = tmp_path / f".other{fileio.STAGING}0a1b2c3d"
  other.mkdir()
  (other / hf.EXPORT_MARKER).write_text(json.dumps({"jaxlm_export": "huggingface",
                                                    "target": "other"}))
  hf.save_hf(m, params, str(out))
  assert (mine / "data.bin").read_bytes() == b"the user's" and other.is_dir()


def test_an_import_rerun_replaces_the_earlier_import(tmp_path):
  src = str(tmp_path / "hf")
  m, params = tiny(0)
  hf.save_hf(m, params, src)
  runs.import_hf(src, str(tmp_path / "jx"))
  first = sorted(p.name for p in (tmp_path / "jx").iterdir())
  hf.save_hf(m, tiny(1)[1], src)
  runs.import_hf(src, str(tmp_path / "jx"))  # orbax refused an existing step folder here
  assert sorted(p.name for p in (tmp_path / "jx").iterdir()) == first
  assert same(runs.load_jaxlm(str(tmp_path / "jx"))[1], tiny(1)[1])
  assert staging_folders(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Item 2: HF JSON read through fileio.read_json; mistyped fields named


def write_config(folder, config: dict | str):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write(config if isinstance(config, str) else json.dumps(config))


def test_a_deeply_nested_config_or_index_is_one_line_naming_it(tmp_path):
  m, params = tiny(0)
  deep = '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
  write_config(tmp_path / "a", deep)
  with pytest.raises(hf.HFError, match=r"a/config.json: not readable JSON \(nested too "
                                       r"deeply\)$"):
    hf.load_hf(str(tmp_path / "a"))
  assert not hf.is_hf_dir(str(tmp_path / "a"))  # and no RecursionError from here either
  hf.save_hf(m, params, str(tmp_path / "b"), max_shard_bytes=2_000)
  (tmp_path / "b" / hf.SAFETENSORS_INDEX).write_text(deep)
  with pytest.raises(hf.HFError, match=r"b/model.safetensors.index.json: not readable JSON"):
    hf.load_hf(str(tmp_path / "b"))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "16", "field 'hidden_size' is a string ('16'), not an integer"),
    ("hidden_size", {"a": {"b": 1}}, "field 'hidden_size' is an object, not an integer"),
    ("num_hidden_layers", 1.5, "field 'num_hidden_layers' is a number (1.5), not an integer"),
    ("rms_norm_eps", [1e-5], "field 'rms_norm_eps' is a list, not a number"),
    ("tie_word_embeddings", "no", "field 'tie_word_embeddings' is a string ('no'), not a "
                                  "boolean"),  # was read as True
    ("vocab_size", None, "field 'vocab_size' is null"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
     "field 'rope_scaling.factor' is a string ('8'), not a number"),
    ("rope_scaling", "llama3", "field 'rope_scaling' is a string ('llama3'), not an object"),
    ("model_type", 7, "field 'model_type' is an integer (7), not a string"),
])
def test_a_mistyped_config_field_is_one_line_naming_the_file_and_field(tmp_path, field, value,
                                                                       message):
  m, params = tiny(0)
  hf.save_hf(m, params, str(tmp_path / "hf"))
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  write_config(tmp_path / "hf", {**config, field: value})
  with pytest.raises(hf.HFError) as e:
    hf.load_hf(str(tmp_path / "hf"))
  assert str(e.value) == f"{tmp_path / 'hf' / 'config.json'}: {message}"


def test_a_safetensors_header_that_starts_like_a_pickle_still_loads(tmp_path):
  """A header of 640 bytes begins 0x80 0x02, a protocol-2 pickle's first bytes: it was
  refused as a pickle (a real export of some sizes could not be loaded back)."""
  from safetensors.numpy import load_file
  header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
  text = json.dumps(header).encode()
  text += b" " * (640 - len(text))  # the format pads headers with spaces
  path = tmp_path / "model.safetensors"
  path.write_bytes((640).to_bytes(8, "little") + text + np.float32([1, 2]).tobytes())
  assert path.read_bytes()[:2] == b"\x80\x02"
  handle = hf.open_safetensors(str(path))
  np.testing.assert_array_equal(handle.get_tensor("w"), load_file(str(path))["w"])


# ---------------------------------------------------------------------------------------
# Item 3: tools/convert_hf.py: one line, non-zero exit, no library noise


def convert(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"),
                         *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                        timeout=120, check=False)


@pytest.mark.parametrize("case", ["existing_output", "missing_input", "wrong_family",
                                  "unreadable_safetensors", "nested_config"])
def test_convert_hf_mistakes_are_one_line(tmp_path, case):
  m, params = tiny(0)
  src, out = tmp_path / "hf", tmp_path / "out"
  hf.save_hf(m, params, str(src))
  out.mkdir()
  args = ["--hf", src, "--to_jaxlm", out]
  if case == "existing_output":  # an import by an older jaxlm (no marker): refused, untouched
    (out / "checkpoints" / "0" / "params").mkdir(parents=True)
    (out / "config.json").write_text("{}")
  elif case == "missing_input":
    args[1] = tmp_path / "nowhere"
  elif case == "wrong_family":
    write_config(src, {"model_type": "bert"})
  elif case == "unreadable_safetensors":
    (src / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{cut")
  else:
    write_config(src, '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
  before = sorted(p.relative_to(out) for p in out.rglob("*"))
  p = convert(*args)
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
  assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("config", ['{"task": "pretrain"}', '{"model": {"d_model": "x"}}'])
def test_a_run_config_that_is_no_jaxlm_run_is_one_line(tmp_path, config):
  (tmp_path / "run" / "checkpoints" / "0" / "params").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text(config)  # was a KeyError or TypeError traceback
  with pytest.raises(hf.HFError, match=r"run/config.json: ") as e:
    runs.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_one_line_and_the_earlier_export_stays(tmp_path):
  m, params = tiny(0)
  hf.save_hf(m, params, str(tmp_path / "hf"))
  runs.import_hf(str(tmp_path / "hf"), str(tmp_path / "jx"))
  (tmp_path / "jx" / "checkpoints" / "0" / "params" / "manifest.ocdbt").write_bytes(b"")
  with pytest.raises(hf.HFError, match=r"jx/checkpoints/0: can't restore this checkpoint \(") as e:
    runs.export_hf(str(tmp_path / "jx"), str(tmp_path / "hf"))  # was orbax's traceback
  assert "\n" not in str(e.value) and len(str(e.value)) < 500
  assert same(hf.load_hf(str(tmp_path / "hf"))[1], params)


# ---------------------------------------------------------------------------------------
# Item 4: nothing a user gives runs on a TPU worker


def job(**kwargs):
  args = dict(name="my-v5p", zone="us-east5-a", accelerator="v5p-64", config="c.py",
              workdir="gs://bkt/runs/x")
  return tpu.Job(**{**args, **kwargs})


def test_an_injected_bucket_is_refused_before_any_command(capsys):
  with pytest.raises(tpu.TpuError, match=r"^--workdir: bucket name 'b;curl x\|sh;#' is not a "
                                         r"Cloud Storage bucket name"):
    job(workdir="gs://b;curl x|sh;#/run")
  assert capsys.readouterr().out == ""


@pytest.mark.parametrize("field, value, flag", [
    ("name", "My_TPU", "--tpu"), ("name", "-x", "--tpu"), ("name", "a" * 64, "--tpu"),
    ("name", "t;reboot", "--tpu"), ("zone", "z", "--zone"),
    ("zone", "us-east5-a --project=x", "--zone"), ("accelerator", "v5p-64;id", "--accelerator"),
    ("accelerator", "v5p", "--accelerator"), ("project", "p$(id)", "--project"),
    ("runtime_version", "v2 alpha", "--runtime_version"),
    ("workdir", "gs://ab/x", "--workdir"), ("workdir", "gs://" + "a" * 64 + "/x", "--workdir"),
    ("workdir", "gs://Bucket/x", "--workdir"), ("workdir", "gs://goog-b/x", "--workdir"),
    ("workdir", "gs://my-google-b/x", "--workdir"), ("workdir", "gs://192.168.5.4/x", "--workdir"),
    ("workdir", "gs://-ab/x", "--workdir"), ("workdir", "gs://ab_/x", "--workdir"),
    ("workdir", "gs:///x", "--workdir"), ("workdir", "/runs/a\nrm -rf ~", "--workdir"),
    ("overrides", ("--config.steps=1\ncurl x",), "--config.steps"),
])
def test_names_are_checked_against_their_documented_characters(field, value, flag):
  with pytest.raises(tpu.TpuError) as e:
    job(**{field: value})
  assert str(e.value).startswith(flag) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("field, value", [
    ("workdir", "gs://my_bucket-1/r"), ("workdir", "gs://data.example.com/r"),
    ("accelerator", "v5litepod-16"), ("accelerator", "v6e-8"), ("zone", "europe-west4-b"),
    ("project", "my-project-123"), ("project", "example.com:my-project"),
    ("runtime_version", "v2-alpha-tpuv5"), ("name", "a" * 63),
])
def test_documented_names_pass(field, value):
  job(**{field: value})


def tokens(command: str) -> list[str]:
  """A shell command's words, with its operators (&&, ;, |, parentheses, redirections)
  as separate tokens, as the worker's shell reads them."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def contains(words: list[str], part: list[str]) -> bool:
  return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


ODD = dict(config="configs/my cfg.py:preset=a b", workdir="gs://bkt/runs/it's \"x\" $HOME",
           overrides=("--config.data.train=/gcs/bkt/a b/'q\".jsonl",
                      "--config.name=$(touch pwned); `touch pwned2` & touch pwned3"))


def remote_commands(j) -> list[str]:
  """What every worker's shell runs: the --command of each ssh (unpack, setup, run, logs)."""
  cmds = (*tpu.copy(j, "/tmp/a.tgz"), *tpu.setup(j), *tpu.run(j), *tpu.logs(j))
  return [next(a for a in c if a.startswith("--command=")).removeprefix("--command=")
          for c in cmds if "ssh" in c]


def test_odd_paths_and_overrides_are_quoted_into_the_intended_argv():
  odd, plain = remote_commands(job(**ODD)), remote_commands(job())
  argv = ["~/jaxlm-venv/bin/python", "-m", "jaxlm.launch", "--config", ODD["config"],
          "--workdir", "/gcs/bkt/runs/it's \"x\" $HOME", "--config.progress=log",
          *ODD["overrides"]]
  assert contains(tokens(odd[2]), argv), tokens(odd[2])
  assert contains(tokens(odd[1]), ["gcsfuse", "--implicit-dirs", "bkt", "/gcs/bkt"])
  for mine, reference in zip(odd, plain):  # no user string adds an operator of its own
    operators = lambda c: [w for w in tokens(c) if set(w) <= set("();<>|&")]  # noqa: E731
    assert operators(mine) == operators(reference), mine


def test_the_run_command_gives_the_launcher_exactly_its_argv_in_a_real_shell(tmp_path):
  """The worker's run command, run by bash with a stand-in python that records its argv."""
  j = job(**ODD)
  venv = tmp_path / "jaxlm-venv" / "bin"
  venv.mkdir(parents=True)
  (tmp_path / "jaxlm").mkdir()
  fake = venv / "python"
  fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
  fake.chmod(0o755)
  command = remote_commands(j)[2]
  assert command.endswith(" &")
  command = command.removesuffix(" &")  # in the foreground here: nothing to wait for
  subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(tmp_path)},
                 check=True, timeout=60)
  assert json.loads((tmp_path / "argv.json").read_text()) == tpu.run_argv(j)
  assert (tmp_path / "jaxlm.exit").read_text().strip() == "0"
  assert not [p.name for p in (tmp_path / "jaxlm").iterdir()]  # no `touch pwned` ran


def test_watch_says_so_when_the_exit_file_holds_no_status():
  class Shell:
    dry_run, out = False, sys.stdout

    def __call__(self, cmd, capture=False):
      return "ACTIVE" if "describe" in cmd else "garbage"
  with pytest.raises(tpu.TpuError, match="holds 'garbage', not an exit status"):
    tpu.watch(job(), Shell(), ROOT, poll_s=0)
