"""prepare/targeting, dense extras, describe, export, and the recipe files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from losia_cli.methods.losia import LosiaConfig, LosiaMethod
from losia_cli.methods.losia.layer import SubnetLinear
from losia_cli.methods.losia.method import block_shape
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import batch, build, make_optimizer, tiny_gemma, tiny_llama, tiny_qwen2, train

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "method"


def wrapped_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, SubnetLinear)]


def test_prepare_freezes_all_but_the_blocks():
    model, method = build(name="losia_pro")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(name.endswith(".sub") for name in trainable)
    assert model.model.layers[1].mlp.down_proj.sub.shape == (8, 16)  # (32, 64) at p = 1/4
    assert method.name == "losia_pro" and method.cfg.use_pro
    assert not LosiaMethod(LosiaConfig(name="losia")).cfg.use_pro
    assert LosiaConfig(name="losia", pro=True).use_pro


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], 4),
        (["self_attn.o_proj"], 2),  # dotted suffix, like PEFT
        (r"model\.layers\.1\.mlp\..*", 3),  # a regex on the whole qualified name
        ("all-linear", 14),  # never the output head
    ],
)
def test_target_selectors(targets, expected):
    model, method = build(target_modules=targets)
    assert len(wrapped_names(model)) == expected
    assert "lm_head" not in wrapped_names(model)


def test_no_match_and_no_layer_index_are_clear_errors():
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        build(target_modules=["nope"])
    with pytest.raises(ValueError, match="slot_pattern"):
        build(slot_pattern=r"blocks\.(\d+)\.")


def test_dense_extras_policies():
    _, method = build(tiny_qwen2, dense_extras="norms")
    norms = method.extras
    assert len(norms) == 2 * 2 + 1 and all(p.dim() == 1 for p in norms)
    model, method = build(tiny_qwen2, dense_extras="all")
    names = {id(p): n for n, p in model.named_parameters()}
    extra_names = {names[id(p)] for p in method.extras}
    assert "model.embed_tokens.weight" in extra_names and "lm_head.weight" in extra_names
    assert "model.layers.0.self_attn.q_proj.bias" in extra_names
    assert not any(n.endswith("proj.weight") or n.endswith(".sub") for n in extra_names)
    # Tied head trained as a subnet: the shared embedding is its W, never a dense extra too.
    model, method = build(tiny_gemma, dense_extras="all", lm_head_rows=0.25)
    assert all(p is not model.lm_head.weight for p in method.extras)


def test_block_shape_and_lora_parity():
    cfg = LosiaConfig()
    assert block_shape(4096, 4096, cfg, False)[:2] == (512, 512)
    assert block_shape(11008, 4096, cfg, False)[:2] == (1376, 512)
    assert block_shape(3, 5, cfg, False)[:2] == (1, 1)  # never empty
    rows, cols, p = block_shape(4096, 4096, LosiaConfig(lora_rank=16), False)
    assert p == pytest.approx(math.sqrt(16 * 8192 / 4096**2))
    assert abs(rows * cols - 16 * 8192) / (16 * 8192) < 0.01
    assert block_shape(1000, 64, LosiaConfig(lm_head_rows=0.125), True)[:2] == (125, 64)


def test_describe():
    _, method = build(dense_extras="norms")
    info = method.describe()
    assert info["method"] == "losia_pro" and info["matrices"] == 14 and info["slots"] == 2
    # Per layer at p = 1/4: q, o 8x8; k, v 4x8; gate, up 16x8; down 8x16.
    assert info["subnet_params"] == 2 * (2 * 64 + 2 * 32 + 3 * 128)
    assert info["trainable_params"] == info["subnet_params"] + info["dense_extra_params"] == 1152 + 5 * 32
    assert info["optimizer_state_bytes"] == 2 * 4 * info["trainable_params"]
    assert info["total_params"] == sum(p.numel() for p in tiny_llama().parameters())
    assert info["rank_factor"]["mean"] == 0.25
    assert info["scoring_buffer_bytes"] == 3 * 4 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)


def test_subnet_records_and_seeded_initial_blocks():
    records_a, records_b = [], []
    build(records=records_a)
    build(records=records_b)
    assert records_a == records_b  # every DDP rank starts from the same blocks
    other = []
    build(records=other, ctx_kw={"seed": 99})
    assert other != records_a
    magnitude = []
    model, _ = build(records=magnitude, init="magnitude")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert magnitude[0]["rows"] == weight.abs().sum(1).topk(8).indices.sort().values.tolist()


@pytest.mark.parametrize(
    "model_fn, cfg",
    [(tiny_llama, {}), (tiny_gemma, {"lm_head_rows": 0.25})],
    ids=["llama", "gemma-tied-head"],
)
def test_export_gives_the_same_logits_as_a_plain_model(tmp_path, model_fn, cfg):
    model, method = build(model_fn, name="losia_pro", **cfg)
    optimizer = make_optimizer(method)
    train(model, method, optimizer, range(8))
    ids = batch(99, 0)
    with torch.no_grad():
        wrapped_logits = model(input_ids=ids).logits
    plain = method.export(model)
    assert not any(isinstance(m, SubnetLinear) for m in plain.modules())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    assert set(plain.state_dict()) == set(model_fn().state_dict())  # vanilla keys only
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, wrapped_logits)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight or model_fn is tiny_llama

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, wrapped_logits)

    # export leaves the training model as it was: it keeps training.
    assert wrapped_names(model)
    train(model, method, optimizer, range(8, 10))


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
def test_recipe_files_hold_only_schema_fields(name):
    """The schema is the one source of defaults: a recipe file lists only what it sets (its paper
    settings), and every key it lists is a field of the schema."""
    fields = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert set(fields) <= {f.name for f in dataclasses.fields(LosiaConfig)}
    assert LosiaConfig(**fields).name == name


@pytest.mark.parametrize("word, message", [
    ("method.rank_factr=0.1", "unknown key 'method.rank_factr'"),
    ("method.period=x", "method.period: Input should be a valid integer"),  # a wrong type
    ("method.rank_factor=0", "method.rank_factor: must be in (0, 1] (got 0.0)"),
    ("method.rank_factor=1.5", "method.rank_factor: must be in (0, 1]"),
    ("method.lora_rank=0", "method.lora_rank: must be > 0"),
    ("method.period=0", "method.period: must be >= 1"),
    ("method.rewarm_steps=-1", "method.rewarm_steps: must be >= 0"),
    ("method.beta1=1", "method.beta1: must be in [0, 1)"),
    ("method.beta2=-0.1", "method.beta2: must be in [0, 1)"),
    ("method.lm_head_rows=2", "method.lm_head_rows: must be in [0, 1]"),
    ("method.slot_pattern='layers\\.\\d+'", "method.slot_pattern: needs a capture group"),
    ("method.slot_pattern='('", "method.slot_pattern: not a regex"),
    ("method.target_modules='q_proj('", "method.target_modules: not a regex"),
    ("method.target_modules=[]", "method.target_modules: is empty"),
])
def test_config_is_strict(word, message):
    """The method config is a plain dataclass (bench builds it without pydantic); the run config still
    refuses unknown keys, wrong types and out-of-range values in one line naming the key."""
    from losia_cli.compose import load_config
    from losia_cli.errors import LosiaError

    with pytest.raises(LosiaError) as e:
        load_config(["method=losia_pro", word], quiet=True)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_refuses_unknown_keys_from_a_file():
    from losia_cli.compose import load_config
    from losia_cli.config import validate
    from losia_cli.errors import ConfigError

    raw = load_config(["method=losia_pro"], quiet=True).model_dump()
    raw["method"]["rank_factr"] = 0.1
    with pytest.raises(ConfigError, match="method.rank_factr: Unexpected keyword argument"):
        validate(raw)


def test_config_checks_ranges_without_pydantic():
    with pytest.raises(ValueError, match="rank_factor"):
        LosiaConfig(rank_factor=0.0)
    assert LosiaConfig(period=7).rewarm_length == 7 and LosiaConfig(rewarm_steps=0).rewarm_length == 0
