"""The embedded defaults: the corpus (fast) and `tree-lora train` on the real SmolLM2-135M (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from peft_tree_lora.app.cli import main
from peft_tree_lora.app.data import HELD_OUT_PERCENT
from peft_tree_lora.app.embedded import embedded_corpus, embedded_model_dir, load_embedded_model


def test_embedded_corpus_mixes_python_docs_and_shakespeare_with_a_fixed_held_out_split():
    first, second = embedded_corpus(), embedded_corpus()
    assert first.train == second.train and first.held_out == second.held_out
    assert "Python documentation" in first.description and "Shakespeare" in first.description
    prefix = "".join(first.train[:40])
    assert "Python" in prefix and ("KING" in prefix or "Enter" in prefix)  # any prefix mixes both sources
    held_out = set(first.held_out)
    assert not held_out & set(first.train)
    assert 0.01 < len(first.held_out) / (len(first.train) + len(first.held_out)) < 3 * HELD_OUT_PERCENT / 100


@pytest.fixture(scope="session")
def embedded_dir():
    return embedded_model_dir()  # converts once (~20 s) and caches; later sessions load the cached copy


@pytest.mark.slow
def test_cached_copy_is_plain_fp32_safetensors(embedded_dir):
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (embedded_dir / "model.safetensors").is_file()
    model, tokenizer = load_embedded_model(verbose=False)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token_id is not None


@pytest.mark.slow
def test_train_on_the_embedded_defaults_learns_and_saves(embedded_dir, tmp_path, capsys):
    output = tmp_path / "smollm2"
    argv = ["train", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "1", "--eval-blocks", "2"]
    argv += ["--depth", "1", "--rank", "2", "--layers", "last2", "--target-modules", "q_proj,v_proj", "--quiet"]
    assert main([*argv, "-o", str(output)]) == 0
    run = json.loads((output / "tree_lora_run.json").read_text())
    losses = [loss for _, _, loss in run["eval_curve"]]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] < 6.0  # a real model: far below log(49152) = 10.8 of a random one
    model, _ = load_embedded_model(verbose=False)
    loaded = PeftModel.from_pretrained(model, str(output))
    assert loaded.base_model.parameter_counts()["total"] == run["trainable_params"]
    assert "held-out loss" in capsys.readouterr().out
