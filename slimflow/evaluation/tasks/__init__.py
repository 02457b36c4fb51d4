"""Bundled lm-eval task definitions over local data files (loaded with `TaskManager(include_path=...)`)."""
