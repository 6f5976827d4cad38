"""LoRA / DoRA / PiSSA through peft: the saved adapter applied to the ORIGINAL base reproduces the
trained model (PiSSA's residual base is converted away at save time)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_losia_support import VOCAB, tiny_llama

from losia_cli.methods import TrainContext, WarmupCosine
from losia_cli.methods.peft_methods import PeftMethod, PeftMethodConfig


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_saved_adapter_on_the_original_base_matches_training(name, tmp_path):
    method = PeftMethod(PeftMethodConfig(name=name, rank=4, pissa_niter=None))
    model = method.prepare(tiny_llama(), TrainContext(schedule=WarmupCosine(3), total_steps=3))
    optimizer = torch.optim.AdamW(method.param_groups(1e-2, 0.0)[0]["params"], lr=1e-2)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits
    method.save(method.export(model), tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, trained, atol=1e-4, rtol=0)
