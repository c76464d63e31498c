"""Templates, the Python half of a rule, and the TemplateLibrary a rule set is checked and applied with.

A template is `fn(ctx: RewriteContext, match: Match, **args) -> None`; it edits the graph through the
context's helpers. `@template(name)` turns such a function into a `Template` (still callable); a
rules family lists its templates in a module-level `TEMPLATES` sequence of its `templates.py`. A
`TemplateLibrary` is a plain object built from such lists: the shipped one from every family of
`hfrewrite.rules` (`shipped_library()`), a test's from its own templates; nothing is registered
globally, so two libraries in one process never see each other's templates.

A template may carry a guard, `guard(match, **args) -> str | None`: the reason a match is not a site
it rewrites (a dataflow fact the pattern language cannot say). The matcher asks it, so a refused site
is a near miss that explain shows, and no other rule's match at the same priority collides with it.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hfrewrite.errors import RuleError

TemplateFunction = Callable[..., None]
TemplateGuard = Callable[..., "str | None"]
RULES_PACKAGE = "hfrewrite.rules"
TEMPLATES_ATTRIBUTE = "TEMPLATES"


@dataclass(frozen=True)
class Template:
    """A template function under its rule-facing name, with the equation it claims (shown by explain)."""

    name: str
    function: TemplateFunction
    equation: str = ""
    guard: TemplateGuard | None = None

    def site_problem(self, match: Any, args: dict[str, Any]) -> str | None:
        """Why the guard refuses `match` (with the rule's rewrite args), or None (no guard: every match)."""
        return None if self.guard is None else self.guard(match, **args)

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

    def defined_at(self) -> tuple[str, str]:
        """(file, qualname): the same function imported under two module names is still one template."""
        return self.function.__code__.co_filename, self.function.__qualname__


RegisteredTemplate = Template  # the name this type had while templates lived in a global registry


def template(name: str, *, equation: str = "",
             guard: TemplateGuard | None = None) -> Callable[[TemplateFunction], Template]:
    """Decorator: `fn` as the Template called `name` (list it in the module's TEMPLATES to ship it)."""

    def decorate(function: TemplateFunction) -> Template:
        return Template(name, function, equation, guard)

    return decorate


class TemplateLibrary:
    """Templates by name, for one rule set: the loader checks rules against it, apply and explain run from it."""

    def __init__(self, templates: Iterable[Template] = ()) -> None:
        self._templates: dict[str, Template] = {}
        for entry in templates:
            self.add(entry)

    def add(self, entry: Template) -> Template:
        """Add `entry`; a second, different template under the same name is a RuleError naming both."""
        if not isinstance(entry, Template):
            raise TypeError(f"{entry!r} is not a Template; decorate the function with @template(NAME)")
        existing = self._templates.get(entry.name)
        if existing is not None and existing.defined_at() != entry.defined_at():
            raise RuleError(f"template {entry.name!r} defined twice: by {existing.origin} and by {entry.origin}")
        self._templates[entry.name] = entry
        return entry

    def extended(self, templates: Iterable[Template]) -> TemplateLibrary:
        """A new library: these templates and `templates` (this one is left as it is)."""
        return TemplateLibrary([*self._templates.values(), *templates])

    def get(self, name: str) -> Template:
        """The template called `name`; RuleError listing the known ones if there is none."""
        try:
            return self._templates[name]
        except KeyError:
            raise RuleError(f"unknown template {name!r}; known templates: {', '.join(self.names()) or 'none'}") \
                from None

    def names(self) -> list[str]:
        """Template names, sorted."""
        return sorted(self._templates)

    def __contains__(self, name: object) -> bool:
        return name in self._templates

    def __iter__(self) -> Iterator[Template]:
        return iter(self._templates[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._templates)

    @classmethod
    def from_modules(cls, modules: Iterable[ModuleType]) -> TemplateLibrary:
        """The templates every module lists in its TEMPLATES sequence."""
        library = cls()
        for module in modules:
            listed = getattr(module, TEMPLATES_ATTRIBUTE, None)
            if listed is None:
                raise RuleError(f"template module {module.__name__} has no {TEMPLATES_ATTRIBUTE} list")
            for entry in listed:
                library.add(entry)
        return library


def family_template_modules(package: str = RULES_PACKAGE) -> list[ModuleType]:
    """The `templates` module of every family folder of `package`, imported, in sorted family order."""
    root = importlib.import_module(package)
    modules = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda module: module.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        family = importlib.import_module(f"{package}.{info.name}")
        if any(sub.name == "templates" for sub in pkgutil.iter_modules(family.__path__)):
            modules.append(importlib.import_module(f"{package}.{info.name}.templates"))
    return modules


def shipped_library(package: str = RULES_PACKAGE) -> TemplateLibrary:
    """A new library of the templates the rules families of `package` ship."""
    return TemplateLibrary.from_modules(family_template_modules(package))
