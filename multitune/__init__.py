"""multitune: fine-tune open LLMs from validated YAML recipes. The subpackages live in the repository's top-level
folders (`recipes/ data_prep/ trainer/ launch/`, lower layers first) and are mapped here by pyproject.toml."""

__version__ = "0.1.0"
