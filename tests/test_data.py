"""Loading text and cutting it into token blocks."""

from __future__ import annotations

import json

import pytest
from cli_assets import char_tokenizer

from peft_tree_lora.app.data import load_corpus, split_by_name, tokenize_blocks
from peft_tree_lora.tuner.errors import TreeLoraUsageError


def test_jsonl_records_are_read_from_their_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i}", "id": i}) for i in range(200)) + "\n")
    corpus = load_corpus(str(path))
    assert sorted(corpus.train + corpus.held_out) == sorted(f"record {i}" for i in range(200))
    assert corpus.train and corpus.held_out


@pytest.mark.parametrize("line, problem", [('{"title": "no text"}', "has no text"), ("not json", "is not JSON")])
def test_jsonl_without_text_is_refused_naming_the_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(TreeLoraUsageError, match=f"line 2 {problem}"):
        load_corpus(str(path))


def test_a_short_single_document_is_split_at_its_end():
    corpus = split_by_name([("only", "line\n" * 100)], "one file")
    assert corpus.train[0] + corpus.held_out[0] == "line\n" * 100
    assert 0 < len(corpus.held_out[0]) < len(corpus.train[0])


def test_split_depends_on_names_not_on_order():
    named = [(f"doc{i}", f"text {i}") for i in range(300)]
    forward, backward = split_by_name(named, "x"), split_by_name(named[::-1], "x")
    assert sorted(forward.held_out) == sorted(backward.held_out)


def test_blocks_are_full_and_documents_end_with_eos():
    tokenizer = char_tokenizer()
    blocks = tokenize_blocks(tokenizer, ["abc", "de"], block_length=3)  # a b c </s> d e </s>: the ragged tail goes
    assert blocks.tolist() == [tokenizer("abc")["input_ids"], [tokenizer.eos_token_id, *tokenizer("de")["input_ids"]]]


def test_blocks_stop_at_max_blocks():
    assert tokenize_blocks(char_tokenizer(), ["x" * 100] * 10, block_length=8, max_blocks=5).shape == (5, 8)
