"""`torch.compile` traces a TreeLoRA model in one graph, in every routing scope, and computes what eager mode does.

Tracing (`torch._dynamo.explain`) is quick, so every scope and mode is checked for graph breaks; the compiled runs use
`aot_eager` (the autograd graph without code generation) for training and Inductor, which generates C++, once for the
served forward that used to crash in `grouped_mm`'s float32 check.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny_llama
from peft import get_peft_model

from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.tuner import call

ROUTINGS = ["token", "block", "sequence"]


def compiled_case(routing: str, training: bool, training_routing: str = "hard"):
    torch.manual_seed(0)
    config = TreeLoraConfig(
        depth=3,
        r=4,
        routing=routing,
        training_routing=training_routing,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    model = get_peft_model(make_tiny_llama(), config).train(training)

    def step(input_ids):
        outputs = model(input_ids=input_ids, labels=input_ids if training else None)
        return outputs.loss if training else outputs.logits

    return model, step


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_model_call_traces_without_graph_breaks(routing, training):
    _, step = compiled_case(routing, training)
    explanation = torch._dynamo.explain(step)(input_ids())
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


@pytest.mark.parametrize("training_routing", ["hard", "switch"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_compiled_training_step_gives_eager_loss_and_gradients(routing, training_routing):
    model, step = compiled_case(routing, True, training_routing)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    compiled_loss = compiled(input_ids())
    compiled_grads = torch.autograd.grad(compiled_loss, trainable)
    eager_loss = step(input_ids())
    eager_grads = torch.autograd.grad(eager_loss, trainable)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_inductor_compiled_served_forward_equals_eager_on_new_inputs():
    _, step = compiled_case("token", False)
    compiled = torch.compile(step, fullgraph=True)
    compiled(input_ids(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids(1)), step(input_ids(1)), rtol=1e-4, atol=1e-4)


def test_a_compiled_call_leaves_no_routing_call_behind():
    _, step = compiled_case("sequence", False)
    torch.compile(step, backend="aot_eager", fullgraph=True)(input_ids())
    assert call._TRACED.call is None
    assert call.current_call() is None
