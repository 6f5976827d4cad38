"""Forgetting probe: mean per-token loss on a fixed general-text sample. Measure it before and after
fine-tuning; `after - before` (positive = forgot) is the reported delta."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# Plain encyclopedic/narrative English unrelated to the fine-tuning tasks (written for this probe;
# about 400 tokens with a Llama-style tokenizer).
GENERAL_TEXT = (
    "The river rises in the hills to the north and flows south for about two hundred kilometres before "
    "it reaches the sea. For centuries it carried timber, grain and wool to the coastal towns, and many "
    "of the villages along its banks grew up around old mills and river crossings.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "sugars. Oxygen is released as a by-product. The process takes place mainly in the leaves, inside "
    "small structures called chloroplasts that contain the pigment chlorophyll.",
    "She opened the window and listened to the rain on the roof of the shed. The kettle was starting to "
    "whistle in the kitchen, and somewhere down the street a dog barked twice and then fell silent. It "
    "was going to be a long, quiet afternoon.",
    "A library lends books, films and music to the people of a town, and it often offers free access to "
    "computers, newspapers and study rooms. Many libraries also run reading groups for children, "
    "language classes and talks by local historians.",
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, the "
    "members agreed to repair the bridge first, to delay the new sports hall, and to ask the regional "
    "government for help with the cost of the school buses.",
    "Mountains affect the weather around them. Moist air that is pushed up a slope cools, and the water "
    "it carries falls as rain or snow on the windward side, while the far side often stays dry. This "
    "is why deserts are sometimes found just beyond high ranges.",
)


@torch.no_grad()
def general_text_loss(model, tokenizer, texts: list[str] | tuple[str, ...] | None = None, *,
                      path: str | Path | None = None, max_length: int = 512) -> dict:
    """Token-weighted mean next-token loss over `texts` (default: the built-in paragraphs; or the
    non-empty paragraphs of the text file `path`). Returns {loss, tokens, texts}."""
    if path is not None:
        from losia_cli.errors import DataError
        from losia_cli.data.sources import check_readable

        check_readable(Path(path), "eval.general_text", folders=False)
        texts = [p.strip() for p in Path(path).read_text().split("\n\n") if p.strip()]
        if not texts:  # not the built-in sample in its place: the user asked for this text
            raise DataError(f"{path}: no text (eval.general_text)")
    texts = list(texts or GENERAL_TEXT)
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([(bos + tokenizer.encode(text, add_special_tokens=False))[:max_length]], device=device)
        logits = model(input_ids=ids).logits.float()
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return {"loss": total / count, "tokens": count, "texts": len(texts)}


def forgetting_delta(before: dict | float, after: dict | float) -> float:
    """after - before of the general-text loss: positive means the model forgot."""
    value = lambda r: r["loss"] if isinstance(r, dict) else float(r)  # noqa: E731
    return value(after) - value(before)
