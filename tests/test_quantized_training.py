"""QLoRA-style training: a 4-bit bitsandbytes base (real CPU backend), `prepare_model_for_kbit_training`, a TreeLoRA
on top, trained by the real `transformers.Trainer`. One short run per routing, shared by the tests below."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny_llama
from helpers import logits

from peft_tree_lora import TreeLoraConfig

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'bitsandbytes>=0.50')")

from datasets import Dataset  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
STEPS = 8


def quantized_base(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def packed_base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.data.clone() for name, p in model.named_parameters() if p.dtype == torch.uint8}


@pytest.fixture(scope="module", params=["token", "sequence"])
def qlora_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"qlora_{request.param}")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(root / "base")  # 64: bnb's CPU block
    base = prepare_model_for_kbit_training(quantized_base(root / "base"))
    torch.manual_seed(0)
    config = TreeLoraConfig(
        depth=2, r=4, lora_alpha=8, routing=request.param, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    packed_before = packed_base_weights(model)
    ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(root / "run"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    model.save_pretrained(root / "adapter")
    packed_after = packed_base_weights(model)  # now: an evaluation pass may repack the weights for bnb's CPU kernel
    log = trainer.state.log_history
    return dict(root=root, model=model.eval(), log=log, before=before, packed=(packed_before, packed_after))


def test_qlora_training_lowers_the_loss_and_changes_every_adapter_tensor(qlora_run):
    losses = [entry["loss"] for entry in qlora_run["log"] if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    after = dict(qlora_run["model"].named_parameters())
    assert qlora_run["before"] and all(not torch.equal(after[n], p) for n, p in qlora_run["before"].items())


def test_qlora_training_leaves_the_4bit_base_weights_untouched(qlora_run):
    before, after = qlora_run["packed"]
    assert before and after.keys() == before.keys()
    assert all(torch.equal(after[name], weight) for name, weight in before.items())


def test_an_adapter_trained_on_a_4bit_base_reloads_onto_a_fresh_4bit_base_with_the_same_logits(qlora_run, input_ids):
    reloaded = PeftModel.from_pretrained(quantized_base(qlora_run["root"] / "base"), qlora_run["root"] / "adapter")
    torch.testing.assert_close(logits(reloaded.eval(), input_ids), logits(qlora_run["model"], input_ids))
