"""Generation: hard routing with and without KV cache, and sequence routes that hold for a whole generation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import trained_looking, tree_model

ROUTINGS = ["token", "sequence"]


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 90, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first prompt is shorter
    return ids, mask


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs
    )


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("depth", [1, 4])
def test_greedy_generation_is_the_same_with_and_without_kv_cache(depth, routing):
    model = trained_looking(
        tree_model(make_tiny_llama(), depth=depth, routing=routing, router_init_scale=100.0)
    ).eval()
    ids, mask = left_padded_prompts()
    with_cache = greedy(model, ids, mask, use_cache=True)
    without_cache = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    with model.disable_adapter():
        assert not torch.equal(greedy(model, ids, mask), with_cache), "the adapter should change the generation"


def generated_row_by_row_with_its_prompt_leaf(model, ids, mask, route, **kwargs) -> list[torch.Tensor]:
    rows = []
    for row, leaf in enumerate(route.tolist()):
        with model.base_model.pinned_leaf(leaf):
            rows.append(greedy(model, ids[row : row + 1], mask[row : row + 1], **kwargs)[0])
    return rows


@pytest.mark.parametrize("use_cache", [True, False])
def test_sequence_route_chosen_from_the_prompt_holds_for_every_new_token(use_cache):
    model = trained_looking(tree_model(make_tiny_llama(), depth=4, routing="sequence", router_init_scale=100.0)).eval()
    ids, mask = left_padded_prompts()
    prompt_route = model.base_model.leaf_routes(ids, attention_mask=mask)["sequence"]
    out = greedy(model, ids, mask, use_cache=use_cache)
    expected = generated_row_by_row_with_its_prompt_leaf(model, ids, mask, prompt_route, use_cache=use_cache)
    assert all(torch.equal(out[row], expected[row]) for row in range(ids.shape[0]))
    # routing the prompt together with its continuation would (for this model) choose other leaves
    assert not torch.equal(model.base_model.leaf_routes(out)["sequence"], prompt_route)


def test_beams_follow_the_route_of_their_row():
    model = trained_looking(tree_model(make_tiny_llama(), depth=3, routing="sequence", router_init_scale=100.0)).eval()
    ids, mask = left_padded_prompts()
    prompt_route = model.base_model.leaf_routes(ids, attention_mask=mask)["sequence"]
    out = greedy(model, ids, mask, num_beams=2)
    expected = generated_row_by_row_with_its_prompt_leaf(model, ids, mask, prompt_route, num_beams=2)
    assert all(torch.equal(out[row], expected[row]) for row in range(ids.shape[0]))


def test_a_new_batch_after_generation_is_routed_anew():
    model = trained_looking(tree_model(make_tiny_llama(), depth=4, routing="sequence", router_init_scale=100.0)).eval()
    ids, mask = left_padded_prompts()
    other, other_mask = torch.flip(ids, dims=[0]), torch.flip(mask, dims=[0])
    with torch.no_grad():
        before = model(input_ids=other, attention_mask=other_mask).logits
        greedy(model, ids, mask)
        after = model(input_ids=other, attention_mask=other_mask).logits
    torch.testing.assert_close(after, before)
