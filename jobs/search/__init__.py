"""A search: the block as Ray Tune objects (space), the Tune driver (tune), its callback
that writes the run's log (callbacks), the trials table and winner (trials), and the check
of Tune's saved state (state) that the search algorithms record (algorithms)."""
