"""The main job (synthetic facts, held-out-paraphrase recall): its tokenized data, the compute-matched rank, and a
tiny end-to-end run that writes the report, JSON and plots."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from cli_assets import CHARACTERS, SPECIALS, char_tokenizer
from conftest import make_tiny_llama
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from peft_tree_lora.app import facts_data, facts_job
from peft_tree_lora.experiments.facts import (
    ATTRIBUTES,
    generate_people,
    held_out_template,
    prompt_and_answer,
    statement,
)

# The tiny Llama of conftest: hidden 32, SwiGLU 64, 2 layers, 4 query heads and 2 key/value heads of size 8.
HIDDEN, INTERMEDIATE, KV, LAYERS = 32, 64, 16, 2
# (in, out) of q, k, v, o, gate, up, down
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN)]
SHAPES += [(HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
LORA_PER_RANK = LAYERS * sum(i + o for i, o in SHAPES)  # 1,024
TOKEN_TREE_ACTIVE = LORA_PER_RANK + LAYERS * sum(3 * (i + 1) for i, _ in SHAPES)  # a leaf + 3 routers per module
TREE_ACTIVE = LORA_PER_RANK + LAYERS * 3 * (HIDDEN + 1)  # block routing (default): a leaf + 3 routers per block


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-facts-model")
    make_tiny_llama(max_position_embeddings=512).save_pretrained(folder)  # biographies are ~180 characters
    char_tokenizer().save_pretrained(folder)
    return folder


def merging_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """The character tokenizer plus BPE merges (which may cross a space, unlike a real word tokenizer)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# --- data -----------------------------------------------------------------------------------------------------


def test_query_answer_tokens_follow_the_prompt_exactly_as_in_a_document():
    tokenizer = merging_tokenizer([("o", "n"), ("a", "n")])  # multi-character tokens inside words
    people = generate_people(3, seed=1)
    queries = facts_data.recall_queries(tokenizer, people, held_out=True)
    start = facts_data.start_token(tokenizer)
    assert len(queries) == 3 * len(ATTRIBUTES)
    for (attribute, prompt_ids, answer_ids), (index, a) in zip(queries, [(i, a) for i in range(3) for a in range(4)]):
        person = people[index]
        assert attribute == ATTRIBUTES[a]
        prompt, answer = prompt_and_answer(person, attribute, held_out_template(index, a))
        assert prompt_ids[0] == start
        assert tokenizer.decode(prompt_ids[1:]) == " " + prompt
        assert tokenizer.decode(answer_ids) == " " + answer  # the value and its full stop, nothing of the prompt
        assert answer_ids[-1] == tokenizer.convert_tokens_to_ids(".")
        # prompt + answer are the ids of the whole statement as a document writes it
        template = held_out_template(index, a)
        assert prompt_ids[1:] + answer_ids == facts_data.encode(tokenizer, statement(person, attribute, template))


def test_query_refuses_a_token_across_the_prompt_answer_boundary():
    tokenizer = merging_tokenizer([("n", " ")])  # "born on 12 ..." -> the token "n " spans prompt and answer
    with pytest.raises(Exception, match="cannot split"):
        facts_data.query(tokenizer, "Ada Abbott was born on", "12 May 1960 .")


def test_seen_queries_are_in_training_documents_and_held_out_ones_never_are():
    tokenizer = char_tokenizer()
    people = generate_people(4, seed=2)
    blocks = facts_data.training_blocks(tokenizer, people, epochs=3, seed=0)
    held_blocks = facts_data.held_out_blocks(tokenizer, people)

    def contains(rows, needle):
        return any(
            row[i : i + len(needle)] == needle for row in rows.tolist() for i in range(len(row) - len(needle) + 1)
        )

    for held, seen in zip(
        facts_data.recall_queries(tokenizer, people, held_out=True),
        facts_data.recall_queries(tokenizer, people, held_out=False),
    ):
        assert contains(blocks, seen[1][1:] + seen[2])
        assert not contains(blocks, held[1][1:] + held[2])
        assert contains(held_blocks, held[1][1:] + held[2])


def test_a_biography_states_every_fact_once_in_a_trained_paraphrase_rotating_with_the_epoch():
    people = generate_people(5, seed=3)
    for index, person in enumerate(people):
        shown = set()
        for epoch in range(3):
            text = facts_data.biography(person, index, epoch, random.Random(epoch))
            for a, attribute in enumerate(ATTRIBUTES):
                hidden = statement(person, attribute, held_out_template(index, a))
                assert hidden not in text
                present = [
                    t for t in facts_data.trained_templates(index, a) if statement(person, attribute, t) in text
                ]
                assert len(present) == 1
                shown.add((a, present[0]))
        assert len(shown) == 3 * len(ATTRIBUTES)  # three epochs show all three trained paraphrases


# --- the compute-matched rank ---------------------------------------------------------------------------------


def test_compute_matched_rank_counts_the_tree_leaf_and_routers_per_token():
    model = make_tiny_llama()
    settings = facts_job.JobSettings(rank=1, depth=3, layers="all", routing="token")
    names = facts_job.target_modules("all-linear", model)
    counted = facts_job.compute_matched(facts_job.copies_of(model), settings, names, None)
    assert counted["lora_params_per_rank"] == LORA_PER_RANK == 1024
    assert counted["tree_active_per_token"] == TOKEN_TREE_ACTIVE == 2602
    assert counted["rank"] == 3  # 2 x 1024 < 2602 <= 3 x 1024
    assert facts_job.compute_matched_rank(2048, 1024) == 2 and facts_job.compute_matched_rank(2049, 1024) == 3


def test_block_routing_trees_count_one_router_per_block_and_get_a_smaller_matched_rank():
    """The job's --routing reaches the tree arm: a block-routed tree pays one tree of routers per block, not one
    per module, so it touches fewer parameters per token than the token-routed tree."""
    model = make_tiny_llama()
    names = facts_job.target_modules("all-linear", model)
    token_settings = facts_job.JobSettings(layers="all", routing="token")
    token = facts_job.compute_matched(facts_job.copies_of(model), token_settings, names, None)
    block = facts_job.compute_matched(facts_job.copies_of(model), facts_job.JobSettings(layers="all"), names, None)
    assert LORA_PER_RANK < block["tree_active_per_token"] == TREE_ACTIVE == 1222 < token["tree_active_per_token"]
    assert (block["rank"], token["rank"]) == (2, 3)
    tree_arm = facts_job.job_arms(1, 3, block["rank"], "block")[1]
    assert facts_job.adapter_config(tree_arm, names, None).routing == "block" and "block routing" in tree_arm.label


def test_an_unknown_routing_is_refused_naming_the_allowed_ones():
    with pytest.raises(facts_job.TreeLoraUsageError, match="--routing must be one of token, block, sequence"):
        facts_job.JobSettings(routing="tokens").validate()


@pytest.mark.parametrize(
    ("routing", "rank", "asked", "expected"),
    [("token", 1, None, 2.0), ("block", 1, None, 8.0), ("block", 8, None, 0.125), ("block", 8, 3.0, 3.0)],
)
def test_the_tree_routers_learn_at_the_asked_ratio_or_the_one_recommended_for_its_routing_and_rank(
    routing, rank, asked, expected
):
    from peft_tree_lora.app.facts_runs import _train_settings

    settings = facts_job.JobSettings(routing=routing, rank=rank, router_lr_ratio=asked)
    assert _train_settings(settings, steps=10, lr=0.01).router_lr_ratio == expected


def test_a_router_ratio_out_of_range_is_refused():
    with pytest.raises(facts_job.TreeLoraUsageError, match="--router-lr-ratio must be in"):
        facts_job.JobSettings(router_lr_ratio=0.0 - 1).validate()


# --- end to end -----------------------------------------------------------------------------------------------


def test_job_runs_end_to_end_and_writes_report_json_and_plots(model_folder, tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["--model", str(model_folder), "--output-dir", str(output), "--people", "4", "--epochs", "3"]
    arguments += ["--batch-size", "4", "--layers", "all", "--lr", "0.02"]
    assert facts_job.main(arguments) == 0
    printed = capsys.readouterr().out

    data = json.loads((output / "results.json").read_text())
    for key in ("command", "settings", "learning_rate", "compute_matched", "base_recall_held_out", "arms", "verdict"):
        assert key in data
    assert data["facts"] == 16 and data["learning_rate"] == 0.02
    assert data["compute_matched"] == {
        "tree_active_per_token": TREE_ACTIVE,
        "lora_params_per_rank": LORA_PER_RANK,
        "rank": 2,
    }
    arms = data["arms"]
    assert [arm["key"] for arm in arms] == ["lora_r1", "tree", "compute_matched", "lora_r8"]
    assert [(arm["kind"], arm["rank"]) for arm in arms] == [("lora", 1), ("tree", 1), ("lora", 2), ("lora", 8)]
    assert [arm["trainable_params"] for arm in arms][::2] == [LORA_PER_RANK, 2 * LORA_PER_RANK]
    assert arms[3]["trainable_params"] == 8 * LORA_PER_RANK
    assert arms[1]["active_params_per_token"] == TREE_ACTIVE
    assert arms[1]["leaf_usage"]
    for arm in arms:
        assert set(arm) >= {
            "recall_held_out",
            "recall_seen_paraphrase",
            "held_out_loss",
            "held_out_loss_curve",
            "active_params_per_token",
            "trainable_params",
            "train_seconds",
        }
        assert 0.0 <= arm["recall_held_out"] <= 1.0 and arm["steps"] == 3  # 12 documents / 4
        assert arm["held_out_loss_curve"][0][0] == 0 and arm["held_out_loss_curve"][-1][0] == 3
    # every arm trained from the same start on the same data: the same held-out loss at step 0
    assert len({arm["held_out_loss_curve"][0][2] for arm in arms}) == 1

    for name in ("recall.png", "heldout_loss.png", "leaf_usage_tree.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (output / "report.md").read_text()
    assert "LoRA r=2 (compute-matched)" in report and "| TreeLoRA d=3 r=1, block routing |" in report
    assert "![recall per arm](recall.png)" in report
    assert "block routing, hard training routing (trains the served function), routers at 8x" in report
    assert not [p for p in output.iterdir() if "partial" in p.name]

    # the console: one table, progress lines, no raw log dictionaries or nested evaluation bars
    assert "| LoRA r=8 |" in printed and "held-out recall" in printed
    assert "{'" not in printed and "eval_loss" not in printed
    assert printed.count("step    3/3") == 4

    # the folder is ours now: a second run needs --overwrite
    assert facts_job.main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_job_refuses_a_folder_with_other_files(model_folder, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert facts_job.main(["--model", str(model_folder), "--output-dir", str(tmp_path), "--overwrite"]) == 2
    assert "holds other files" in capsys.readouterr().err


def test_learning_rate_sweep_runs_on_validation_people_and_chooses_by_recall_then_loss(model_folder, tmp_path):
    output = tmp_path / "sweep"
    arguments = ["--model", str(model_folder), "-o", str(output), "--people", "2", "--validation-people", "2"]
    arguments += ["--epochs", "3", "--batch-size", "3", "--layers", "1", "--lr-sweep", "0.001,0.03", "--sweep-only"]
    assert facts_job.main(arguments) == 0
    data = json.loads((output / "results.json").read_text())
    selection = data["lr_selection"]
    assert data["arms"] == [] and selection["validation_people"] == 2
    assert [(row["lr"], row["arm"]) for row in selection["rows"]] == [
        (0.001, "LoRA r=1"),
        (0.001, "LoRA r=8"),
        (0.03, "LoRA r=1"),
        (0.03, "LoRA r=8"),
    ]

    def score(lr):
        rows = [row for row in selection["rows"] if row["lr"] == lr]
        return (sum(r["recall_held_out"] for r in rows), -sum(r["held_out_loss"] for r in rows))

    assert selection["chosen"] == max((0.001, 0.03), key=score) == data["learning_rate"]
    assert "validation people" in (output / "report.md").read_text()


def test_the_module_offers_the_cli_plugin_shape():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("facts")
    facts_job.configure_parser(sub)
    sub.set_defaults(handler=facts_job.run)
    args = parser.parse_args(["facts", "--people", "8", "--arms", "lora,wide"])
    assert args.handler is facts_job.run
    settings = facts_job.settings_from_args(args)
    assert settings.people == 8 and settings.arms == ["lora", "wide"] and settings.depth == 3
    with pytest.raises(Exception, match="--arms"):
        facts_job.settings_from_args(parser.parse_args(["facts", "--arms", "lora,nope"]))


def test_verdict_calls_small_differences_noise_and_checks_capacity():
    def arm(key, label, recall, seen=0.5):
        return {
            "key": key,
            "label": label,
            "recall_held_out": recall,
            "recall_seen_paraphrase": seen,
            "active_params_per_token": 1,
            "held_out_loss": 1.0,
        }

    data = {"settings": {"rank": 1, "depth": 3}, "facts": 400}
    data["arms"] = [arm("lora_r1", "LoRA r=1", 0.10), arm("tree", "T", 0.42), arm("compute_matched", "M", 0.40)]
    data["arms"].append(arm("lora_r8", "LoRA r=8", 0.30))
    lines = facts_job.verdict(data).splitlines()
    assert "this setting is capacity-bound" in lines[0]  # +20 points, 2 s.e. = 5.5 points on 400 facts
    assert "32.0% more held-out" in lines[1] and "noise" not in lines[1]
    assert "2.0% more (within noise" in lines[2]
    assert "12.0% more held-out" in lines[3] and "noise" not in lines[3]
    assert "No arm memorised every fact" in lines[4]
    data["arms"][3] = arm("lora_r8", "LoRA r=8", 0.13)
    assert "NOT clearly capacity-bound" in facts_job.verdict(data).splitlines()[0]
