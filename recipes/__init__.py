"""Recipes: YAML files describing a run, and the typed schema and loader that validate them."""

from recipes.errors import InputError
from recipes.loader import dump_recipe, load_recipe
from recipes.schema import Recipe

__all__ = ["InputError", "Recipe", "dump_recipe", "load_recipe"]
