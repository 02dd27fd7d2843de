"""Property-based checks (Hypothesis) of caption/question normalisation, the tokenizer and the config
override parser, with a few examples each; ``python -m tests.fault_campaign --properties N`` runs the same
properties with many more."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from tests.fault_campaign import properties  # noqa: E402
from tests.fault_campaign.properties import PROPERTIES, run_property, same, yaml_text  # noqa: E402

EXAMPLES = 25

@pytest.mark.parametrize("prop", [pytest.param(p, id=p.name) for p in PROPERTIES])
def test_property(prop):
    result = run_property(prop, EXAMPLES, seed=0)
    assert result.examples >= len(prop.examples) + 1
    assert result.passed, result.failure


def test_every_area_has_properties():
    assert {p.area for p in PROPERTIES} == {"text", "tokenizer", "config"}
    assert len({p.name for p in PROPERTIES}) == len(PROPERTIES)


def test_a_broken_normaliser_is_caught(monkeypatch):
    """The checks are not vacuous: a normaliser that only lower-cases fails them."""
    monkeypatch.setattr(properties, "pre_caption", lambda text, max_words=30: text.lower())
    by_name = {p.name: p for p in PROPERTIES}
    for name in ("caption_shape", "caption_truncation"):
        result = run_property(by_name[name], EXAMPLES, seed=0)
        assert not result.passed, name
        assert "AssertionError" in result.failure


def test_a_tokenizer_that_appends_sep_is_caught(monkeypatch):
    real = properties.demo_tokenizer()

    class AppendsSep:
        cls_token_id, sep_token_id, pad_token_id = real.cls_token_id, real.sep_token_id, real.pad_token_id

        def __len__(self) -> int:
            return len(real)

        def __call__(self, *args, **kwargs):
            encoded = real(*args, **kwargs)
            encoded["input_ids"] = encoded["input_ids"] + [real.sep_token_id]
            encoded["attention_mask"] = encoded["attention_mask"] + [1]
            return encoded

    monkeypatch.setattr(properties, "demo_tokenizer", AppendsSep)
    prop = next(p for p in PROPERTIES if p.name == "tokenizer_single")
    assert not run_property(prop, EXAMPLES, seed=0).passed


@pytest.mark.parametrize("value", [None, True, False, 0, -7, 2**70, 1e-05, -0.0, float("inf"), "", "yes", "1e-4",
                                   "null", "a'b\"c\\d", "\u00e9\U0001f600\x07", [1, [2, {"k": "v"}]],
                                   {"": 1, "a b": [None]}])
def test_yaml_text_round_trips_through_the_override_parser(value):
    from configs.loader import parse_value

    assert same(parse_value(yaml_text(value)), value)


def test_same_tells_types_apart():
    assert same({"a": [1, 2.0]}, {"a": [1, 2.0]})
    assert not same(True, 1) and not same(1, 1.0) and not same([1], (1,)) and not same({"a": 1}, {"b": 1})
