"""GGUF files as llama.cpp itself reads them: the program they exist for, stricter than transformers'
reader (it refuses a whole file over one name it does not know). Needs the `[llamacpp]` extra
(llama-cpp-python, which builds llama.cpp from source)."""

from __future__ import annotations

import pytest
import torch
from test_export import SPM_TEXT, TEXT, _bpe_tokenizer, _tiny_model
from test_export import bpe_llama_dir, gemma_dir, spm_llama_dir  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from losia_cli.cli import main
from losia_cli.export import llama_cpp_names, round_like_gguf_

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llamacpp] extra) is not installed")
pytestmark = pytest.mark.slow

TEXTS = (TEXT, "Numbers 1234567 and 3.14, it's   spaced\n\nout", " leading space, 日本語 and emoji 🦙")
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
# llama.cpp's CPU kernels round the activations too (to f16 for f16 weights, to 8-bit blocks for
# q8_0), which the rounded HF model does not: logits may differ by that rounding, bounded here as a
# share of the logit range. Measured on the tiny models: f16 at most 0.002, q8_0 at most 0.03;
# SmolLM2: 0.0013 and 0.037. Greedy tokens must agree wherever HF's best token leads the second by
# more than twice that bound.
RELATIVE_LOGIT_TOLERANCE = {"f16": 0.01, "q8_0": 0.05}


def _llama(path, **options):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                           verbose=False, **options)


def _check_runs_alike(source_dir, out, outtype, prompt=PROMPT, texts=TEXTS, steps=8):
    """llama.cpp tokenizes `texts` into the HF tokenizer's ids, and its logits along the HF model's
    greedy continuation of `prompt` are the rounded model's within the tolerance, with the same
    greedy tokens (teacher-forced: equal argmaxes at every step is an equal free-running greedy run).
    Returns (relative logit difference, steps decided by the margin, steps before the first undecided
    one, steps before the first argmax that differs)."""
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    llm = _llama(out)
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    model = round_like_gguf_(AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval(), outtype)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = model(torch.tensor([ids[:-1]])).logits[0, len(ids) - steps - 1:]
    llm.eval(ids[:-1])
    got = torch.from_numpy(llm.scores[len(ids) - steps - 1:len(ids) - 1].copy()).float()
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    bound = RELATIVE_LOGIT_TOLERANCE[outtype]
    assert relative <= bound, relative
    top2 = expected.topk(2).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * bound * expected.abs().max()
    same = got.argmax(-1) == expected.argmax(-1)
    assert same[decided].all()
    prefix = lambda mask: int(mask.int().cumprod(0).sum())  # noqa: E731
    return relative, int(decided.sum()), prefix(decided), prefix(same)


def _export(source, out, outtype="f16"):
    assert main(["export", str(source), "--format", "gguf", "--outtype", outtype, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("family, split", [("llama", "smollm2"), ("llama", "llama-bpe"), ("llama-bias", "gpt-2"),
                                           ("mistral", "smollm2"), ("qwen2", "qwen2"), ("qwen3", "qwen2"),
                                           ("qwen3", "smollm2")])
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_family_runs_in_llama_cpp(tok, tmp_path, family, split, outtype):
    """A tiny random model of each family, with SmolLM2's tokenizer or a tiny one with Llama-3's or
    Qwen2's split; weights scaled up so that the greedy tokens are decided by clear margins."""
    tokenizer = tok if split == "smollm2" else _bpe_tokenizer(split)
    source = tmp_path / "source"
    overrides = {"attention_bias": True} if family == "llama-bias" else {}  # q/k biases take the rope reorder
    model = _tiny_model(family.removesuffix("-bias"), len(tokenizer), initializer_range=0.2, **overrides)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    relative, decided, _, _ = _check_runs_alike(source, _export(source, tmp_path / "x.gguf", outtype), outtype)
    # f16 decides 5-8 of the 8 steps here; q8_0's wider bound may decide none of a random model's
    # (its logits are still held to the bound), SmolLM2's test holds q8_0 to all its tokens
    assert decided >= 1 or outtype == "q8_0"


def test_llama2_sentencepiece_runs_in_llama_cpp(spm_llama_dir, tmp_path):
    """Text only: llama.cpp's sentencepiece tokenizer puts its space prefix after every special token
    too ("<start_of_turn>user" -> "▁user"), as sentencepiece's legacy mode did, where transformers
    puts it before the text only; no metadata changes that, so a special token inside the text is left
    out here (the prompt's ids come from transformers either way)."""
    _check_runs_alike(spm_llama_dir, _export(spm_llama_dir, tmp_path / "x.gguf"), "f16", prompt=SPM_TEXT,
                      texts=(SPM_TEXT.split(" <start_of_turn>")[0], "Hello world\n\nfine"))


def test_gemma_runs_in_llama_cpp(gemma_dir, tmp_path):
    _check_runs_alike(gemma_dir, _export(gemma_dir, tmp_path / "x.gguf"), "f16", prompt=SPM_TEXT,
                      texts=(SPM_TEXT, "Hello world"))


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_smollm2_runs_in_llama_cpp(smollm2_dir, tmp_path, outtype):
    """The default run's model (the packaged SmolLM2-135M-Instruct), a trained one: f16 decides every
    greedy token of the reply by a clear margin (measured: logits within 0.0013 of the range), so all
    12 match. q8_0 (measured 0.037) leaves close calls, the first step among them: every decided
    step matches (checked in _check_runs_alike) and the reply matches up to the first close call at
    least (measured here: all 12 tokens matched, 8 of them decided)."""
    relative, decided, decided_prefix, agreed = _check_runs_alike(
        smollm2_dir, _export(smollm2_dir, tmp_path / "s.gguf", outtype), outtype, steps=12)
    if outtype == "f16":
        assert decided == agreed == 12, (relative, decided, agreed)
    else:
        assert agreed >= decided_prefix, (relative, decided_prefix, agreed)


def test_packaged_smollm2_keeps_its_digit_split(smollm2_dir):
    """package:smollm2-135m is a GGUF that transformers converts, and its reader does not know llama.cpp's
    `smollm` split (digits one by one): the converted tokenizer gives the ids llama.cpp gives reading
    the packaged file itself, digits included (without the fix "1234567" merges into "123" "456" "7")."""
    from losia_cli.models import _packaged_gguf

    llm = llama_cpp.Llama(model_path=str(_packaged_gguf("smollm2-135m")), vocab_only=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in (*TEXTS, "In 2024, 3.14159 and 1,000,000"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text


def test_the_names_list_is_llama_cpp_s(bpe_llama_dir, tmp_path, monkeypatch):
    """llama_cpp_names.json is what this llama.cpp accepts: every pre-tokenizer listed loads, a name
    not listed (`gpt2`, which the first exporter wrote) and an unknown architecture do not."""
    from losia_cli import export

    model = AutoModelForCausalLM.from_pretrained(bpe_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(bpe_llama_dir)
    names = llama_cpp_names()

    def loads(path):
        try:
            llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except ValueError:
            return False
        return True

    for pre in [*names["pre_tokenizers"], "gpt2"]:
        monkeypatch.setattr(export, "_pre_tokenizer", lambda _: pre)
        monkeypatch.setattr(export, "_accepted", lambda kind, name: name)
        path = tmp_path / f"{pre}.gguf"
        export._write(path, model, tokenizer, "x", "f16")
        assert loads(path) == (pre != "gpt2"), pre
    import gguf

    class UnknownArchitecture(gguf.GGUFWriter):
        def __init__(self, path, arch, *args, **kwargs):
            super().__init__(path, "llama-not-an-arch", *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFWriter", UnknownArchitecture)
    export._write(tmp_path / "arch.gguf", model, tokenizer, "x", "f16")
    assert not loads(tmp_path / "arch.gguf")
