"""Data pipeline: sources (hub / local files / packaged / bundled), task templates, tokenization with
a loss mask, packing or padding, and a tokenized-data cache.

    data = build_dataset(cfg, tokenizer, cache_dir=resources.cache_dir() / "data")
    loader = DataLoader(data, batch_size=..., shuffle=True, collate_fn=make_collator(cfg, tokenizer))
"""

from losia_cli.data.collate import make_collator
from losia_cli.data.config import DataConfig
from losia_cli.data.dataset import TokenizedData, build_dataset
from losia_cli.data.preview import render_samples
from losia_cli.data.tasks import Task, get_task, list_tasks, load_task

__all__ = [
    "DataConfig",
    "Task",
    "TokenizedData",
    "build_dataset",
    "get_task",
    "list_tasks",
    "load_task",
    "make_collator",
    "render_samples",
]
