"""The experiment spec: its pydantic models, loader and override expressions."""
