"""Bundled YAML presets (label maps, model architectures, training configs), installed as ``volgen.configs``."""
