"""``python -m classlens`` runs the command line."""

from classlens.cli import main

main()
