"""Log-likelihood multiple-choice scoring, as lm-evaluation-harness does it: the summed log-prob of
each option's continuation given its context; `acc` is the argmax of that sum, `acc_norm` the
argmax of the sum divided by the continuation's length in characters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losia_cli.eval.results import mean_stderr


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens), lm-eval's boundary rule: trailing spaces of the
    context move to the continuation; the continuation is the suffix of encode(context +
    continuation) after encode(context) when that is a prefix, else the two encoded separately."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole_ids = tokenizer.encode(context + continuation, add_special_tokens=False)
    if whole_ids[: len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
        return context_ids, whole_ids[len(context_ids):]
    return context_ids, tokenizer.encode(continuation, add_special_tokens=False)


@torch.no_grad()
def loglikelihoods(
    model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16, max_length: int | None = None
) -> list[float]:
    """Summed log-prob of each continuation given its context. An empty context is replaced by the
    BOS (or EOS) token so the first continuation token is still conditioned on something."""
    model.eval()
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not ctx:
            ctx = [prefix]
        # Input is everything but the last token; keep the rightmost max_length (the continuation).
        encoded.append(((ctx + cont)[-(max_length + 1):][:-1], cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(encoded[idx[0]][0])
        inputs = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: positions of real tokens are unchanged
            ids = encoded[i][0]
            inputs[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logprobs = F.log_softmax(
            model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1
        )
        for row, i in enumerate(idx):
            ids, cont = encoded[i]
            positions = torch.arange(len(ids) - len(cont), len(ids))
            target = torch.tensor(cont)
            scores[i] = logprobs[row, positions, target.to(device)].sum().item()
    return scores


def score_multiple_choice(model, tokenizer, items: list[dict], *, batch_size: int = 16) -> dict:
    """Items: {contexts: [...] or context: str, continuations: [...], gold: int} (one context per
    option, or one shared). Returns {metrics: {acc, acc_norm}, stderr, n, samples}."""
    requests, spans = [], []
    for item in items:
        conts = item["continuations"]
        contexts = item.get("contexts") or [item["context"]] * len(conts)
        spans.append((len(requests), len(conts)))
        requests += list(zip(contexts, conts))
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    acc, acc_norm, samples = [], [], []
    for item, (start, count) in zip(items, spans):
        ll = scores[start : start + count]
        norm = [s / max(1, len(c)) for s, c in zip(ll, item["continuations"])]
        pred = max(range(count), key=ll.__getitem__)
        pred_norm = max(range(count), key=norm.__getitem__)
        acc.append(float(pred == item["gold"]))
        acc_norm.append(float(pred_norm == item["gold"]))
        samples.append({"prompt": (item.get("contexts") or [item.get("context")])[0],
                        "output": item["continuations"][pred], "loglik": ll, "pred": pred,
                        "pred_norm": pred_norm, "gold": item["gold"], "correct": bool(acc[-1])})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"metrics": {"acc": mean(acc), "acc_norm": mean(acc_norm)},
            "stderr": {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, "n": len(items),
            "samples": samples}
