"""Training a TreeLoRA with the Hugging Face Trainer and trl's SFTTrainer: router losses in the optimised loss,
routing telemetry in the Trainer's logs, gradient checkpointing, resuming, bf16 and DDP settings."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny_llama
from datasets import Dataset
from peft import get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_tree_lora import RoutingTelemetryCallback, TreeLoraConfig, routing_telemetry
from peft_tree_lora.integrations.telemetry import TELEMETRY_KEYS, RoutingTelemetry, check_distributed_checkpointing
from peft_tree_lora.tuner.call import RouteRecord, RoutingCall
from peft_tree_lora.tuner.errors import TreeLoraUsageError


def tree_config(**overrides) -> TreeLoraConfig:
    settings = dict(depth=2, r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    settings.update(overrides)
    return TreeLoraConfig(**settings)


def token_dataset(rows: int = 8, length: int = 12, seed: int = 0, with_labels: bool = True) -> Dataset:
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids} if with_labels else {"input_ids": ids})


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def router_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if "treelora_router" in name and p.grad is not None
    }


def word_level_tokenizer():
    """A tokenizer over the tiny models' vocabulary, built in memory (trl wants one; nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


class GradientsBeforeStep(TrainerCallback):
    """Keeps the router gradients of the last step, before the optimizer uses them."""

    grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = router_grads(model)


class BatchRecorder:
    """Forward hook on the tuner: keeps the inputs of the last training forward pass."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}

    def __call__(self, module, args, kwargs, output):
        if module.training:
            self.inputs = {
                k: kwargs[k] for k in ("input_ids", "attention_mask", "labels") if kwargs.get(k) is not None
            }


def make_trainer(kind: str, tmp_path, callbacks, **arg_overrides):
    if kind == "trainer":
        model = get_peft_model(make_tiny_llama(), tree_config())
        return Trainer(
            model=model,
            args=training_args(tmp_path, **arg_overrides),
            train_dataset=token_dataset(rows=4),
            callbacks=callbacks,
        )
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        seed=0,
    )
    settings.update(arg_overrides)
    return SFTTrainer(
        model=make_tiny_llama(),
        args=SFTConfig(**settings),
        train_dataset=token_dataset(rows=4, with_labels=False),
        processing_class=word_level_tokenizer(),
        peft_config=tree_config(),
        callbacks=callbacks,
    )


# --- 1. the loss the trainers optimise includes the router losses ---------------------------------------------------


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_trainers_optimise_the_router_losses(kind, tmp_path):
    # A fresh TreeLoRA has B = 0, so the task loss does not depend on the routers: any router gradient comes from
    # the router losses alone. It must be exactly the gradient of the model's own training loss on the same batch.
    capture = GradientsBeforeStep()
    trainer = make_trainer(kind, tmp_path, [capture], max_steps=1, learning_rate=0.0, max_grad_norm=0.0)
    recorder = BatchRecorder()
    tuner = trainer.model.base_model
    handle = tuner.register_forward_hook(recorder, with_kwargs=True)
    trainer.train()
    handle.remove()

    assert capture.grads and all(g.abs().sum() > 0 for g in capture.grads.values())
    model = trainer.model  # learning rate 0: still the weights the step started from
    model.train()
    model.zero_grad()
    model(**recorder.inputs).loss.backward()
    expected = router_grads(model)
    assert expected.keys() == capture.grads.keys()
    for name, grad in capture.grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-9, msg=name)


# --- 2. telemetry in the Trainer's own logs --------------------------------------------------------------------------


class EarlyReporter(TrainerCallback):
    """Stands where transformers puts the `report_to` integrations: ahead of the user's callbacks."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def telemetry_run(tmp_path_factory):
    reporter = EarlyReporter()
    model = get_peft_model(make_tiny_llama(), tree_config())
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path_factory.mktemp("telemetry"), max_steps=2, logging_steps=1),
        train_dataset=token_dataset(),
        callbacks=[reporter],
    )
    RoutingTelemetryCallback.install(trainer)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # disable_tqdm: the Trainer prints each log record
        trainer.train()
    return SimpleNamespace(trainer=trainer, reporter=reporter, printed=printed.getvalue())


def training_records(log_history: list[dict]) -> list[dict]:
    return [record for record in log_history if "loss" in record]


def test_telemetry_lands_in_log_history_at_every_logging_step(telemetry_run):
    records = training_records(telemetry_run.trainer.state.log_history)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert set(TELEMETRY_KEYS) <= record.keys()
        assert all(math.isfinite(record[key]) for key in TELEMETRY_KEYS)


def test_telemetry_reaches_reporters_that_run_before_user_callbacks(telemetry_run):
    reported = training_records(telemetry_run.reporter.logs)
    assert len(reported) == 2
    assert all(set(TELEMETRY_KEYS) <= record.keys() for record in reported)


def test_telemetry_is_printed_with_the_training_logs(telemetry_run):
    training_lines = [line for line in telemetry_run.printed.splitlines() if "'loss'" in line]
    assert len(training_lines) == 2
    assert all(f"'{key}'" in line for line in training_lines for key in TELEMETRY_KEYS)


def test_trainer_logged_loss_is_task_loss_plus_router_losses(telemetry_run):
    for record in training_records(telemetry_run.trainer.state.log_history):
        assert record["aux_loss"] > 0
        assert record["loss"] == pytest.approx(record["task_loss"] + record["aux_loss"], rel=1e-5)


class CollapseAfter(TrainerCallback):
    """Sends every input to the rightmost leaf from the step after `step` on, as a collapsed tree would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.step:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "treelora_router" in name:
                    parameter.fill_(0.0 if name.endswith("weight") else 50.0)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_telemetry_shows_a_collapse_in_the_window_where_it_happens(routing, tmp_path):
    model = get_peft_model(make_tiny_llama(), tree_config(routing=routing, router_init_scale=50.0))
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, logging_steps=1, learning_rate=1e-4),
        train_dataset=token_dataset(rows=16),
        callbacks=[RoutingTelemetryCallback(), CollapseAfter(step=2)],
    )
    trainer.train()
    records = training_records(trainer.state.log_history)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    num_leaves = 4
    for before in records[:2]:
        assert before["dead_leaf_share"] < 1 - 1 / num_leaves
        assert before["leaf_usage_entropy"] > 0.3
    for after in records[2:]:  # a cumulative count would still show the leaves used in steps 1-2
        assert after["dead_leaf_share"] == pytest.approx(1 - 1 / num_leaves)
        assert after["leaf_usage_entropy"] == pytest.approx(0.0, abs=1e-9)
        assert after["router_confidence"] > 0.49


def _call_with_record(leaf: list[int], logits: torch.Tensor, aux: float) -> RoutingCall:
    call = RoutingCall(training=True, records=[RouteRecord("layer", "default", torch.tensor(leaf), logits)])
    call.aux_losses.append(torch.tensor(aux))
    return call


def test_telemetry_summarises_leaf_usage_over_every_call_of_the_window():
    telemetry = RoutingTelemetry()
    sure = torch.full((4, 3), 4.0)  # every router at p = sigmoid(4)
    for leaf in ([0, 0, 0, 1], [3, 3, 3, 3]):
        telemetry.end_call(_call_with_record(leaf, sure, aux=0.25), SimpleNamespace(loss=torch.tensor(2.0)), {})
    figures = telemetry.summary()

    usage = torch.tensor([3, 1, 0, 4], dtype=torch.float64) / 8
    entropy = -(usage[usage > 0] * usage[usage > 0].log()).sum() / math.log(4)
    p = torch.sigmoid(torch.tensor(4.0))
    assert figures["leaf_usage_entropy"] == pytest.approx(float(entropy))
    assert figures["dead_leaf_share"] == pytest.approx(0.25)
    assert figures["router_confidence"] == pytest.approx(float(p - 0.5), rel=1e-5)
    bits = float(-(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2))
    assert figures["aux_hardening"] == pytest.approx(bits, rel=1e-4)
    assert figures["aux_loss"] == pytest.approx(0.25)
    assert figures["task_loss"] == pytest.approx(2.0)


def test_telemetry_leaves_out_calls_made_in_evaluation_mode():
    telemetry = RoutingTelemetry()
    call = _call_with_record([0, 1], torch.zeros(2, 3), aux=0.0)
    call.training = False
    telemetry.end_call(call, SimpleNamespace(loss=torch.tensor(1.0)), {})
    assert telemetry.summary() == {}


def test_routing_telemetry_adds_up_the_training_calls_of_a_custom_loop(input_ids):
    base = make_tiny_llama()
    with torch.no_grad():
        base_loss = float(base(input_ids=input_ids, labels=input_ids).loss)
    model = get_peft_model(base, tree_config())  # B = 0: the task loss is the base model's loss
    model.train()
    with routing_telemetry(model) as telemetry:
        outputs = model(input_ids=input_ids, labels=input_ids)
    figures = telemetry.summary()

    assert tuple(figures) == TELEMETRY_KEYS
    assert figures["task_loss"] == pytest.approx(base_loss, rel=1e-5)
    assert figures["aux_loss"] == pytest.approx(float(outputs.aux_loss), rel=1e-6)
    assert float(outputs.loss.detach()) == pytest.approx(figures["task_loss"] + figures["aux_loss"], rel=1e-6)


def test_no_routes_are_recorded_outside_a_recording(input_ids):
    model = get_peft_model(make_tiny_llama(), tree_config()).train()
    with routing_telemetry(model) as telemetry:
        pass
    model(input_ids=input_ids, labels=input_ids)
    assert telemetry.summary() == {}


def test_routing_telemetry_refuses_a_model_without_tree_lora():
    with pytest.raises(TreeLoraUsageError, match="no TreeLoRA adapter.*get_peft_model"):
        with routing_telemetry(make_tiny_llama()):
            pass


# --- 3. gradient checkpointing ---------------------------------------------------------------------------------------


def adapter_gradients(routing: str, use_reentrant: bool | None) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of every adapter parameter after one training step, and how often the first tree ran."""
    model = get_peft_model(make_tiny_llama(), tree_config(routing=routing, init_lora_weights=False))
    if use_reentrant is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    first_tree = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    first_tree.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 7:] = 0  # padding changes the pooled sequence embedding: the route must be recomputed with it
    model.train()
    model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("routing", ["token", "block", "sequence"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(routing, use_reentrant):
    expected, plain_calls = adapter_gradients(routing, None)
    grads, checkpointed_calls = adapter_gradients(routing, use_reentrant)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer really was recomputed in the backward pass
    assert any("treelora_router" in name for name in expected)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-8, msg=name)


# --- 4. DDP settings that cannot work are refused up front -----------------------------------------------------------


@pytest.mark.parametrize(
    ("routing", "find_unused", "static_graph", "complaint"),
    [
        ("token", None, None, "ddp_find_unused_parameters=False"),
        ("sequence", False, None, "ddp_static_graph=True"),
        ("token", False, None, None),
        ("sequence", False, True, None),
    ],
)
def test_ddp_with_reentrant_checkpointing_refuses_settings_that_fail_in_backward(
    routing, find_unused, static_graph, complaint
):
    model = get_peft_model(make_tiny_llama(), tree_config(routing=routing))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    args = SimpleNamespace(
        world_size=2, fsdp=None, deepspeed=None, ddp_find_unused_parameters=find_unused, ddp_static_graph=static_graph
    )
    if complaint is None:
        check_distributed_checkpointing(args, model)
        return
    with pytest.raises(TreeLoraUsageError, match=complaint):
        check_distributed_checkpointing(args, model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    check_distributed_checkpointing(args, model)  # non-reentrant checkpointing needs neither setting


# --- 5. resuming from a checkpoint -----------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def resumable_trainer(output_dir, seed: int, callbacks=()) -> Trainer:
    torch.manual_seed(seed)  # the adapter's initial weights
    model = get_peft_model(make_tiny_llama(), tree_config())
    args = training_args(output_dir, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2)
    return Trainer(model=model, args=args, train_dataset=token_dataset(rows=12), callbacks=list(callbacks))


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """An uninterrupted 4-step run, and a run stopped after its checkpoint at step 2."""
    full = resumable_trainer(tmp_path_factory.mktemp("full"), seed=0)
    full.train()
    stopped_dir = tmp_path_factory.mktemp("stopped")
    stopped = resumable_trainer(stopped_dir, seed=0, callbacks=[StopAt(2)])
    stopped.train()
    return SimpleNamespace(full=full, checkpoint=stopped_dir / "checkpoint-2")


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights_and_losses(interrupted_run, tmp_path):
    assert (interrupted_run.checkpoint / "adapter_model.safetensors").is_file()
    resumed = resumable_trainer(tmp_path, seed=1)  # other initial adapter weights: they must come from the checkpoint
    resumed.train(resume_from_checkpoint=str(interrupted_run.checkpoint))

    full_weights = adapter_weights(interrupted_run.full.model)
    resumed_weights = adapter_weights(resumed.model)
    assert full_weights.keys() == resumed_weights.keys()
    for name, weight in resumed_weights.items():
        torch.testing.assert_close(weight, full_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    full_losses = {r["step"]: r["loss"] for r in training_records(interrupted_run.full.state.log_history)}
    resumed_losses = {r["step"]: r["loss"] for r in training_records(resumed.state.log_history)}
    assert sorted(resumed_losses) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer_state.json
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-5)


def test_resume_from_a_checkpoint_without_its_adapter_file_fails_naming_the_directory(interrupted_run, tmp_path):
    damaged = tmp_path / "checkpoint-2"
    shutil.copytree(interrupted_run.checkpoint, damaged)
    (damaged / "adapter_model.safetensors").unlink()
    trainer = resumable_trainer(tmp_path / "out", seed=1)
    before = adapter_weights(trainer.model)
    with pytest.raises(ValueError, match=f"Can't find a valid checkpoint at {damaged}"):
        trainer.train(resume_from_checkpoint=str(damaged))
    after = adapter_weights(trainer.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- 6. bf16 ---------------------------------------------------------------------------------------------------------


def test_bf16_autocast_training_on_cpu_keeps_the_adapter_in_float32(tmp_path):
    model = get_peft_model(make_tiny_llama(), tree_config())
    base_output_dtypes = set()
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    base_layer.register_forward_hook(lambda module, args, output: base_output_dtypes.add(output.dtype))
    initial = adapter_weights(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, bf16=True, max_steps=2), train_dataset=token_dataset())
    trainer.train()

    assert base_output_dtypes == {torch.bfloat16}  # autocast was on
    assert all(math.isfinite(r["loss"]) for r in training_records(trainer.state.log_history))
    trained = adapter_weights(model)
    assert {w.dtype for w in trained.values()} == {torch.float32}
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)


@pytest.mark.parametrize(("autocast_adapter_dtype", "adapter_dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_on_a_bf16_model_follows_autocast_adapter_dtype(
    autocast_adapter_dtype, adapter_dtype, input_ids
):
    base = make_tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, tree_config(routing="sequence"), autocast_adapter_dtype=autocast_adapter_dtype)
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapter} == {adapter_dtype}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    model.train()
    outputs = model(input_ids=input_ids, labels=input_ids)
    outputs.loss.backward()
    assert outputs.logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == adapter_dtype and torch.isfinite(p.grad).all() for p in adapter)


# --- bad input -------------------------------------------------------------------------------------------------------


def test_target_modules_matching_nothing_fail_naming_them_and_the_layers_that_could_be_adapted():
    base = make_tiny_llama()
    with pytest.raises(TreeLoraUsageError) as raised:
        get_peft_model(base, tree_config(target_modules=["not_a_module"]))
    message = str(raised.value)
    assert "not_a_module" in message
    assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in message
    assert isinstance(raised.value, NoMatchingPeftModuleError)  # code written for PEFT's error still catches it
    assert not any("treelora" in name for name, _ in base.named_modules())


def test_soft_warmup_trains_soft_for_its_steps_then_in_the_configured_mode(tmp_path):
    from peft_tree_lora.integrations.schedule import SoftWarmupCallback

    model = get_peft_model(make_tiny_llama(), tree_config(training_routing="hard"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(layer.training_routing["default"])

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=token_dataset(rows=16),
        callbacks=[SoftWarmupCallback(steps=2), Spy()],
    )
    trainer.train()
    assert seen == ["soft", "soft", "hard", "hard"]
    assert layer.training_routing["default"] == "hard"


def test_router_freeze_lets_the_routers_learn_for_their_steps_and_the_leaves_for_all(tmp_path):
    from peft_tree_lora.integrations.optim import create_tree_lora_optimizer
    from peft_tree_lora.integrations.schedule import RouterFreezeCallback

    model = get_peft_model(make_tiny_llama(), tree_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    snapshots = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            router = layer.treelora_router["default"].weight.detach().clone()
            snapshots.append((router, layer.treelora_B["default"].detach().clone()))

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=token_dataset(rows=16),
        optimizers=(create_tree_lora_optimizer(model, lr=1e-2), None),
        callbacks=[RouterFreezeCallback(steps=2), Spy()],
    )
    trainer.train()
    routers_moved = [not torch.equal(a[0], b[0]) for a, b in zip(snapshots, snapshots[1:])]
    leaves_moved = [not torch.equal(a[1], b[1]) for a, b in zip(snapshots, snapshots[1:])]
    assert routers_moved == [True, False, False]  # step 2 still learns; steps 3 and 4 keep the routes
    assert leaves_moved == [True, True, True]


def test_router_freeze_refuses_an_optimiser_without_router_groups(tmp_path):
    from peft_tree_lora.integrations.schedule import RouterFreezeCallback

    model = get_peft_model(make_tiny_llama(), tree_config())
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=token_dataset(rows=4),
        callbacks=[RouterFreezeCallback(steps=1)],
    )
    with pytest.raises(ValueError, match="create_tree_lora_optimizer"):
        trainer.train()


def test_router_learning_rate_ratio_puts_every_router_in_its_own_group():
    from peft_tree_lora.integrations.optim import create_tree_lora_optimizer

    model = get_peft_model(make_tiny_llama(), tree_config())
    optimizer = create_tree_lora_optimizer(model, lr=1e-3, router_lr_ratio=4.0, weight_decay=0.1)
    routers = {id(p) for n, p in model.named_parameters() if ".treelora_router." in n}
    leaves = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".treelora_router." not in n}
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr == {1e-3: leaves, 4e-3: routers}
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="router_lr_ratio must be > 0"):
        create_tree_lora_optimizer(model, router_lr_ratio=0)


def test_router_optimizer_without_a_ratio_gives_each_adapter_the_ratio_of_its_routing_and_rank():
    from peft_tree_lora.integrations.optim import create_tree_lora_optimizer, router_lr_ratio_for

    model = get_peft_model(make_tiny_llama(), tree_config(routing="token", r=2))
    model.add_adapter("blocky", tree_config(routing="block", r=8))
    model.base_model.set_adapter(["default", "blocky"])  # both trainable
    optimizer = create_tree_lora_optimizer(model, lr=1e-3)
    by_lr = {round(group["lr"], 12): {id(p) for p in group["params"]} for group in optimizer.param_groups}
    routers_of = {
        adapter: {id(p) for n, p in model.named_parameters() if f".treelora_router.{adapter}." in n}
        for adapter in ("default", "blocky")
    }
    assert by_lr[round(1e-3 * router_lr_ratio_for("token", 2), 12)] == routers_of["default"]
    assert by_lr[round(1e-3 * router_lr_ratio_for("block", 8), 12)] == routers_of["blocky"]
    assert router_lr_ratio_for("block", 8) != router_lr_ratio_for("token", 2)


def test_recommended_router_ratio_slows_block_routers_as_leaves_widen_and_an_asked_ratio_wins():
    from peft_tree_lora.integrations.optim import router_lr_ratio_for

    block = [router_lr_ratio_for("block", rank) for rank in (1, 2, 3, 4, 8, 64)]
    assert block[0] == block[1] == 8.0 and block[-2] == block[-1] == 0.125
    assert block[1] > block[2] > block[3] > block[4]
    assert block[3] == pytest.approx(1.0)  # halfway between rank 2 and 8 on a log scale
    assert router_lr_ratio_for("token", 1) == router_lr_ratio_for("token", 8) == 2.0
    assert router_lr_ratio_for("block", 8, asked=3.0) == 3.0
    with pytest.raises(ValueError, match="routing must be one of"):
        router_lr_ratio_for("per-layer", 8)
