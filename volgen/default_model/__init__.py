"""The embedded default model (a volgen model folder; see its volgen.json)."""
