"""``python -m amgsn ...`` (also what ``torchrun -m amgsn`` runs)."""

from amgsn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
