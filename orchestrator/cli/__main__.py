"""`python -m orchestrator.cli`: the same as the `tlctl` command."""

from orchestrator.cli import main

main()
