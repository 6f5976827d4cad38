"""render_samples: a few rows as the model sees them, with the loss mask visible (`recipes validate`)."""

from __future__ import annotations

from itertools import groupby

from rich.text import Text

from losia_cli.data.config import DataConfig
from losia_cli.data.dataset import make_encoder, resolve_task
from losia_cli.data.sources import Source, prepare_rows
from losia_cli.data.tokenization import IGNORE

# Loss-bearing text sits between these marks, so the mask also shows in plain text (str(Text)).
TARGET_OPEN, TARGET_CLOSE = "⟦", "⟧"


def render_samples(cfg: DataConfig, tokenizer, n: int = 2) -> list[Text]:
    """The first `n` rows (of each source of a mixture) tokenized exactly as build_dataset does,
    decoded run by run: prompt (masked) tokens dim, target tokens bold green between ⟦ ⟧, special
    tokens such as EOS shown."""
    out = []
    for part, _ in cfg.components():
        out += _render_source(part, tokenizer, n)
    return out


def _render_source(cfg: DataConfig, tokenizer, n: int) -> list[Text]:
    task = resolve_task(cfg)
    source = Source(cfg)
    rows = prepare_rows(cfg, source, task.fields, task.path)
    encoder = make_encoder(cfg, task, source, tokenizer)
    out = []
    for i in range(min(n, len(rows))):
        samples, dropped, truncated = encoder.encode([rows[i]], i)
        text = Text()
        if dropped or not samples:
            text.append(f"── {task.name} row {i}: dropped (longer than max_length={cfg.max_length}) ──", style="bold red")
            out.append(text)
            continue
        # A preference pair shows both sides, each with its own mask.
        sides = [samples[0]] if len(samples[0]) == 2 else [samples[0][:2], samples[0][2:]]
        note = ", truncated" if truncated else ""
        for k, (ids, labels) in enumerate(sides):
            name = "" if len(sides) == 1 else (" chosen", " rejected")[k]
            n_target = int((labels != IGNORE).sum())
            text.append(f"{chr(10) if k else ''}── {task.name} row {i}{name}: {len(ids)} tokens, "
                        f"{n_target} with loss{note} ──\n", style="bold")
            for is_target, run in groupby(zip(ids.tolist(), labels.tolist()), key=lambda p: p[1] != IGNORE):
                piece = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
                if is_target:
                    text.append(TARGET_OPEN, style="dim green")
                    text.append(piece, style="bold green")
                    text.append(TARGET_CLOSE, style="dim green")
                else:
                    text.append(piece, style="dim")
        out.append(text)
    return out
