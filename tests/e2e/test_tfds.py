"""TFDS sources: a dataset prepared on disk (ArrayRecord) read as documents, end to end."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import STDLIB, small_config
from jaxlm import tasks
from jaxlm.validate import config_errors as validate
from jaxlm.errors import ConfigError
from jaxlm.data.sources import TfdsDocuments


def _files():
  return sorted(glob.glob(f"{STDLIB}/[a-f]*.py"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """The standard library's modules as a TFDS dataset `stdlib_modules` with two splits."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class StdlibModules(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "path": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      files = _files()
      return {"train": self._generate_examples(files[4:]),
              "test": self._generate_examples(files[:4])}

    def _generate_examples(self, files):
      for path in files:
        with open(path, encoding="utf-8") as f:
          yield path, {"text": f.read(), "path": path}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  StdlibModules(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_documents_are_the_prepared_records(tfds_dir):
  docs = TfdsDocuments("tfds:stdlib_modules:test", data_dir=tfds_dir, name="data.eval")
  expected = {open(p, encoding="utf-8").read() for p in _files()[:4]}
  assert len(docs) == 4 and docs.read == 4
  assert {docs[i] for i in range(len(docs))} == expected
  sliced = TfdsDocuments("tfds:stdlib_modules:1.0.0:train[:3]", data_dir=tfds_dir)
  assert len(sliced) == 3


@pytest.mark.parametrize("spec, field, message", [
    ("tfds:no_such_set:train", "text", "data.train='tfds:no_such_set:train': cannot open it in"),
    ("tfds:stdlib_modules:valid", "text", "Unknown split 'valid'"),
    ("tfds:stdlib_modules:train", "body", "data.text_field='body': not a Text feature of "
                                          "stdlib_modules (features: "),
])
def test_tfds_problems_are_one_line_naming_the_key(tfds_dir, spec, field, message):
  with pytest.raises(ConfigError) as e:
    TfdsDocuments(spec, text_field=field, data_dir=tfds_dir, name="data.train")
  assert message in str(e.value) and "\n" not in str(e.value)


def test_tfds_spec_syntax_is_checked_before_anything_runs():
  errors = validate(small_config(**{"data.train": "tfds:stdlib_modules"}), num_devices=8)
  assert any("data.train='tfds:stdlib_modules': a TFDS source is one "
             "tfds:NAME[:VERSION]:SPLIT" in e for e in errors), errors


def test_pretraining_reads_a_tfds_dataset(tfds_dir, tmp_path):
  config = small_config(**{"data.train": "tfds:stdlib_modules:train",
                           "data.eval": "tfds:stdlib_modules:test",
                           "data.tfds_data_dir": tfds_dir, "steps": 4, "eval_every": 4})
  assert validate(config, num_devices=8) == []
  tasks.run(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert np.isfinite([r["eval_loss"] for r in records if "eval_loss" in r]).all()
  assert os.path.exists(tmp_path / "tokenizer.model")  # trained on the TFDS text


def test_prepare_reads_a_tfds_source(tfds_dir, tmp_path):
  from jaxlm.data import prepare
  c = prepare.default_config()
  c.tfds_data_dir = tfds_dir
  c.sources.stdlib = prepare.source_config("tfds:stdlib_modules:test", filters="none")
  c.workers, c.tokenizer.vocab_size = 1, 400
  stats = prepare.prepare(c, str(tmp_path), progress=False)
  assert stats["stdlib"]["read"] == 4 and stats["stdlib"]["kept"] == 4
