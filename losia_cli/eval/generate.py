"""Batched generation for evaluation: left padding (decoder-only), greedy or sampled, stop strings."""

from __future__ import annotations

import contextlib

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@contextlib.contextmanager
def _left_padding(tokenizer):
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated text contains a stop string. Decoding the new tokens
    each step is cheap next to the forward pass, unlike transformers' `stop_strings`, which
    precomputes a table over the whole vocabulary on every `generate` call."""

    def __init__(self, tokenizer, stop: list[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: list[str] | tuple[str, ...] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    add_special_tokens: bool = False,
) -> list[list[str]]:
    """`num_samples` completions per prompt (the continuation text only, cut at the first stop
    string). Greedy unless `do_sample`. Prompts are batched longest-first to waste less padding;
    results come back in the input order."""
    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy samples would be identical)")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    generator_kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens,
                            num_return_sequences=num_samples)
    if do_sample:
        generator_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        generator_kwargs.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with _left_padding(tokenizer):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            criteria = StoppingCriteriaList(
                [StopOnStrings(tokenizer, list(stop), enc["input_ids"].shape[1])] if stop else []
            )
            out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, stopping_criteria=criteria,
                                 **generator_kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, text in enumerate(texts):
                results[idx[j // num_samples]].append(truncate_at_stop(text, stop))
    return results


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """One completion per prompt (greedy by default); see `generate_samples` for the options."""
    return [samples[0] for samples in generate_samples(model, tokenizer, prompts, **kwargs)]
