"""`python -m worker.cli ...` is `item ...`."""

from worker.cli.main import main

main()
