"""Weights & Biases as an optional logger: offline, no network, the same scalars as
metrics.jsonl and the resolved config, one W&B run across a resume."""

import glob
import json
import os
import struct

import pytest

from conftest import small_config
from jaxlm import metrics, tasks

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


def _records(path):
  """The protobuf records of a W&B transaction log (`run-ID.wandb`): a 7-byte header,
  then 32 KiB blocks of chunks (crc, length, type: full, first, middle, last)."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, part, raw = 7, 32768, b"", []
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:  # zero padding at the end of a block
      pos += left
      continue
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 1:
      raw.append(chunk)
    elif kind == 2:
      part = chunk
    elif kind == 3:
      part += chunk
    else:
      raw.append(part + chunk)
  for r in raw:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(r)
    yield record


def _logged(run_file):
  history, config = {}, {}
  for r in _records(run_file):
    kind = r.WhichOneof("record_type")
    if kind == "history":
      items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
               for i in r.history.item}
      history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    elif kind == "run":
      config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
    elif kind == "config":
      config.update({u.key: json.loads(u.value_json) for u in r.config.update})
  return history, config


def test_offline_wandb_gets_the_scalars_and_config_and_a_resume_continues_it(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_MODE", raising=False)
  overrides = {"logging.wandb_project": "jaxlm-test", "logging.wandb_mode": "offline",
               "steps": 4, "eval_every": 2, "checkpoint_every": 2}
  workdir = str(tmp_path / "run")
  tasks.run(small_config(**overrides), workdir)
  run_id = open(os.path.join(workdir, metrics.WANDB_RUN_ID_FILE)).read().strip()
  (first,) = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}",
                                    f"run-{run_id}.wandb"))
  history, config = _logged(first)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  want = {}  # every scalar metrics.jsonl has, at its step (train and eval rows merged)
  for r in records:
    want.setdefault(r["step"], {}).update(
        {k: v for k, v in r.items() if k != "step" and v is not None})
  assert sorted(history) == sorted(want)
  for step, scalars in want.items():
    assert history[step] == pytest.approx(scalars), step
  assert config["model"]["d_model"] == 64 and config["steps"] == 4
  assert config["logging"]["wandb_project"] == "jaxlm-test"

  tasks.run(small_config(**{**overrides, "steps": 6}), workdir)  # resumes from step 4
  again = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}", "*.wandb"))
  assert len(again) == 2  # the same W&B run id, continued
  resumed = max(again, key=os.path.getmtime)
  assert sorted(_logged(resumed)[0]) == [5, 6]
