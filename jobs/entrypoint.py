"""`python -m jobs.entrypoint --spec spec.yaml`: the command a cluster job runs.

A stable name for Ray Jobs and KubeRay RayJob manifests; the driver itself is
`jobs.driver.cluster_job`.
"""

from jobs.driver.cluster_job import exit_after, main

if __name__ == "__main__":
    exit_after(main())
