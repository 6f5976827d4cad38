"""GaLore baseline through galore-torch: a tiny Llama trains with the method's own optimizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("galore_torch")

from losia_cli.methods.base import TrainContext, WarmupCosine  # noqa: E402
from losia_cli.methods.galore import GaloreConfig, GaloreMethod  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("key, value, message", [
    ("bogus", 1, "method.bogus: Unexpected keyword argument"),
    ("rank", 0, "method.rank: must be > 0 (got 0)"),
    ("update_proj_gap", -1, "method.update_proj_gap: must be > 0"),
    ("proj_type", "up", "method.proj_type: Input should be"),
])
def test_config_refuses_bad_keys_and_values(key, value, message):
    from losia_cli.compose import load_config
    from losia_cli.config import validate
    from losia_cli.errors import ConfigError

    raw = load_config(["method=galore"], quiet=True).model_dump()
    raw["method"][key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(raw)


def test_galore_trains_tiny_llama():
    method = GaloreMethod(GaloreConfig(rank=8, update_proj_gap=2, scale=1.0))
    model = method.prepare(tiny_llama(), TrainContext(schedule=WarmupCosine(5), total_steps=5))
    groups = method.param_groups(1e-2, 0.0)
    galore = groups[0]
    assert galore["name"] == "galore" and galore["rank"] == 8 and len(galore["params"]) == 2 * 7
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # everything trains
    optimizer = method.make_optimizer(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    assert type(optimizer).__module__.startswith("galore_torch")

    targets = {id(p): p.detach().clone() for p in galore["params"]}
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step(step, optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, targets[id(p)]) for p in galore["params"])
    # Moments live in the rank-8 space: 64x64 q_proj -> 64x8, not 64x64.
    state = optimizer.state[model.model.layers[0].self_attn.q_proj.weight]
    assert state["exp_avg"].shape == (64, 8)
    info = method.describe()
    assert info["trainable_params"] == info["total_params"]
    assert 0 < info["optimizer_state_bytes"] < 2 * 4 * info["total_params"]
