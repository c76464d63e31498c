"""Finding and loading rule files into a `RuleSet`.

The shipped rules are the YAML files of the `hfrewrite.rules` package. Files under its `arch/`
folder are for particular model types: they are loaded only when passed explicitly, or by
`shipped_rule_paths(model_type)` when the file declares that model type in `models:` (file level or
on a rule), so one model's patches never run on another.
"""
from __future__ import annotations

import importlib.resources
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from hfrewrite.errors import RuleError
from hfrewrite.engine.schema import Rule, RuleSet, order_key
from hfrewrite.engine.templates import TemplateLibrary, shipped_library
from hfrewrite.engine.validate import parse_rule_file

RULES_PACKAGE = "hfrewrite.rules"
RULE_SUFFIXES = (".yaml", ".yml")
ARCH_FOLDER = "arch"


def read_rule_file(path: Path, file_index: int = 0) -> list[Rule]:
    """The rules of one file; unreadable or non-UTF-8 files are RuleErrors too."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise RuleError(f"{path}: cannot read rule file: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        raise RuleError(f"{path}:{line}: rule file is not UTF-8 text ({error.reason})") from error
    rules = parse_rule_file(text, str(path), file_index)
    if not rules:
        warnings.warn(f"{path}: rule file holds no rules (empty, or `rules:` with nothing under it)",
                      EmptyRuleFileWarning, stacklevel=2)
    return rules


class EmptyRuleFileWarning(UserWarning):
    """A rule file the user named holds no rules (likely the wrong file, or an unfinished one)."""


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given; directories -> their *.yaml and *.yml files, recursively, sorted."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in RULE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise RuleError(f"{path}: no such rule file or directory")
    return files


def load_rules(paths: Sequence[Path | str], *, library: TemplateLibrary | None = None,
               check_templates: bool = True) -> RuleSet:
    """Load, validate and order the rules of `paths` (files or directories), for the templates of `library`.

    `library` defaults to the shipped templates (`shipped_library()`); the RuleSet carries it to apply
    and explain. With `check_templates` (the default) every rule's template must be in the library and
    accept its `rewrite.args`, so a typo fails here rather than mid-rewrite.
    """
    files = expand_paths(paths)
    rules: list[Rule] = []
    for index, path in enumerate(files):
        rules.extend(read_rule_file(path, index))
    _check_unique(rules)
    if check_templates:
        library = shipped_library() if library is None else library
        for rule in rules:
            check_template(rule, library)
    return RuleSet(tuple(sorted(rules, key=order_key)), tuple(str(path) for path in files), library)


def check_template(rule: Rule, library: TemplateLibrary) -> None:
    """The rule's template is in `library` and takes its args (RuleError at the rewrite.template line if not)."""
    where = f"{rule.location.file}:{rule.rewrite.line}: rule {rule.name}: field rewrite"
    try:
        template = library.get(rule.rewrite.template)
    except RuleError as error:
        raise RuleError(f"{where}.template: {error}") from None
    problem = template.argument_problem(rule.rewrite.args)
    if problem is not None:
        raise RuleError(f"{where}.args: template {template.name!r} cannot take {rule.rewrite.args!r}: {problem}")


def _check_unique(rules: list[Rule]) -> None:
    seen: dict[str, Rule] = {}
    for rule in rules:
        first = seen.setdefault(rule.name, rule)
        if first is not rule:
            raise RuleError(f"{rule.location}: rule {rule.name}: field name: duplicate rule name, "
                            f"first defined at {first.location}")


FAMILY_RULES_FILE = "rules.yaml"


def shipped_rules_dir() -> Path:
    """The folder of the `hfrewrite.rules` package."""
    return Path(os.fspath(importlib.resources.files(RULES_PACKAGE)))


def shipped_rule_paths(model_type: str | None = None) -> list[Path]:
    """The shipped generic rule files (one `rules.yaml` per family folder, sorted by family), plus the arch/
    files that declare `model_type`."""
    root = shipped_rules_dir()
    paths = sorted(root.glob(f"*/{FAMILY_RULES_FILE}"))
    if model_type is not None:
        for path in sorted(p for p in (root / ARCH_FOLDER).rglob("*") if p.suffix in RULE_SUFFIXES):
            if any(rule.models is not None and model_type in rule.models for rule in read_rule_file(path)):
                paths.append(path)
    return paths
