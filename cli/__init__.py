"""volgen's command line (installed as the package ``volgen.cli``)."""
