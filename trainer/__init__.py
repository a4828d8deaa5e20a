"""WBC pre-annotation: trainer (models, data, evaluation)."""
