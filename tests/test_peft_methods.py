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


@pytest.mark.parametrize(("adapter_dtype", "expected"), [("fp32", torch.float32), ("base", torch.bfloat16)])
def test_adapter_dtype_under_a_bf16_base(adapter_dtype, expected):
    """peft upcasts adapters to fp32 by default; `adapter_dtype: base` keeps them in the base dtype
    (bench's `lora_bf16`, the fair baseline under bf16)."""
    method = PeftMethod(PeftMethodConfig(name="lora", rank=4, adapter_dtype=adapter_dtype))
    model = method.prepare(tiny_llama().to(torch.bfloat16), TrainContext(schedule=WarmupCosine(3), total_steps=3))
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    assert adapters and {p.dtype for p in adapters} == {expected}
