"""Preference records: every format, every bad case, and the real HH-RLHF sample."""

import os

import pytest

from jaxlm.data import preference
from jaxlm.data.sft import read_records

HH = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Spain?"
      "\n\nAssistant: ")


def test_explicit_implicit_and_ranked_formats():
  p = preference.to_preference({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.",
                                "margin": 2})
  assert p.prompt == [("user", "Hi?")] and p.pairs == [("Hello.", "Go away.", 2)]
  convo = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
  p = preference.to_preference({"prompt": convo,
                                "chosen": [{"role": "assistant", "content": "Hello."}],
                                "rejected": [{"role": "assistant", "content": "No."}]})
  assert p.prompt == [("system", "Be kind."), ("user", "Hi?")]
  assert p.pairs == [("Hello.", "No.", None)]
  p = preference.to_preference({"chosen": HH + "Madrid.", "rejected": HH + "Lisbon."})
  assert p.prompt == [("user", "What is the capital of France?"), ("assistant", "Paris."),
                      ("user", "And of Spain?")]
  assert p.pairs == [("Madrid.", "Lisbon.", None)]
  answer = lambda text: convo + [{"role": "assistant", "content": text}]  # noqa: E731
  p = preference.to_preference({"chosen": answer("Hello."), "rejected": answer("No.")})
  assert p.prompt == [("system", "Be kind."), ("user", "Hi?")]
  p = preference.to_preference({"prompt": "Rank", "responses": ["a", "b", "c"]})
  assert p.prompt == [("user", "Rank")]  # the prompt once, for all three pairs
  assert [(c, r) for c, r, _ in p.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"prompt": "x", "chosen": "a"}, "missing_field"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "wrong_type"),
    ({"prompt": "x", "chosen": " ", "rejected": "b"}, "empty_response"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "wrong_type"),
    ({"chosen": HH + "Madrid.", "rejected": "\n\nHuman: Other?\n\nAssistant: Lisbon."},
     "no_shared_prompt"),
    ({"chosen": "plain text", "rejected": "other text"}, "wrong_type"),
    ({"prompt": "x", "responses": ["only one"]}, "wrong_type"),
    ({"responses": ["a", "b"]}, "missing_field"),
    ([1, 2], "wrong_type"),
])
def test_bad_records_have_a_reason(record, reason):
  assert preference.to_preference(record) == reason


def test_every_hh_rlhf_record_parses(shared_data):
  path = os.path.join(shared_data, "hh_rlhf_harmless_test.jsonl.gz")
  reasons, parsed = {}, 0
  for where, record in read_records(path):
    p = preference.to_preference(record)
    if isinstance(p, str):
      reasons[p] = reasons.get(p, 0) + 1
      continue
    parsed += 1
    assert p.prompt[-1][0] == "user" and len(p.pairs) == 1
  # Every record of the published file is a usable pair, but those whose two dialogues are
  # the same text (then identical_pair) or whose responses are empty.
  assert parsed + sum(reasons.values()) == 2312
  assert set(reasons) <= {"identical_pair", "empty_response"}, reasons
  assert parsed > 2200
