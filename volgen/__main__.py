"""``python -m volgen`` (and ``accelerate launch -m volgen``) runs the command line."""

from volgen.cli.app import main

main()
