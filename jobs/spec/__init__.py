"""The job spec: the pydantic model (model, search), loading and resolving it (load), and
the reference generated from it (reference)."""
