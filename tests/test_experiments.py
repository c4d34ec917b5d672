"""The studies behind docs/RESULTS.md: their building blocks, and tiny end-to-end runs through the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl

from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.app.cli import main as cli_main
from peft_tree_lora.experiments import capacity, capacity_variants, capacity_verdict, facts
from peft_tree_lora.experiments.common import Arm
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
from peft_tree_lora.experiments.saturation import StopAtPlateau, plateau_reached
from peft_tree_lora.tuner.errors import TreeLoraUsageError


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


@pytest.mark.parametrize(
    "routing, soft", [("plain", False), ("token", False), ("sequence", False), ("token", True), ("sequence", True)]
)
def test_exact_match_agrees_with_greedy_generate(routing, soft):
    model = make_tiny_llama(seed=2)
    if routing != "plain":
        config = TreeLoraConfig(depth=2, r=2, target_modules="all-linear", routing=routing, init_lora_weights=False)
        model = get_peft_model(model, config)
    model.eval()
    prompts = [[5, 9, 12, 7], [30, 31, 2, 40, 41], [60, 3, 3], [8, 9, 10, 11]]
    queries = []
    if soft:
        model.base_model.set_inference_routing("soft")
    for prompt in prompts:
        generated = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None
        )
        greedy = generated[0, len(prompt) :].tolist()
        wrong = greedy[:-1] + [(greedy[-1] + 1) % 96]
        queries += [("x", prompt, greedy), ("x", prompt, wrong)]
    if soft:
        model.base_model.set_inference_routing("hard")
    assert exact_match(model, queries, pad=0, soft=soft) == [True, False] * len(prompts)


def test_soft_exact_match_restores_hard_routing_and_differs_from_it():
    model = get_peft_model(
        make_tiny_llama(seed=4),
        TreeLoraConfig(depth=2, r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
    )
    model.eval()
    batch = torch.tensor([[5, 9, 12, 7, 30, 31]])
    hard_logits = model(input_ids=batch).logits
    with facts.soft_inference(model):
        soft_logits = model(input_ids=batch).logits
    assert not torch.allclose(hard_logits, soft_logits)
    exact_match(model, [("x", [5, 9], [12])], pad=0, soft=True)
    assert torch.equal(model(input_ids=batch).logits, hard_logits)


def test_fano_bits_is_zero_at_chance_and_log2_values_when_perfect():
    assert fano_bits(1.0, 48) == pytest.approx(math.log2(48))
    assert fano_bits(1 / 48, 48) == pytest.approx(0.0, abs=1e-9)
    assert 0 < fano_bits(0.5, 48) < math.log2(48)


def test_plateau_criterion():
    assert not plateau_reached([5.0, 4.0, 3.0], patience=2, min_improvement=0.01)
    assert plateau_reached([5.0, 3.0, 2.99, 2.995], patience=2, min_improvement=0.01)
    assert not plateau_reached([5.0, 3.0, 2.9, 2.95], patience=2, min_improvement=0.01)


TINY_MODEL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--intermediate", "32"]


def tiny_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox {i} jumps over the lazy dog." for i in range(80))
    )
    return corpus


TINY_SATURATION = ["--block-length", "16", "--batch-size", "4", "--continue-steps", "4", "--eval-every", "2"]
TINY_SATURATION += ["--continue-eval-every", "2", "--warmup-steps", "1", "--eval-blocks", "4", "--test-blocks", "4"]
TINY_SATURATION += ["--quiet"]


def test_saturation_study_runs_end_to_end_with_the_compute_matched_lora(tmp_path):
    out = tmp_path / "results"
    status = cli_main(
        ["experiment", "saturation", *TINY_MODEL, *TINY_SATURATION, "--data", str(tiny_corpus(tmp_path))]
        + ["--max-pretrain-steps", "6", "--rank", "1", "--depth", "2", "--seeds", "0", "1", "--out", str(out)]
    )
    assert status == 0
    data = json.loads((out / "saturation.json").read_text())
    assert (out / "saturation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TINY_MODEL, one layer: LoRA costs 4 x 32 + 3 x 48 = 272 per rank. A token of the default (block-routed) d=2 r=1
    # tree touches one leaf (272) and the 2 routers of its block, on q_proj's input, 2 x 17: 306, under rank 2 (544).
    assert data["compute_matched"] == {"rank": 2, "tree_active_per_token": 306, "per_rank": 272}
    keys = ["full", "full_constant", "lora1", "lora2", "lora4", "tree", "tree_token", "tree_sequence"]
    assert [a["key"] for a in data["arms"]] == keys
    assert data["roles"] == {
        "full": "full",
        "plateau_control": "full_constant",
        "lora_r": "lora1",
        "compute_matched": "lora2",
        "lora_all_leaves": "lora4",
        "tree": "tree",
        "tree_token": "tree_token",
        "tree_sequence": "tree_sequence",
    }
    runs = {(r["arm"], r["seed"]): r for r in data["runs"]}
    assert len(runs) == 2 * len(keys) and len(data["bases"]) == 2
    assert runs["tree_sequence", 0]["active_params_per_token"] == 272  # the sequence router runs once per sequence
    assert runs["lora2", 0]["trainable_params"] == runs["lora2", 0]["active_params_per_token"] == 2 * 272
    assert runs["tree", 0]["active_params_per_token"] == 306
    assert runs["tree", 0]["trainable_params"] == 4 * 272 + 3 * 17  # four leaves per module, three routers per block
    # token routing: 2 routers of (in + 1) on the path in every module, 2 x (6 x 17 + 33) = 270
    assert runs["tree_token", 0]["active_params_per_token"] == 542
    assert runs["tree_token", 0]["trainable_params"] == 4 * 272 + 3 * 135  # three routers per module
    bases = {b["seed"]: b for b in data["bases"]}
    assert bases[0]["test_loss"] != bases[1]["test_loss"]  # each seed pretrains its own base
    for (_, seed), run in runs.items():
        assert run["curve"][0][1] == 0 and run["curve"][-1][1] == data["continue_tokens"]
        assert run["improvement"] == pytest.approx(bases[seed]["test_loss"] - run["test_loss"])
    assert not data["plateau_reached"]  # 6 steps are fewer than the 10 evaluations the criterion looks back on
    assert set(data["verdict"]["against"]) == {"lora2", "lora1", "lora4", "full"}
    assert "tree_sequence_against_lora_r" in data["verdict"] and "plateau_control_improvement" in data["verdict"]
    assert data["verdict"]["against"]["lora2"]["role"] == "compute_matched"
    page = (out / "RESULTS.md").read_text()
    assert "## Study 1: past saturation" in page and "saturation_loss.png" in page
    assert "The plateau was NOT reached on 2 of 2 seeds" in page and data["verdict"]["text"] in page


def test_saturation_pretraining_stops_at_the_plateau_and_the_page_says_so(tmp_path):
    out = tmp_path / "results"
    # with --patience 1 and --min-improvement 0.99 the second evaluation (step 2) already counts as a plateau
    status = cli_main(
        ["experiment", "saturation", *TINY_MODEL, *TINY_SATURATION, "--data", str(tiny_corpus(tmp_path))]
        + ["--max-pretrain-steps", "8", "--patience", "1", "--min-improvement", "0.99", "--rank", "1"]
        + ["--depth", "1", "--seeds", "3", "--no-tree-token", "--no-tree-sequence", "--no-plateau-control"]
        + ["--out", str(out)]
    )
    assert status == 0
    data = json.loads((out / "saturation.json").read_text())
    (base,) = data["bases"]
    assert base["plateau_reached"] and base["steps"] == 2 and "plateau criterion met at step 2" == base["stop_reason"]
    assert [a["key"] for a in data["arms"]] == ["full", "lora1", "lora2", "tree"]
    assert data["roles"]["compute_matched"] == data["roles"]["lora_all_leaves"] == "lora2"  # 289 > 272 per token
    assert "undecided (one seed)" in data["verdict"]["text"]
    assert "The plateau was reached on every seed (1 of 1)" in (out / "RESULTS.md").read_text()


def test_stop_at_plateau_stops_training_once():
    stopper = StopAtPlateau(patience=2, min_improvement=0.01)
    state, control = SimpleNamespace(global_step=0), TrainerControl()
    for step, loss in enumerate([5.0, 3.0, 2.5, 2.49, 2.495]):
        state.global_step = step * 10
        stopper.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        assert control.should_training_stop == (step == 4)
    assert stopper.stopped_at_step == 40


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
    assert [run["arm"] for run in data["runs"]] == ["lora1", "tree", "tree_token", "tree_sequence", "lora8"]
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


def test_capacity_compute_matched_rank_is_the_smallest_lora_rank_with_the_trees_per_token_parameters():
    # conftest's Llama per layer: q, o 32->32, k, v 32->16 (2 KV heads), gate, up 32->64, down 64->32: LoRA costs
    # 64 + 48 + 48 + 64 + 96 + 96 + 96 = 512 per rank and layer, 1024 for both layers. A token of the d=2 r=1 tree
    # touches one leaf (1024) and 2 routers of (in + 1) per module: 2 x 2 x (6 x 33 + 65) = 1052; 2076 in all, which
    # rank 2 (2048) misses by 28 and rank 3 (3072) covers. Block routing (the default) runs 2 routers per block, on
    # q_proj's input: 1024 + 2 x 2 x 33 = 1156, which rank 2 covers.
    tree = get_peft_model(
        make_tiny_llama(), TreeLoraConfig(depth=2, r=1, routing="token", target_modules="all-linear")
    )
    assert capacity.compute_matched_rank(tree) == {"rank": 3, "tree_active_per_token": 2076, "per_rank": 1024}
    block = get_peft_model(make_tiny_llama(), TreeLoraConfig(depth=2, r=1, target_modules="all-linear"))
    assert capacity.compute_matched_rank(block) == {"rank": 2, "tree_active_per_token": 1156, "per_rank": 1024}
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=1, target_modules="all-linear"))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == capacity.lora_params_per_rank(tree)
    shallow = get_peft_model(
        make_tiny_llama(), TreeLoraConfig(depth=1, r=1, routing="token", target_modules="all-linear")
    )
    assert capacity.compute_matched_rank(shallow)["rank"] == 2  # 1024 + 526 = 1550


def test_capacity_verdict_needs_every_seed_ahead_by_more_than_the_spread():
    recalls = {
        "lora1": [0.05, 0.06, 0.07],
        "lora3": [0.30, 0.32, 0.34],
        "lora8": [0.80, 0.78, 0.79],
        "tree": [0.20, 0.21, 0.22],
        "tree_b": [0.45, 0.46, 0.44],
        "tree_frozen_router": [0.40, 0.47, 0.41],
    }
    roles = {
        "lora1": ["lora_r"],
        "lora3": ["compute_matched:tree", "compute_matched:tree_b"],
        "lora8": ["lora_all_leaves"],
        "tree": ["tree"],
        "tree_b": ["tree"],
        "tree_frozen_router": ["frozen_router:tree"],
        "tree_b_frozen_router": ["frozen_router:tree_b"],
    }
    recalls["tree_b_frozen_router"] = [0.30, 0.31, 0.29]
    runs = [
        {"arm": key, "seed": seed, "recall": value}
        for key, values in recalls.items()
        for seed, value in enumerate(values)
    ]
    data = {
        "settings": {"seeds": [0, 1, 2]},
        "arms": [{"key": key, "label": key, "roles": roles[key]} for key in recalls],
        "roles": {role: key for key, these in roles.items() for role in these if role != "tree"},
        "runs": runs,
        "summary": capacity.summarise(runs, list(recalls)),
    }
    verdict = capacity.verdict(data)
    assert verdict["best_tree"] == "tree_b" and verdict["default_tree"] == "tree"
    # tree_b minus lora3: +0.15, +0.14, +0.10, all above the larger seed range (0.04)
    assert verdict["compute_matched"]["tree_b"]["beats"]
    assert verdict["compute_matched"]["tree_b"]["spread"] == pytest.approx(0.04)
    assert not verdict["compute_matched"]["tree"]["beats"] and verdict["compute_matched"]["tree"]["seeds_ahead"] == 0
    # each tree against its own control: the default behind on every seed, tree_b ahead by more than the spread
    assert verdict["frozen_router"]["tree"]["seeds_ahead"] == 0 and not verdict["frozen_router"]["tree"]["beats"]
    assert verdict["frozen_router"]["tree_b"]["against"] == "tree_b_frozen_router"
    assert verdict["frozen_router"]["tree_b"]["beats"]
    assert verdict["share_of_wide"]["tree_b"] == pytest.approx(0.45 / 0.79)
    assert verdict["lora_r_capacity_bound"]
    assert "YES" in verdict["text"] and "NO" in verdict["text"]
    paired = verdict["compute_matched"]["tree_b"]
    assert paired["mean_difference"] == pytest.approx(0.13)
    assert paired["paired_standard_error"] == pytest.approx((0.0014 / 2 / 3) ** 0.5)  # differences 0.15, 0.14, 0.10
    one_seed = capacity_verdict.compare_by_seed([r for r in runs if r["seed"] == 0], "tree_b", "lora3")
    assert one_seed["differences"] == [pytest.approx(0.15)] and not one_seed["beats"]


def test_capacity_study_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    status = cli_main(
        ["experiment", "capacity", *TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2"]
        + [
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--seeds",
            "3",
            "--depth",
            "1",
            "--tree-arms",
            "tree",
            "tree_sequence",
            "--lr-grid",
            "0.01",
            "0.02",
            "--validation-seed",
            "5",
            "--frozen-router-of",
            "tree",
        ]
        + ["--out", str(out), "--quiet"]
    )
    assert status == 0
    data = json.loads((out / "capacity.json").read_text())
    assert (out / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"settings", "compute_matched", "arms", "roles", "runs", "summary", "verdict", "bases"} <= set(data)
    # TINY_MODEL, one layer: q, k, v, o 16->16, gate, up 16->32, down 32->16: 4 x 32 + 2 x 48 + 48 = 272 per rank.
    # The default (block-routed) d=1 tree's token: one leaf (272) plus the block's one router of (in + 1) on q_proj,
    # 17: 289 > 272, so the compute-matched LoRA has rank 2, which is also r * 2**d: one arm plays both roles.
    assert data["compute_matched"]["tree"] == {"rank": 2, "tree_active_per_token": 289, "per_rank": 272}
    assert data["compute_matched"]["tree_sequence"]["rank"] == 1
    assert data["roles"] == {
        "lora_r": "lora1",
        "compute_matched:tree_sequence": "lora1",
        "compute_matched:tree": "lora2",
        "lora_all_leaves": "lora2",
        "frozen_router:tree": "tree_frozen_router",
    }
    runs = {run["arm"]: run for run in data["runs"]}
    assert list(runs) == ["lora1", "lora2", "tree", "tree_sequence", "tree_frozen_router"]
    # the learning rate of each arm is the validation seed's best, and the test runs use it
    assert {(v["arm"], v["learning_rate"]) for v in data["validation"]} == {
        (k, lr) for k in runs for lr in (0.01, 0.02)
    }
    for key, run in runs.items():
        tried = {v["learning_rate"]: v["recall"] for v in data["validation"] if v["arm"] == key}
        assert run["learning_rate"] == data["learning_rates"][key] and tried[run["learning_rate"]] == max(
            tried.values()
        )
    assert runs["tree_sequence"]["active_params_per_token"] == 272  # the sequence router runs once per sequence
    assert runs["lora2"]["trainable_params"] == 2 * 272 and runs["lora2"]["recall_soft"] is None
    assert runs["tree"]["active_params_per_token"] == runs["tree_frozen_router"]["active_params_per_token"] == 289
    assert runs["tree"]["trainable_params"] == 2 * 272 + 17
    assert runs["tree_frozen_router"]["trainable_params"] == 2 * 272  # routers frozen
    assert runs["tree_frozen_router"]["routers_unchanged"] is True
    for run in data["runs"]:
        assert run["facts_recalled"] == round(run["recall"] * 4 * len(ATTRIBUTES))
        assert run["bits_per_active_param"] == run["bits"] / run["active_params_per_token"]
        if run["arm"].startswith("tree"):
            assert run["soft_minus_hard_recall"] == run["recall_soft"] - run["recall"]
            assert run["soft_minus_hard_loss"] == pytest.approx(run["held_out_loss_soft"] - run["held_out_loss"])
            assert 0.0 <= run["leaf_usage_entropy"] <= 1.0
    assert data["summary"]["lora1"]["recall"]["n"] == 1
    assert data["verdict"]["best_tree"] in ("tree", "tree_sequence") and "one seed" in data["verdict"]["text"]
    page = (out / "RESULTS.md").read_text()
    assert "## Study 3: capacity at matched compute" in page and "capacity.png" in page
    assert data["verdict"]["text"] in page


def test_capacity_stops_before_training_on_a_tree_arm_the_config_rejects(tmp_path, monkeypatch, capsys):
    arm = Arm("tree_bogus", "a bogus tree", "tree", 1, 1, options=(("no_such_field", True),))
    with pytest.raises(TreeLoraUsageError, match="tree_bogus.*no_such_field=True"):
        capacity.checked_config(arm)
    # a variant the CLI accepts by name whose arguments TreeLoraConfig rejects (r=0 today, as planned fields would be
    # on a version without them)
    variants = [replace(v, config=(("r", 0),)) if v.key == "tree_switch" else v for v in capacity.TREE_VARIANTS]
    monkeypatch.setattr(capacity, "TREE_VARIANTS", variants)
    monkeypatch.setattr(capacity_variants, "TREE_VARIANTS", variants)
    out = tmp_path / "results"
    status = cli_main(
        ["experiment", "capacity", *TINY_MODEL, "--people", "4", "--background", "8", "--seeds", "0"]
        + ["--tree-arms", "tree", "tree_switch", "--out", str(out), "--quiet"]
    )
    assert status == 2
    assert "tree arm 'tree_switch'" in capsys.readouterr().err  # stopped by the config check, not by argparse
    assert not out.exists()  # before any training or writing


@pytest.mark.parametrize(
    ("tree_arms", "frozen_router_of", "controls"),
    [
        (["tree", "tree_block_r2"], ["tree", "tree_block_r2"], ["tree_frozen_router", "tree_block_r2_frozen_router"]),
        (["tree_block_r2", "tree_soft"], ["tree", "tree_block_r2"], ["tree_block_r2_frozen_router"]),  # tree not run
        (["tree_switch"], ["tree_switch"], ["tree_switch_frozen_router"]),
    ],
)
def test_capacity_gives_each_controlled_tree_its_own_frozen_router_arm(tree_arms, frozen_router_of, controls):
    settings = capacity.CapacitySettings(tree_arms=tree_arms, frozen_router_of=frozen_router_of)
    settings.validate()
    arms = capacity.study_arms(settings, {})
    frozen = [a for a in arms if a.freeze_router]
    assert [a.key for a in frozen] == controls
    for control in frozen:
        tree = next(a for a in arms if a.roles == ("tree",) and control.roles == (f"frozen_router:{a.key}",))
        assert (control.arm.rank, control.arm.options, control.training) == (
            tree.arm.rank,
            tree.arm.options,
            tree.training,
        )


def test_capacity_refuses_a_frozen_router_control_of_a_tree_it_does_not_train():
    settings = capacity.CapacitySettings(tree_arms=["tree"], frozen_router_of=["tree_path"])
    with pytest.raises(TreeLoraUsageError, match="--frozen-router-of.*tree_path.*--tree-arms \\['tree'\\]"):
        settings.validate()


def test_capacity_grown_arm_trains_from_a_lora_in_depth_plus_one_stages_with_the_same_steps(tmp_path):
    out = tmp_path / "results"
    arms = ["--tree-arms", "tree_block_r2", "tree_block_r2_grown", "--no-frozen-router", "--lr-grid", "0.02"]
    status = cli_main(
        ["experiment", "capacity", *TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2"]
        + ["--epochs", "6", "--batch-size", "4", "--seeds", "3", "--depth", "2", *arms, "--out", str(out), "--quiet"]
    )
    assert status == 0
    runs = {run["arm"]: run for run in json.loads((out / "capacity.json").read_text())["runs"]}
    grown, scratch = runs["tree_block_r2_grown"], runs["tree_block_r2"]
    # the same adapter at the end (depth 2, rank 2, block routing), trained on the same data in 3 stages
    assert grown["trainable_params"] == scratch["trainable_params"]
    assert grown["active_params_per_token"] == scratch["active_params_per_token"]
    assert scratch["steps"] - 2 <= grown["steps"] <= scratch["steps"]  # each stage rounds its share down
    assert grown["recall"] != scratch["recall"] or grown["held_out_loss"] != scratch["held_out_loss"]


def test_capacity_refuses_a_frozen_router_control_of_a_grown_tree():
    settings = capacity.CapacitySettings(tree_arms=["tree_block_r2_grown"], frozen_router_of=["tree_block_r2_grown"])
    with pytest.raises(TreeLoraUsageError, match="grown tree starts without routers"):
        settings.validate()


def test_router_sweep_trains_a_frozen_control_and_one_tree_per_ratio_beside_the_matched_lora(tmp_path, capsys):
    from peft_tree_lora.experiments import router_sweep

    out = tmp_path / "sweep.json"
    arguments = [*TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2", "--epochs", "2"]
    arguments += ["--seeds", "0", "--ratios", "0", "8", "--rank", "1", "--out", str(out)]
    assert router_sweep.main(arguments) == 0
    data = json.loads(out.read_text())
    assert [run["arm"] for run in data["runs"]] == [f"lora{data['lora_rank']}", "frozen", "ratio8"]
    assert data["lora_rank"] >= 1 and all(0.0 <= run["recall"] <= 1.0 for run in data["runs"])
    assert "| tree, routers at 8x |" in capsys.readouterr().out


def test_router_sweep_trains_one_tree_per_hardening_weight_and_keeps_each_trees_mixed_minus_served_gap(tmp_path):
    from peft_tree_lora.experiments import router_sweep

    out = tmp_path / "sweep.json"
    arguments = [*TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2", "--epochs", "2"]
    arguments += ["--seeds", "0", "--ratios", "8", "--hardening", "0", "0.1", "--rank", "1", "--out", str(out)]
    assert router_sweep.main(arguments) == 0
    runs = {run["arm"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {
        next(key for key in runs if key.startswith("lora")),
        "ratio8-hardening0",
        "ratio8-hardening0.1",
    }
    assert runs["ratio8-hardening0"]["held_out_loss"] != runs["ratio8-hardening0.1"]["held_out_loss"]
    trees = [run for key, run in runs.items() if key.startswith("ratio")]
    assert all(isinstance(run["soft_minus_hard_loss"], float) and 0 <= run["leaf_usage_entropy"] <= 1 for run in trees)


def test_router_sweep_runs_no_lora_arm_when_asked_for_rank_zero(tmp_path):
    from peft_tree_lora.experiments import router_sweep

    out = tmp_path / "sweep.json"
    arguments = [*TINY_MODEL, "--people", "4", "--background", "8", "--background-epochs", "2", "--epochs", "2"]
    arguments += ["--seeds", "0", "--ratios", "1", "--lora-rank", "0", "--router-learning-fraction", "0.5"]
    assert router_sweep.main([*arguments, "--rank", "1", "--out", str(out)]) == 0
    assert [run["arm"] for run in json.loads(out.read_text())["runs"]] == ["ratio1"]
