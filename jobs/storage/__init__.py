"""Storage: where a run's objects live (location), how failures are typed (errors) and
waited out (retry, retrying_fs), what proves an object complete (manifest), every object
name under a run (layout) and the run's metrics log (metrics)."""
