"""Client side of tlctl: the CLI, job spec, local runner and run registry."""
