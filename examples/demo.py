"""A one-minute tour: attach a TreeLoRA to a small Llama, train it, save, reload, route and generate."""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_tree_lora  # noqa: F401  (registers TreeLoRA with PEFT)
from peft_tree_lora import TreeLoraConfig


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, TreeLoraConfig(depth=2, r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    # two "languages": even tokens counting up, odd tokens counting down
    up = torch.arange(0, 32, 2).repeat(4, 1)
    down = torch.arange(63, 31, -2).repeat(4, 1)
    batch = torch.cat([up, down])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(40):
        outputs = model(input_ids=batch, labels=batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  loss {outputs.loss.item():.3f}  router losses {float(outputs.aux_loss):.4f}")

    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), out)
        reloaded.load_state_dict(model.state_dict(), strict=False)  # same base weights as the trained model
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(batch).logits, reloaded(batch).logits)
        print(f"saved and reloaded: identical logits = {same}")
        routes = model.base_model.leaf_routes(batch[:, :8])
        first = next(iter(routes))
        print(f"leaves taken in {first} (row 0 counts up, row 4 counts down):")
        print(routes[first][[0, 4]])
        print(
            "greedy continuation of 0 2 4:",
            model.generate(input_ids=up[:1, :3], max_new_tokens=6, do_sample=False)[0].tolist(),
        )


if __name__ == "__main__":
    main()
