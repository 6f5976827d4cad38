"""Targets that fit the model: every method's default is each linear map inside the decoder blocks,
whatever the architecture names it; routers and the head are left out, MoE experts are trained by LoRA
(peft's target_parameters) and by LoSiA (a block per expert); what trains and what is left out (and why) is in the method's account."""

from __future__ import annotations

import pytest
import torch
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from transformers import AutoConfig, AutoModelForCausalLM

from losia_cli.errors import ConfigError, ModelError
from losia_cli.methods import TrainContext, WarmupCosine
from losia_cli.methods.galore import GaloreConfig, GaloreMethod
from losia_cli.methods.losia import LosiaConfig, LosiaMethod
from losia_cli.methods.losia.layer import SubnetLinear
from losia_cli.methods.peft_methods import PeftMethod, PeftMethodConfig
from losia_cli.methods.targets import candidates, default_linears, describe_line

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)}


def tiny(family: str, **extra):
    shape = {**SHAPE, **MOE.get(family, {}), **extra}
    if family == "falcon":
        del shape["head_dim"]  # a derived property there
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape))


def ctx() -> TrainContext:
    return TrainContext(schedule=WarmupCosine(2), total_steps=2)


# Short names of the default targets in one decoder block: the fused and the Conv1D ones included.
DEFAULT_KINDS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc", "c_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # experts are 3-D parameters, the router no linear map
}


@pytest.mark.parametrize("family", list(DEFAULT_KINDS))
def test_default_targets_are_every_linear_map_of_the_decoder_blocks(family):
    names = default_linears(tiny(family))
    assert [n.rsplit(".", 1)[-1] for n in names] == DEFAULT_KINDS[family] * 2
    assert all(".0." in n for n in names[: len(names) // 2]) and all(".1." in n for n in names[len(names) // 2 :])


def test_roles_of_a_mixture_of_experts_model():
    roles = {c.name: (c.role, c.block, c.matrices) for c in candidates(tiny("mixtral"))}
    assert roles["model.layers.1.mlp.gate"] == ("router", 1, 1)
    assert roles["model.layers.0.mlp.experts.gate_up_proj"] == ("experts", 0, 4)  # one matrix per expert
    assert roles["lm_head"] == ("head", None, 1)


@pytest.mark.parametrize("name", ["losia_pro", "losia"])
@pytest.mark.parametrize("family", ["phi3", "gpt2", "falcon"])
def test_losia_trains_the_fused_conv1d_and_falcon_maps_by_default(family, name):
    model = tiny(family)
    method = LosiaMethod(LosiaConfig(name=name))
    model = method.prepare(model, ctx())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SubnetLinear)]
    assert [n.rsplit(".", 1)[-1] for n in wrapped] == DEFAULT_KINDS[family] * 2
    assert [t.layer for t in method.targets] == [0] * 4 + [1] * 4  # slots from the decoder blocks, no pattern
    account = method.describe()["targets"]
    assert account["matrices"] == 8 and set(account["kinds"]) == set(DEFAULT_KINDS[family])
    assert account["params"] == sum(t.module.sub.numel() for t in method.targets)
    assert [item["kind"] for item in account["left_out"]] == ["lm_head"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_losia_trains_a_block_per_expert_and_leaves_routers_out(family):
    method = LosiaMethod(LosiaConfig())
    method.prepare(tiny(family), ctx())
    account = method.describe()["targets"]
    assert account["kinds"] == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2,
                                "experts.gate_up_proj": 2, "experts.down_proj": 2}
    assert account["matrices"] == 8 + 2 * 2 * 4  # an expert stack counts once per expert
    assert account["params"] == sum(t.module.sub.numel() for t in method.targets)
    why = {item["kind"]: item["why"] for item in account["left_out"]}
    assert list(why) == ["gate", "lm_head"] and "router" in why["gate"]
    experts = [(t.key, t.expert, t.layer) for t in method.targets if t.expert is not None]
    assert experts[:5] == [("model.layers.0.mlp.experts.gate_up_proj", e, 0) for e in range(4)] + [
        ("model.layers.0.mlp.experts.down_proj", 0, 0)]


@pytest.mark.parametrize("targets", [["experts"], ["gate_up_proj"], r".*experts.*"])
def test_losia_refuses_named_experts_it_cannot_train_in_one_line(targets):
    """Named experts of another layout (here: with biases) are refused; by default they are left out
    with the reason."""
    model = tiny("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.has_bias = True
    with pytest.raises(ConfigError, match=r"^method.target_modules names model.layers.0.mlp.experts.gate_up_proj: "
                                          r"MixtralExperts is not the gate_up_proj/down_proj expert layout"):
        LosiaMethod(LosiaConfig(target_modules=targets)).prepare(model, ctx())
    method = LosiaMethod(LosiaConfig())
    method.prepare(model, ctx())
    why = {item["kind"]: item["why"] for item in method.describe()["targets"]["left_out"]}
    assert "is not the gate_up_proj/down_proj expert layout" in why["experts.down_proj"]


def test_losia_trains_experts_in_one_process_only():
    from types import SimpleNamespace

    two = TrainContext(schedule=WarmupCosine(2), total_steps=2, dist=SimpleNamespace(world_size=2))
    with pytest.raises(ConfigError, match=r"^method.target_modules names model.layers.0.mlp.experts.down_proj: "
                                          r"MoE expert weights \(3-D\): losia_pro trains them in a single process"):
        LosiaMethod(LosiaConfig(target_modules=["down_proj"])).prepare(tiny("mixtral"), two)


def test_explicit_targets_still_override():
    method = LosiaMethod(LosiaConfig(target_modules=["qkv_proj"]))
    method.prepare(tiny("phi3"), ctx())
    assert [t.name for t in method.targets] == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
    left = {item["kind"]: item["why"] for item in method.describe()["targets"]["left_out"]}
    assert left["gate_up_proj"] == "not in method.target_modules"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_adapts_moe_experts_through_target_parameters(family):
    model = tiny(family)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = PeftMethod(PeftMethodConfig(name="lora", rank=2))
    peft_model = method.prepare(model, ctx())
    account = method.describe()["targets"]
    assert account["kinds"] == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2,
                                "experts.down_proj": 2, "experts.gate_up_proj": 2}
    assert account["matrices"] == 8 + 2 * 2 * 4  # an expert stack counts once per expert
    assert [item["kind"] for item in account["left_out"]] == ["gate", "lm_head"]
    # The adapter moves the experts: train the B matrices a step, fold, compare with the base.
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    assert not torch.equal(merged["model.layers.0.mlp.experts.gate_up_proj"], base["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(merged["model.layers.0.mlp.gate.weight"], base["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize(("cfg", "why"), [
    (dict(name="dora"), "with method=lora only, not dora"),
    (dict(name="lora", dropout=0.1), "only with method.dropout=0"),
])
def test_peft_configurations_that_cannot_adapt_experts_leave_them_out_with_the_reason(cfg, why):
    method = PeftMethod(PeftMethodConfig(rank=2, **cfg))
    method.prepare(tiny("mixtral"), ctx())
    left = {item["kind"]: item["why"] for item in method.describe()["targets"]["left_out"]}
    assert why in left["experts.gate_up_proj"]


def test_peft_default_targets_use_short_names_when_they_pick_the_same_modules():
    method = PeftMethod(PeftMethodConfig(name="lora", rank=2))
    assert method.targets(tiny("gpt2")) == (["c_attn", "c_fc", "c_proj"], None)
    modules, params = method.targets(tiny("mixtral"))
    assert modules == ["k_proj", "o_proj", "q_proj", "v_proj"] and len(params) == 4


def test_galore_projects_the_default_targets_and_trains_the_rest_densely():
    pytest.importorskip("galore_torch")
    method = GaloreMethod(GaloreConfig(rank=2))
    method.prepare(tiny("phi3"), ctx())
    account = method.describe()["targets"]
    assert account["kinds"] == {"o_proj": 2, "qkv_proj": 2, "gate_up_proj": 2, "down_proj": 2}
    assert account["left_out"] == [] and "trains densely" in account["note"]


@pytest.mark.parametrize(("family", "kernel"), [("gemma2", "sdpa"), ("gpt2", "flex_attention")])
def test_a_model_that_refuses_the_attention_kernel_is_one_line(family, kernel, tmp_path):
    """attn_implementation defaults to the model's own choice (Gemma-2: eager); a kernel the model
    refuses is one line naming the key."""
    from losia_cli.config import ModelConfig
    from losia_cli.models import load_model

    tiny(family).save_pretrained(tmp_path)
    assert load_model(ModelConfig(name_or_path=str(tmp_path)), str(tmp_path)) is not None
    with pytest.raises(ModelError, match=rf"^model.attn_implementation={kernel}: \w+ does not support "
                                         r"an attention implementation through [^\n]*\(null lets the model choose\)$"):
        load_model(ModelConfig(name_or_path=str(tmp_path), attn_implementation=kernel), str(tmp_path))


@pytest.mark.parametrize(("cfg", "message"), [
    (dict(target_modules=["experts"]), r"method.target_modules names model.layers.0.mlp.experts.gate_up_proj: "
                                       r"MoE expert weights \(3-D\) are not modules"),
    (dict(target_parameters=["nope"]), r"method.target_parameters=\['nope'\] matched no parameter"),
    (dict(name="dora", target_parameters=["experts.down_proj"]), r"method.target_parameters: .* not dora"),
])
def test_peft_refuses_expert_targets_it_cannot_honour_in_one_line(cfg, message):
    with pytest.raises(ConfigError, match=message):
        PeftMethod(PeftMethodConfig(**{"name": "lora", "rank": 2, **cfg})).prepare(tiny("mixtral"), ctx())


def test_a_named_router_is_accounted_as_trained():
    """peft adapts a transformers-5 router (not an nn.Linear) through its 2-D weight: the account names
    the router, not a stray `weight`."""
    method = PeftMethod(PeftMethodConfig(name="lora", rank=2, target_modules=["gate"]))
    method.prepare(tiny("mixtral"), ctx())
    account = method.describe()["targets"]
    assert account["kinds"] == {"gate": 2} and "gate" not in [item["kind"] for item in account["left_out"]]
