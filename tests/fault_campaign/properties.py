"""Property checks of caption/question normalisation, the WordPiece tokenizer and the config override parser.

Each :class:`Property` pairs Hypothesis strategies with a check function that raises ``AssertionError``
when the property does not hold. The fault campaign (:mod:`tests.fault_campaign`) runs them with many
examples; ``tests/test_properties.py`` runs the same checks with a few examples each.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from configs.loader import ConfigError, apply_overrides, load_config, save_config
from dataset.text import pre_caption, pre_question

REPO = Path(__file__).resolve().parents[2]
DEMO_VOCAB = REPO / "configs" / "demo_vocab.txt"

# characters the normalisation treats specially, mixed into arbitrary unicode so that they occur often
_SPECIAL_TEXT = list(",.'!?\"()*#:;~-/<> \t\n\r\x0b\x0c\x85\u00a0\u2028\u3000") + ["<person>", "<PERSON>", "[SEP]"]
DELETED_PUNCTUATION = set(",.'!?\"()*#:;~")

TEXT = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(_SPECIAL_TEXT)), max_size=60).map("".join)
MAX_WORDS = st.integers(min_value=1, max_value=40)


@dataclass(frozen=True)
class Property:
    """One property: ``check(**drawn)`` must pass for every draw of ``strategies`` and for each of the
    explicit ``examples`` (edge cases that are always tried first)."""

    name: str
    area: str
    description: str
    strategies: dict[str, st.SearchStrategy]
    check: Callable[..., None]
    examples: tuple[dict[str, Any], ...] = ()


@dataclass
class PropertyResult:
    """Outcome of running one property: how many examples ran and the failure, if any."""

    name: str
    area: str
    examples: int
    failure: str | None

    @property
    def passed(self) -> bool:
        return self.failure is None


# --------------------------------------------------------------------------------------------------------
# caption and question normalisation
# --------------------------------------------------------------------------------------------------------


def check_caption_shape(text: str, max_words: int) -> None:
    """``pre_caption`` never fails and returns lower-case text without the deleted punctuation, hyphens,
    slashes, runs of whitespace or leading/trailing spaces, in at most ``max_words`` words."""
    out = pre_caption(text, max_words)
    assert isinstance(out, str)
    assert out == out.lower(), f"not lower-case: {out!r}"
    assert not out.startswith(" ") and not out.endswith(" "), f"leading/trailing space: {out!r}"
    assert len(out.split(" ")) <= max_words, f"{len(out.split(' '))} words > {max_words}: {out!r}"
    assert not DELETED_PUNCTUATION & set(out), f"punctuation left: {out!r}"
    assert "-" not in out and "/" not in out, f"hyphen or slash left: {out!r}"
    assert not re.search(r"\s\s", out), f"whitespace run left: {out!r}"


def check_caption_idempotent(text: str, max_words: int) -> None:
    """Normalising a normalised caption changes nothing, except where removing punctuation or
    replacing ``<person>`` formed a new ``<person>`` (``<<person>>`` needs two passes, as in the original)."""
    out = pre_caption(text, max_words)
    if "<person>" not in out:
        assert pre_caption(out, max_words) == out, f"{text!r} -> {out!r} -> {pre_caption(out, max_words)!r}"


def check_caption_truncation(text: str, max_words: int) -> None:
    """Truncation keeps the first ``max_words`` words of the untruncated normalisation."""
    full = pre_caption(text, 10**9)
    assert pre_caption(text, max_words) == " ".join(full.split(" ")[:max_words])


def check_question_shape(text: str, max_words: int) -> None:
    """``pre_question`` never fails; its output is lower-case, without the deleted punctuation, hyphens or
    slashes, and is the first ``max_words`` words of an untruncated form that has no trailing space.

    Leading spaces and inner runs of spaces are kept (the original does so), so a truncated question
    can end with a space when the cut falls after an empty word.
    """
    out = pre_question(text, max_words)
    full = pre_question(text, 10**9)
    assert out == out.lower(), f"not lower-case: {out!r}"
    assert not DELETED_PUNCTUATION & set(out), f"punctuation left: {out!r}"
    assert "-" not in out and "/" not in out, f"hyphen or slash left: {out!r}"
    assert not full.endswith(" "), f"trailing space: {full!r}"
    assert out == " ".join(full.split(" ")[:max_words]), f"{out!r} is not a prefix of {full!r}"
    assert len(out.split(" ")) <= max_words


def check_question_idempotent(text: str, max_words: int) -> None:
    """Normalising a normalised question changes nothing unless truncation left a trailing space."""
    out = pre_question(text, max_words)
    if not out.endswith(" "):
        assert pre_question(out, max_words) == out, f"{text!r} -> {out!r} -> {pre_question(out, max_words)!r}"


def check_empty_text(blank: str, max_words: int) -> None:
    """Empty text, or text made only of deleted punctuation and spaces, normalises to the empty string."""
    assert pre_caption("", max_words) == "" and pre_question("", max_words) == ""
    assert pre_caption(blank, max_words) == "", repr(pre_caption(blank, max_words))
    assert pre_question(blank, max_words).strip(" ") == "", repr(pre_question(blank, max_words))


# --------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def demo_tokenizer() -> Any:
    """The tokenizer of the demo vocabulary (built once)."""
    from models.tokenization import build_tokenizer

    return build_tokenizer(str(DEMO_VOCAB))


def _check_ids(ids: list[int]) -> None:
    tokenizer = demo_tokenizer()
    bad = [i for i in ids if not 0 <= i < len(tokenizer)]
    assert not bad, f"ids outside the vocabulary of {len(tokenizer)}: {bad}"


def check_tokenizer_single(text: str, max_length: int) -> None:
    """One text: ``[CLS]`` first, no ``[SEP]`` appended (the original's single-text convention), ids inside
    the vocabulary, an all-ones mask, and truncation keeps the first ``max_length`` ids of the full encoding."""
    tokenizer = demo_tokenizer()
    full = tokenizer(text)["input_ids"]
    encoded = tokenizer(text, truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.cls_token_id, ids
    assert len(ids) <= max_length, f"{len(ids)} ids > max_length {max_length}"
    assert ids == full[:max_length], f"truncated {ids} is not a prefix of {full}"
    assert encoded["attention_mask"] == [1] * len(ids)
    _check_ids(full)
    if "[SEP]" not in text:
        assert tokenizer.sep_token_id not in full, f"[SEP] in the encoding of {text!r}: {full}"
    if "[CLS]" not in text:
        assert full.count(tokenizer.cls_token_id) == 1, full


def check_tokenizer_padding(texts: list[str], max_length: int, pad_to_max: bool) -> None:
    """A padded batch: every row is its text's own encoding, then ``[PAD]`` ids where the mask is 0."""
    tokenizer = demo_tokenizer()
    padding = "max_length" if pad_to_max else "longest"
    batch = tokenizer(texts, padding=padding, truncation=True, max_length=max_length)
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    width = max_length if pad_to_max else max(len(row) for row in rows)
    for text, row, ids, mask in zip(texts, rows, batch["input_ids"], batch["attention_mask"]):
        n = len(row)
        assert len(ids) == len(mask) == width, (text, ids, mask)
        assert mask == [1] * n + [0] * (width - n), (text, mask)
        assert ids[:n] == row and all(i == tokenizer.pad_token_id for i in ids[n:]), (text, ids, row)
        _check_ids(ids)


def check_tokenizer_pair(first: str, second: str) -> None:
    """A text pair is ``[CLS] A [SEP] B [SEP]``: it ends with ``[SEP]`` when not truncated.

    (An empty second text makes the call a single-text one, as in any Hugging Face tokenizer.)
    """
    tokenizer = demo_tokenizer()
    ids = tokenizer(first, second)["input_ids"]
    a = tokenizer(first)["input_ids"][1:]
    b = tokenizer(second)["input_ids"][1:]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids == [cls, *a, sep, *b, sep], (first, second, ids)


# --------------------------------------------------------------------------------------------------------
# config overrides
# --------------------------------------------------------------------------------------------------------


def _key_ok(key: str) -> bool:
    return bool(key) and key[0] not in "+~" and not any(c.isspace() for c in key)


KEY = st.text(st.characters(codec="utf-8", exclude_characters=".="), min_size=1, max_size=12).filter(_key_ok)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
# override values the YAML parser must refuse
BAD_YAML = ("[1, 2", "{a: 1", "'open", '"open', "a: b: c", "@x", "`x", "*alias", "[a, {b]", "{a: [1}",
            "!!python/object/apply:os.system ['true']", "- a\n- b: c: d", "%TAG", "? [", "x: 'a")


def _double_quoted(text: str) -> str:
    """A YAML double-quoted scalar: printable ASCII as it is, everything else as an escape."""
    parts = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            parts.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            parts.append(char)
        elif code <= 0xFF:
            parts.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    return '"' + "".join(parts) + '"'


def yaml_text(value: Any) -> str:
    """Flow-style YAML text of a value (plain scalars, quoted strings, flow lists and mappings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        return _double_quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_text(str(k))}: {yaml_text(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no YAML form for {type(value).__name__}")


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (``True`` is not ``1``; ``1`` is not ``1.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _names(message: str, override: str, key: str) -> bool:
    return override in message or repr(override) in message or (bool(key) and f"'{key}'" in message)


def check_override_set(key: str, old: Any, value: Any) -> None:
    """``key=value`` changes an existing key to exactly the YAML value (type included)."""
    config = {key: old, "untouched": [1, "two"]}
    apply_overrides(config, [f"{key}={yaml_text(value)}"])
    assert same(config[key], value), f"{key}={yaml_text(value)} gave {config[key]!r}, expected {value!r}"
    assert same(config["untouched"], [1, "two"])


def check_override_nested(section: str, key: str, value: Any) -> None:
    """``section.key=value`` reaches into a section; ``+section.new=value`` adds to it."""
    config = {section: {key: 0}}
    apply_overrides(config, [f"{section}.{key}={yaml_text(value)}", f"+{section}.{key}_new={yaml_text(value)}"])
    assert same(config[section][key], value) and same(config[section][f"{key}_new"], value), config


def check_override_add_delete(key: str, value: Any) -> None:
    """``+key`` adds a missing key and refuses an existing one; ``++key`` adds or changes; ``~key`` deletes
    and refuses a missing key; every refusal is a ConfigError naming the key."""
    text = yaml_text(value)
    config: dict[str, Any] = {}
    apply_overrides(config, [f"+{key}={text}"])
    assert same(config, {key: value}), config
    for override in (f"+{key}={text}", f"~{key}_missing", f"{key}_missing={text}"):
        try:
            apply_overrides(config, [override])
        except ConfigError as exc:
            assert _names(str(exc), override, key if override.startswith("+") else f"{key}_missing"), str(exc)
        else:
            raise AssertionError(f"{override!r} was accepted")
    apply_overrides(config, [f"++{key}=1", f"++{key}_2={text}"])
    assert same(config, {key: 1, f"{key}_2": value}), config
    apply_overrides(config, [f"~{key}", f"~{key}_2={text}"])
    assert config == {}, config


def _malformed(draw: Callable[[st.SearchStrategy], Any]) -> tuple[str, str]:
    key = draw(KEY)
    other = draw(KEY)
    kind = draw(st.sampled_from(("no_equals", "empty_key", "empty_part", "space_in_key", "missing_key",
                                 "bad_value", "add_existing", "not_a_mapping")))
    forms = {
        "no_equals": (key, key),
        "empty_key": ("=" + draw(st.text(max_size=5)), ""),
        "empty_part": (draw(st.sampled_from((f"{key}..{other}=1", f".{key}=1", f"{key}.=1"))), key),
        "space_in_key": (f"{key} {other}=1", key),
        "missing_key": (f"{key}_missing=1", f"{key}_missing"),
        "bad_value": (f"present={draw(st.sampled_from(BAD_YAML))}", "present"),
        "add_existing": ("+present=1", "present"),
        "not_a_mapping": (f"present.{key}=1", "present"),
    }
    return forms[kind]


MALFORMED = st.composite(_malformed)()


def check_override_malformed(case: tuple[str, str]) -> None:
    """A malformed override raises ConfigError whose message names the override (or its key)."""
    override, key = case
    try:
        apply_overrides({"present": 3}, [override], source="demo.yaml")
    except ConfigError as exc:
        assert _names(str(exc), override, key), f"the error for {override!r} does not name it: {exc}"
    else:
        raise AssertionError(f"malformed override {override!r} was accepted")


def check_override_never_crashes(override: str) -> None:
    """Any override string either applies or raises ConfigError (never another exception type)."""
    config = {"present": 3, "section": {"inner": [1, 2]}, "flag": True}
    try:
        apply_overrides(config, [override])
    except ConfigError:
        pass


def check_config_round_trip(config: dict[str, Any]) -> None:
    """``save_config`` then ``load_config`` gives back the same values and types."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_config(config, folder)
        loaded = load_config(path)
    assert same(loaded, config), f"{config!r} came back as {loaded!r}"


CONFIGS = st.dictionaries(st.text(min_size=1, max_size=10), VALUES, min_size=1, max_size=5)
OVERRIDE_TEXT = st.lists(st.one_of(st.characters(codec="utf-8"),
                                   st.sampled_from([*"+~=.[]{}:,'\" ", "present", "section", "inner", "flag"])),
                         max_size=20).map("".join)

PROPERTIES: tuple[Property, ...] = (
    Property("caption_shape", "text", "pre_caption: lower-case, no punctuation/space runs, <= max_words",
             {"text": TEXT, "max_words": MAX_WORDS}, check_caption_shape),
    Property("caption_idempotent", "text", "pre_caption(pre_caption(x)) == pre_caption(x)",
             {"text": TEXT, "max_words": MAX_WORDS}, check_caption_idempotent,
             ({"text": "<<PERSON>> and <person>", "max_words": 30}, {"text": " A - B / C.\n", "max_words": 2})),
    Property("caption_truncation", "text", "pre_caption keeps the first max_words words",
             {"text": TEXT, "max_words": MAX_WORDS}, check_caption_truncation),
    Property("question_shape", "text", "pre_question: lower-case, no punctuation, first max_words words",
             {"text": TEXT, "max_words": MAX_WORDS}, check_question_shape,
             ({"text": "  what  is, it?  ", "max_words": 2}, {"text": "a  b c", "max_words": 2})),
    Property("question_idempotent", "text", "pre_question(pre_question(x)) == pre_question(x)",
             {"text": TEXT, "max_words": MAX_WORDS}, check_question_idempotent),
    Property("empty_text", "text", "empty or punctuation-only text normalises to ''",
             {"blank": st.text(st.sampled_from(sorted(DELETED_PUNCTUATION) + [" ", "-", "/"]), max_size=20),
              "max_words": MAX_WORDS}, check_empty_text),
    Property("tokenizer_single", "tokenizer", "[CLS] first, no [SEP] added, ids in vocab, truncation",
             {"text": TEXT, "max_length": st.integers(min_value=1, max_value=40)}, check_tokenizer_single,
             ({"text": "", "max_length": 1}, {"text": "yes [SEP]", "max_length": 40},
              {"text": "\u00e9t\u00e9 \U0001f600 \x00", "max_length": 3})),
    Property("tokenizer_padding", "tokenizer", "padded rows = own encoding + [PAD] where mask is 0",
             {"texts": st.lists(TEXT, min_size=1, max_size=4), "max_length": st.integers(1, 40),
              "pad_to_max": st.booleans()}, check_tokenizer_padding),
    Property("tokenizer_pair", "tokenizer", "pairs are [CLS] A [SEP] B [SEP]",
             {"first": st.text(st.characters(codec="utf-8", exclude_characters="["), max_size=40),
              "second": st.text(st.characters(codec="utf-8", exclude_characters="["), min_size=1, max_size=40)},
             check_tokenizer_pair),
    Property("override_set", "config", "key=value round-trips every YAML type",
             {"key": KEY, "old": VALUES, "value": VALUES}, check_override_set,
             ({"key": "lr", "old": 1e-4, "value": 2e-05}, {"key": "flag", "old": 1, "value": True},
              {"key": "name", "old": None, "value": "yes"}, {"key": "x", "old": 0, "value": "1e-4"})),
    Property("override_nested", "config", "a.b=value and +a.new=value",
             {"section": KEY, "key": KEY, "value": VALUES}, check_override_nested),
    Property("override_add_delete", "config", "+key, ++key, ~key and their refusals",
             {"key": KEY, "value": VALUES}, check_override_add_delete),
    Property("override_malformed", "config", "malformed overrides: ConfigError naming the override",
             {"case": MALFORMED}, check_override_malformed,
             ({"case": ("present=[1, 2", "present")}, {"case": ("present", "present")})),
    Property("override_never_crashes", "config", "any override: applied or ConfigError",
             {"override": OVERRIDE_TEXT}, check_override_never_crashes),
    Property("config_round_trip", "config", "save_config then load_config keeps values and types",
             {"config": CONFIGS}, check_config_round_trip,
             ({"config": {"lr": 1e-05, "name": "yes", "list": [None, True, "1.0"]}},
              {"config": {"text": "a\x85b"}})),
)


def _failure_text(exc: BaseException) -> str:
    notes = [note for note in getattr(exc, "__notes__", []) if "Falsifying" in note or "(" in note]
    detail = f"{type(exc).__name__}: {exc}"
    if notes:
        detail += " | " + " ".join(notes)
    return detail[:2000]


def run_property(prop: Property, max_examples: int, seed: int | None = 0) -> PropertyResult:
    """Check the explicit examples, then up to ``max_examples`` generated ones (reproducible for ``seed``);
    every failure found is reported (the generated search is not cut short by a failing explicit example)."""
    calls = 0
    failures: list[str] = []
    for case in prop.examples:
        calls += 1
        try:
            prop.check(**case)
        except Exception as exc:  # noqa: BLE001 - a failing property is reported, not raised
            failures.append(f"explicit example {case!r}: {type(exc).__name__}: {exc}"[:2000])

    def body(**drawn: Any) -> None:
        nonlocal calls
        calls += 1
        prop.check(**drawn)

    test = given(**prop.strategies)(body)
    test = settings(max_examples=max_examples, database=None, deadline=None, print_blob=False,
                    report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Exception as exc:  # noqa: BLE001 - a failing property is reported, not raised
        failures.append(_failure_text(exc))
    return PropertyResult(prop.name, prop.area, calls, " || ".join(failures) or None)


def run_properties(max_examples: int, seed: int | None = 0,
                   names: Iterable[str] | None = None) -> list[PropertyResult]:
    """Run every property (or those named) with ``max_examples`` examples each."""
    wanted = set(names) if names is not None else None
    return [run_property(prop, max_examples, seed) for prop in PROPERTIES if wanted is None or prop.name in wanted]
