"""`python -m embedtune` (and `torchrun -m embedtune`) runs the CLI."""

from .cli import console_main

console_main()
