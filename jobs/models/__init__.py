"""Using a trained model: the registry of named models and aliases (registry), resolving
RUN | URI | MODEL@ALIAS to a run's verified model (ref)."""
