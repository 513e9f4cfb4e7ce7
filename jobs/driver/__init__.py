"""Driving a job where it runs: process settings, pre-flight, scaling, the driver loop
(drive) over a plain run (job) or a search (jobs.search.tune), Ctrl-C (interrupts), and a
cluster job's entrypoint (cluster_job)."""
