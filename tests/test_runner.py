"""The shared training run: what a result reports, and what Ctrl-C leaves behind."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback

from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.app.runner import RUN_FILE, RunResult, TrainSettings, run_training

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def blocks() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 96, (32, 16), generator=generator), torch.randint(3, 96, (4, 16), generator=generator)


def settings(**overrides) -> TrainSettings:
    values = dict(steps=4, batch_size=4, eval_every=2, eval_batch_size=4, show_progress=False, learning_rate=1e-2)
    values.update(overrides)
    return TrainSettings(**values)


class SendInterrupts(TrainerCallback):
    """Presses Ctrl-C `times` times at the end of step `at_step`."""

    def __init__(self, at_step: int, times: int) -> None:
        self.at_step, self.times = at_step, times

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def test_tree_result_counts_parameters_curve_and_leaf_usage(blocks):
    train, held_out = blocks
    config = TreeLoraConfig(depth=2, r=4, target_modules=TARGETS)
    result = run_training("tree", make_tiny_llama, train, held_out, settings(), config)
    counts = result.model.base_model.parameter_counts()
    assert result.trainable_params == counts["total"]
    assert result.active_params_per_token == counts["active_per_token"]
    assert [(step, tokens) for step, tokens, _ in result.eval_curve] == [(0, 0), (2, 128), (4, 256)]
    assert result.final_eval_loss == result.eval_curve[-1][2]
    assert result.final_perplexity == pytest.approx(torch.tensor(result.final_eval_loss).exp().item(), rel=1e-5)
    assert len(result.leaf_usage) == 2 * len(TARGETS)  # every adapted module of both layers
    assert all(sum(counts) == held_out.numel() for counts in result.leaf_usage.values())


class RouterRates(TrainerCallback):
    """Records the learning rate of each router group the Trainer's optimiser starts with."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates = [group["lr"] for group in optimizer.param_groups if group.get("treelora_routers")]


@pytest.mark.parametrize("routing, asked, expected", [("block", None, 8.0), ("token", None, 2.0), ("block", 0.5, 0.5)])
def test_the_runner_trains_tree_routers_at_the_recommended_ratio_unless_one_is_asked(blocks, routing, asked, expected):
    train, held_out = blocks
    config = TreeLoraConfig(depth=2, r=1, routing=routing, target_modules=TARGETS)
    spy = RouterRates()
    run_training("tree", make_tiny_llama, train, held_out, settings(router_lr_ratio=asked), config, callbacks=[spy])
    assert spy.rates == [pytest.approx(1e-2 * expected)]


def test_lora_counts_every_adapter_parameter_as_active(blocks):
    train, held_out = blocks
    config = LoraConfig(r=4, target_modules=TARGETS)
    result = run_training("lora", make_tiny_llama(), train, held_out, settings(), config)
    assert result.active_params_per_token == result.trainable_params > 0
    assert result.leaf_usage is None


def test_same_seed_gives_the_same_run(blocks):
    train, held_out = blocks
    config = lambda: TreeLoraConfig(depth=1, r=2, target_modules=TARGETS)  # noqa: E731
    first = run_training("a", make_tiny_llama, train, held_out, settings(), config())
    second = run_training("b", make_tiny_llama, train, held_out, settings(), config())
    assert [p[2] for p in first.eval_curve] == [p[2] for p in second.eval_curve]


def test_first_ctrl_c_stops_after_the_step_then_evaluates_and_saves(blocks, tmp_path):
    train, held_out = blocks
    config = TreeLoraConfig(depth=1, r=2, target_modules=TARGETS)
    result = run_training(
        "tree", make_tiny_llama, train, held_out, settings(steps=50), config, tmp_path, [SendInterrupts(2, 1)]
    )
    assert result.interrupted and result.steps_done < 50
    assert result.eval_curve[-1][0] == result.steps_done
    saved = RunResult.from_dict(json.loads((tmp_path / RUN_FILE).read_text()))
    assert saved.interrupted and saved.steps_done == result.steps_done
    PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))


def test_second_ctrl_c_aborts_and_leaves_the_last_periodic_save_loadable(blocks, tmp_path):
    train, held_out = blocks
    config = TreeLoraConfig(depth=1, r=2, target_modules=TARGETS)
    with pytest.raises(KeyboardInterrupt):
        run_training(
            "tree", make_tiny_llama, train, held_out, settings(steps=50, save_every=2), config, tmp_path,
            [SendInterrupts(3, 2)],
        )  # fmt: skip
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"name": "tree", "steps_done": 2, "in_progress": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saving-")]
    PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(learning_rate=2.0), dict(warmup_steps=9)])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError):
        settings(**bad)
