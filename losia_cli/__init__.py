"""losia: fine-tune LLMs with LoSiA / LoSiA-Pro from YAML recipes."""

from losia_cli.provenance import __version__  # noqa: F401  (the one place it is written)


def apply_delta(model, path):
    """Apply a `losia export --format delta` dir to its base model in place (see losia_cli.delta)."""
    from losia_cli.delta import apply_delta

    return apply_delta(model, path)


def __getattr__(name: str):
    """The Python API (api.py: `losia_cli.prepare`), imported on first use: `losia --help` stays torch-free."""
    if name in ("prepare", "Tuned"):
        from losia_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'losia_cli' has no attribute {name!r}")
