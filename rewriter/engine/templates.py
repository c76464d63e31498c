"""Templates: the Python half of a rule, registered by name.

A template is `fn(ctx: RewriteContext, match: Match, **args) -> None`; it edits the graph through the
context's helpers. The registry maps template *names* to functions (not layer names to state), so
it is safe to share between models. Templates live in the modules of the `hfrewrite.rules` package;
`import_template_modules` imports them all, in sorted order, so a rule file can name any of them.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hfrewrite.errors import RuleError

TemplateFunction = Callable[..., None]


@dataclass(frozen=True)
class RegisteredTemplate:
    """A template function with the equation it claims (shown by explain, checked by its test)."""

    name: str
    function: TemplateFunction
    equation: str = ""

    @property
    def origin(self) -> str:
        """module.qualname of the function, for messages."""
        return f"{self.function.__module__}.{self.function.__qualname__}"

    def __call__(self, ctx: Any, match: Any, **kwargs: Any) -> None:
        self.function(ctx, match, **kwargs)

    def argument_problem(self, args: dict[str, Any]) -> str | None:
        """Why `args` (from rewrite.args) cannot be passed to the function, or None if they can."""
        try:
            inspect.signature(self.function).bind(None, None, **args)
        except TypeError as error:
            return str(error)
        return None


_TEMPLATES: dict[str, RegisteredTemplate] = {}


def register_template(name: str, *, equation: str = "") -> Callable[[TemplateFunction], TemplateFunction]:
    """Decorator: register `fn` under `name`. Re-registering the same function (a reload) replaces it."""

    def decorate(function: TemplateFunction) -> TemplateFunction:
        entry = RegisteredTemplate(name, function, equation)
        existing = _TEMPLATES.get(name)
        # the same function imported twice under two module names (pytest's importlib mode) is a reload
        if existing is not None and _defined_at(existing.function) != _defined_at(function):
            raise RuleError(f"template {name!r} registered twice: by {existing.origin} and by {entry.origin}")
        _TEMPLATES[name] = entry
        return function

    return decorate


def _defined_at(function: TemplateFunction) -> tuple[str, str]:
    return function.__code__.co_filename, function.__qualname__


def get_template(name: str) -> RegisteredTemplate:
    """The template called `name`; RuleError listing the known ones if there is none."""
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise RuleError(f"unknown template {name!r}; known templates: {', '.join(known_templates()) or 'none'}") \
            from None


def known_templates() -> list[str]:
    """Registered template names, sorted."""
    return sorted(_TEMPLATES)


def import_template_modules(package: str = "hfrewrite.rules") -> list[str]:
    """Import the `templates` module of every family folder of `package` (sorted) so its templates register."""
    root = importlib.import_module(package)
    imported = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda module: module.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        family = importlib.import_module(f"{package}.{info.name}")
        if any(sub.name == "templates" for sub in pkgutil.iter_modules(family.__path__)):
            imported.append(importlib.import_module(f"{package}.{info.name}.templates").__name__)
    return imported
