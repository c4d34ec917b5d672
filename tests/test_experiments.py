"""The two studies behind docs/RESULTS.md: their building blocks, and tiny end-to-end runs through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from peft import get_peft_model

from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.app.cli import main as cli_main
from peft_tree_lora.experiments.facts import (
    ATTRIBUTES,
    TEMPLATES,
    WordTokenizer,
    answers_correct,
    exact_match,
    fano_bits,
    generate_people,
    held_out_template,
    merge_results,
    prompt_and_answer,
    recall_queries,
    training_statements,
)
from peft_tree_lora.experiments.results_page import NOTES_BEGIN, NOTES_END
from peft_tree_lora.experiments.saturation import plateau_reached


def test_facts_generator_is_deterministic_per_seed():
    assert generate_people(30, seed=3) == generate_people(30, seed=3)
    assert generate_people(30, seed=3) != generate_people(30, seed=4)


def test_background_and_study_people_never_share_a_name():
    background = {p.name for p in generate_people(100, seed=0)}
    study = {p.name for p in generate_people(200, seed=0, skip=100)}
    assert len(study) == 200 and not background & study


def test_held_out_paraphrase_is_never_trained_for_its_person_but_is_for_others():
    people = generate_people(8, seed=0)
    for index, person in enumerate(people):
        trained = set(training_statements(person, index))
        assert len(trained) == sum(len(t) - 1 for t in TEMPLATES.values())
        for a, attribute in enumerate(ATTRIBUTES):
            hidden = held_out_template(index, a)
            prompt, answer = prompt_and_answer(person, attribute, hidden)
            assert f"{prompt} {answer}" not in trained
            others = [i for i in range(len(people)) if held_out_template(i, a) != hidden]
            assert others, "every held-out template must be a training template for some other person"


def test_recall_queries_ask_for_the_value_and_full_stop():
    tokenizer = WordTokenizer()
    person = generate_people(1, seed=5)[0]
    queries = recall_queries(tokenizer, [person])
    assert [q[0] for q in queries] == list(ATTRIBUTES)
    attribute, prompt, answer = queries[0]
    assert prompt[0] == tokenizer.eos_token_id
    assert tokenizer.decode(answer) == f"{person.facts[attribute]} ."
    assert person.name in tokenizer.decode(prompt)


def test_answers_correct_requires_every_answer_token():
    vocab = 5
    input_ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    answer_mask = torch.tensor([[False, False, True, True], [False, False, True, True]])
    logits = torch.zeros(2, 4, vocab)
    logits[0, 1, 2] = logits[0, 2, 3] = 1.0  # row 0 predicts 2 then 3: right
    logits[1, 1, 2] = logits[1, 2, 4] = 1.0  # row 1 gets the last answer token wrong
    logits[:, 0, 4] = 1.0  # a wrong prediction outside the answer does not count
    assert answers_correct(logits, input_ids, answer_mask).tolist() == [True, False]


@pytest.mark.parametrize("routing", ["plain", "token", "sequence"])
def test_exact_match_agrees_with_greedy_generate(routing):
    model = make_tiny_llama(seed=2)
    if routing != "plain":
        config = TreeLoraConfig(depth=2, r=2, target_modules="all-linear", routing=routing, init_lora_weights=False)
        model = get_peft_model(model, config)
    model.eval()
    prompts = [[5, 9, 12, 7], [30, 31, 2, 40, 41], [60, 3, 3]]
    queries = []
    for prompt in prompts:
        generated = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None
        )
        greedy = generated[0, len(prompt) :].tolist()
        wrong = greedy[:-1] + [(greedy[-1] + 1) % 96]
        queries += [("x", prompt, greedy), ("x", prompt, wrong)]
    assert exact_match(model, queries, pad=0) == [True, False] * len(prompts)


def test_fano_bits_is_zero_at_chance_and_log2_values_when_perfect():
    assert fano_bits(1.0, 48) == pytest.approx(math.log2(48))
    assert fano_bits(1 / 48, 48) == pytest.approx(0.0, abs=1e-9)
    assert 0 < fano_bits(0.5, 48) < math.log2(48)


def test_plateau_criterion():
    assert not plateau_reached([5.0, 4.0, 3.0], patience=2, min_improvement=0.01)
    assert plateau_reached([5.0, 3.0, 2.99, 2.995], patience=2, min_improvement=0.01)
    assert not plateau_reached([5.0, 3.0, 2.9, 2.95], patience=2, min_improvement=0.01)


TINY_MODEL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--intermediate", "32"]


def test_saturation_study_runs_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox {i} jumps over the lazy dog." for i in range(80))
    )
    out = tmp_path / "results"
    status = cli_main(
        ["experiment", "saturation", *TINY_MODEL, "--data", str(corpus), "--block-length", "16", "--batch-size", "4"]
        + ["--max-pretrain-steps", "6", "--continue-steps", "4", "--eval-every", "2", "--warmup-steps", "1"]
        + ["--eval-blocks", "4", "--rank", "1", "--depth", "1", "--out", str(out), "--quiet"]
    )
    assert status == 0
    data = json.loads((out / "saturation.json").read_text())
    assert (out / "saturation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data["runs"]) == {"full", "lora1", "tree_token", "tree_sequence", "lora2"}
    start = data["pretrain"]["tokens"]
    for runs in data["runs"].values():
        curve = runs[0]["curve"]
        assert curve[0][1] == start and curve[-1][1] == start + data["continue_tokens"]
    counts = {key: runs[0]["trainable_params"] for key, runs in data["runs"].items()}
    assert counts["lora1"] < counts["tree_token"] and counts["lora1"] < counts["lora2"] < counts["full"]
    assert data["runs"]["tree_token"][0]["active_params_per_token"] < counts["tree_token"]
    page = (out / "RESULTS.md").read_text()
    assert "## Study 1: past saturation" in page and "saturation_loss.png" in page


def test_facts_study_runs_end_to_end_and_keeps_hand_written_notes(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "RESULTS.md").write_text(f"old page\n{NOTES_BEGIN}\nmy reading\n{NOTES_END}\n")
    status = cli_main(
        ["experiment", "facts", *TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2"]
        + ["--epochs", "2", "--batch-size", "4", "--seeds", "3", "--out", str(out), "--quiet"]
    )
    assert status == 0
    data = json.loads((out / "facts.json").read_text())
    assert (out / "facts_capacity.png").exists()
    assert [run["arm"] for run in data["runs"]] == ["lora1", "tree_token", "tree_sequence", "lora8"]
    for run in data["runs"]:
        assert 0.0 <= run["recall"] <= 1.0
        assert run["facts_recalled"] == round(run["recall"] * run["people"] * len(ATTRIBUTES))
        assert run["bits"] >= 0 and run["bits_per_adapter_param"] == run["bits"] / run["trainable_params"]
    page = (out / "RESULTS.md").read_text()
    assert "## Study 2: knowledge capacity" in page and "my reading" in page and "old page" not in page
    again = ["experiment", "facts", *TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2"]
    again += ["--epochs", "2", "--batch-size", "4", "--seeds", "3", "--out", str(out), "--append"]
    assert cli_main(again) == 2  # seed 3 is already there: refused before any training


def test_appending_seeds_merges_runs_and_lists_both_commands():
    first = {"command": "a", "settings": {"epochs": 2, "seeds": [0]}, "bases": [1], "runs": [1, 2], "wall_seconds": 5}
    second = {"command": "b", "settings": {"epochs": 2, "seeds": [1]}, "bases": [3], "runs": [4], "wall_seconds": 2}
    merged = merge_results(first, second)
    assert merged["command"] == ["a", "b"] and merged["settings"]["seeds"] == [0, 1]
    assert merged["runs"] == [1, 2, 4] and merged["bases"] == [1, 3] and merged["wall_seconds"] == 7


def test_bad_settings_exit_with_status_2(tmp_path, capsys):
    assert cli_main(["experiment", "facts", "--people", "0", "--out", str(tmp_path)]) == 2
    assert "--people" in capsys.readouterr().err
