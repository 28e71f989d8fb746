"""Bundled YAML presets (label maps, model presets, training configs), installed as ``volgen.configs``."""
