"""pyrt's built-in plugins. Each registers through an entry point in pyproject.toml, the same
way a plugin from another distribution does; nothing in the core imports them directly."""
