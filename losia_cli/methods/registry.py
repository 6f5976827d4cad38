"""The one method registry: `method.name` in a recipe -> the `Method` class that implements it.

A method is one file with a config and a `Method` subclass, plus one `register(...)` line in
methods/__init__.py; config, merge, continual and bench read its capabilities from here.
"""

from __future__ import annotations

from losia_cli.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register `cls` under each of its `names`."""
    for name in cls.names:
        if name in _METHODS:
            raise ValueError(f"method name {name!r} is registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    return _METHODS[name]


def config_classes() -> tuple[type, ...]:
    """Each registered config class once, in registration order (the `method:` union)."""
    return tuple(dict.fromkeys(cls.config_class for cls in _METHODS.values()))


def exports_adapter(name: str) -> bool:
    """Whether a run of method `name` saves an adapter in `final/` (folded by `losia merge`)."""
    return _METHODS[name].export_kind == "adapter"


def build_method(cfg) -> Method:
    return _METHODS[cfg.name](cfg)
