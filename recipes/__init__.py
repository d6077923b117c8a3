"""Recipes: YAML files describing a run, and the typed schema and loader that validate them."""

from multitune.recipes.errors import InputError
from multitune.recipes.loader import dump_recipe, load_recipe
from multitune.recipes.schema import Recipe

__all__ = ["InputError", "Recipe", "dump_recipe", "load_recipe"]
