"""BERT WordPiece tokenizer; as in the original, single sequences get ``[CLS]`` but no trailing ``[SEP]``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tokenizers.processors import TemplateProcessing
from transformers import BertTokenizer, PreTrainedTokenizerBase

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _apply_simla_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    cls_token, sep_token = tokenizer.cls_token, tokenizer.sep_token
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no fast backend; a fast BERT tokenizer is required")
    backend.post_processor = TemplateProcessing(
        single=f"{cls_token} $A",
        pair=f"{cls_token} $A {sep_token} $B {sep_token}",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
    )
    return tokenizer


def _check(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    for token in SPECIAL_TOKENS:
        if token not in tokenizer.get_vocab():
            raise ValueError(f"vocabulary from {source} has no {token} token")
    if tokenizer.vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocabulary from {source} has only {tokenizer.vocab_size} entries; "
                         "the vocabulary file was not read")
    return tokenizer


def tokenizer_from_tokens(tokens: Sequence[str], do_lower_case: bool = True,
                          source: str = "a token list") -> PreTrainedTokenizerBase:
    """Build the tokenizer from a vocabulary given as a list (token id = list index)."""
    missing = [token for token in SPECIAL_TOKENS if token not in tokens]
    if missing:
        raise ValueError(f"vocabulary from {source} has no {missing[0]} token")
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=do_lower_case)
    return _apply_simla_template(_check(tokenizer, source))


def build_tokenizer(name_or_path: str, do_lower_case: bool = True) -> PreTrainedTokenizerBase:
    """Tokenizer from a ``vocab.txt`` file, a folder holding one, or a Hugging Face hub name."""
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as handle:
            tokens = [line.rstrip("\n") for line in handle]
        while tokens and tokens[-1] == "":
            tokens.pop()
        return tokenizer_from_tokens(tokens, do_lower_case, source=name_or_path)
    if os.path.isdir(name_or_path) and not any(
        os.path.isfile(os.path.join(name_or_path, f)) for f in ("vocab.txt", "tokenizer.json")
    ):
        raise FileNotFoundError(f"tokenizer folder {name_or_path} holds neither vocab.txt nor tokenizer.json")
    if not os.path.isdir(name_or_path):
        from huggingface_hub import hf_hub_download

        try:  # one file first: offline, from_pretrained retries every file for minutes
            hf_hub_download(name_or_path, "vocab.txt")
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"could not load the tokenizer {name_or_path!r} (not a local file or folder, "
                                    f"and the hub download failed: {type(exc).__name__}: {exc}). Give "
                                    "--text_encoder a vocab.txt or a local folder holding one") from exc
    try:
        tokenizer = BertTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        raise FileNotFoundError(f"could not load the tokenizer {name_or_path!r}: {exc}") from exc
    return _apply_simla_template(_check(tokenizer, name_or_path))
