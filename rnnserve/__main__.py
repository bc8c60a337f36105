"""`python -m rnnserve ...` is the `rnnserve` command (torchrun needs a module: `torchrun -m rnnserve`)."""

from rnnserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
