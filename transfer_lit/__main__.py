"""``python -m transfer_lit`` runs the CLI."""

from transfer_lit.cli import main

if __name__ == "__main__":
    main()
