"""A search: the block as Ray Tune objects (space), the Tune driver (tune), its callback
that writes the run's log (callbacks), and the trials table and winner (trials)."""
