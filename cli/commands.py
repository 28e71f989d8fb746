"""Imports every command module so that their ``@app.command`` decorators register on the Typer app."""

import importlib

for _name in ("info", "models", "example", "generate", "train", "batch", "evaluate"):
    importlib.import_module(f"volgen.cli.{_name}")
