"""A forward pass depends only on its inputs and the weights: no route survives the call that picked it."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import PeftModel

from peft_tree_lora import TreeLoraConfig, TreeLoraLinear

ROUTINGS = ["token", "block", "sequence"]


def routed_tree(routing: str, depth: int = 4):
    return trained_looking(tree_model(make_tiny_llama(), depth=depth, routing=routing, router_init_scale=100.0))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_scoring_a_prompt_and_then_its_continuation_gives_the_logits_of_scoring_the_continuation_alone(routing):
    model = routed_tree(routing).eval()
    fresh = copy.deepcopy(model)
    full = torch.randint(3, 90, (3, 14), generator=torch.Generator().manual_seed(2))
    logits(model, full[:, :6])  # the log-likelihood pattern: the prompt first, then prompt + continuation
    torch.testing.assert_close(logits(model, full), logits(fresh, full))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_evaluation_after_training_steps_equals_the_reloaded_adapter(routing, tmp_path):
    model = routed_tree(routing).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(3, 90, (4, 10), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(model.eval(), batch), logits(reloaded, batch))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_generate_from_two_threads_gives_the_serial_results(routing):
    model = routed_tree(routing).eval()
    prompts = [torch.randint(3, 90, (2, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def generate(prompt):
        return model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)

    serial = [generate(prompt) for prompt in prompts]
    threaded: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def worker(indices):
        barrier.wait()
        for i in indices:
            threaded[i] = generate(prompts[i])

    threads = [threading.Thread(target=worker, args=(range(k, 6, 2),)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(threaded[i], serial[i]) for i in range(6))


@pytest.mark.parametrize("routing", ["block", "sequence"])
def test_an_inner_module_called_outside_a_model_call_is_refused_rather_than_given_a_stale_route(routing, input_ids):
    model = routed_tree(routing).eval()
    logits(model, input_ids)  # a model call with the same batch size, whose route must not be reused
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    with pytest.raises(RuntimeError, match="inner modules"):
        layer(torch.randn(input_ids.shape[0], input_ids.shape[1], layer.in_features))


def test_a_block_routed_layer_built_on_its_own_routes_by_its_own_router_as_a_token_routed_one():
    outputs = []
    for routing in ("token", "block"):
        torch.manual_seed(0)
        config = TreeLoraConfig(depth=3, r=2, routing=routing, init_lora_weights=False, target_modules=["x"])
        layer = TreeLoraLinear(torch.nn.Linear(16, 12), "default", config, "x").eval()
        outputs.append(layer(torch.randn(40, 16, generator=torch.Generator().manual_seed(1))))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_calling_the_adapted_model_directly_routes_like_the_peft_model(routing, input_ids):
    model = routed_tree(routing).eval()
    with torch.no_grad():
        direct = model.base_model.model(input_ids=input_ids).logits
    torch.testing.assert_close(direct, logits(model, input_ids))


def test_a_failed_direct_call_of_the_adapted_model_leaves_no_route_behind(input_ids):
    model = routed_tree("sequence").eval()
    decoder = model.base_model.model.model.layers[1]
    failing = decoder.register_forward_hook(lambda *_: (_ for _ in ()).throw(ValueError("fails after routing")))
    with pytest.raises(ValueError, match="fails after routing"):
        model.base_model.model(input_ids=input_ids)
    failing.remove()
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    with pytest.raises(RuntimeError, match="inner modules"):
        layer(torch.randn(input_ids.shape[0], input_ids.shape[1], layer.in_features))


def test_holding_routes_scores_a_continuation_with_the_route_of_its_prompt():
    model = routed_tree("sequence").eval()
    full = torch.randint(3, 90, (4, 14), generator=torch.Generator().manual_seed(8))
    prompt_route = model.base_model.leaf_routes(full[:, :6])["sequence"]
    assert not torch.equal(model.base_model.leaf_routes(full)["sequence"], prompt_route), "pick another seed"
    with model.base_model.holding_routes():
        logits(model, full[:, :6])
        held = logits(model, full)
    pinned = []
    for row, leaf in enumerate(prompt_route.tolist()):
        with model.base_model.pinned_leaf(leaf):
            pinned.append(logits(model, full[row : row + 1])[0])
    torch.testing.assert_close(held, torch.stack(pinned))
    torch.testing.assert_close(logits(model, full[:, :6]), logits(copy.deepcopy(model), full[:, :6]))
