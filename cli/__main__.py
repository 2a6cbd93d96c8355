"""``python -m maskstore.cli`` runs the command line."""

from maskstore.cli.main import main

main()
