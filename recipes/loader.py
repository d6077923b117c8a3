"""Read a recipe YAML, apply `key.sub=value` overrides, validate into a `Recipe`; every failure is one
InputError line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from multitune.recipes.accelerate_config import resolve_accelerate_config
from multitune.recipes.errors import InputError
from multitune.recipes.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the raw mapping; the value is parsed as YAML (so numbers, booleans and lists work)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise InputError(f"override {item!r} is not of the form key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InputError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = parsed


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """The typed recipe, with the accelerate config it launches with read and checked against it."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        message = describe_error(errors[0], Recipe)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(f"{source}: {message}{more}") from None
    if recipe.distributed.strategy != "single" or recipe.distributed.accelerate_config:
        try:
            resolve_accelerate_config(recipe)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
    return recipe


def describe_error(error: dict[str, Any], root: type[BaseModel]) -> str:
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc)
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(root, loc)
        return f"unknown key '{field}'{hint}"
    if error["type"] == "missing":
        return f"missing required key '{field}'"
    message = error["msg"].removeprefix("Value error, ")
    if not field:
        return message
    shown = error.get("input")
    got = f" (got {shown!r})" if shown is not None and not isinstance(shown, dict) else ""
    return f"{field}: {message}{got}"


def _did_you_mean(root: type[BaseModel], loc: list[str]) -> str:
    """Suggest the closest valid key at the same level as the unknown one."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _section_type(field.annotation) if field else None
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    prefix = ".".join(loc[:-1] + [close[0]]) if close else ""
    return f" (did you mean '{prefix}'?)" if close else f" (valid keys here: {', '.join(model.model_fields)})"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
