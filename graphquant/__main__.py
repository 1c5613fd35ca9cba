"""``python -m graphquant ...`` runs the ``graphquant`` command (see graphquant.cli)."""

from graphquant.cli import run

if __name__ == "__main__":
    run()
