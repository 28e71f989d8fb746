"""Imports every command module so their ``@app.command`` decorators register on :data:`volgen.cli.app.app`."""

import importlib

for _name in ("info", "generate", "train"):
    importlib.import_module(f"volgen.cli.{_name}")
