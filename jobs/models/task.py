"""`evaluate` and `predict` as one request that runs the same here or as a cluster job.

The CLI builds a ModelTask and pre-flights it (`prepare`: the model verified, the data
listed and checked, the output new), so bad input is exit 2 before any compute. On local
Ray it then runs in-process; on a cluster the request travels as `task.json` in the job's
working dir, and `python -m jobs.models.task --request task.json` pre-flights it again
from the cluster's side (what the nodes see is what counts) and runs it, printing progress
lines and a final `tlctl-summary {json}` line (metrics.json, or predict's _meta.json) that
`--wait` reads back. Exit codes are the CLI's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.errors import TlctlError
from jobs.storage.location import is_remote_safe

COMMANDS = ("evaluate", "predict")
TASK_FILE = "task.json"
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class ModelTask:
    """What the user asked for, exactly as given (URIs unresolved: each side resolves them)."""

    command: str
    ref: str
    storage: str | None = None
    endpoint: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise TlctlError(f"task: {self.command!r} is not one of {', '.join(COMMANDS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelTask:
        raw = json.loads(text)
        return cls(raw["command"], raw["ref"], raw.get("storage"), raw.get("endpoint"), raw["args"])

    def paths(self) -> dict[str, str]:
        """The locations the task reads or writes, by the flag that names them."""
        flags = {"evaluate": ("data",), "predict": ("input", "output")}[self.command]
        found = {f"--{name}": str(self.args[name]) for name in flags}
        if self.storage:
            found["--storage"] = self.storage
        if "://" in self.ref or "/" in self.ref:
            found["RUN"] = self.ref
        return found

    def remote_path_errors(self) -> list[str]:
        """Locations a remote cluster cannot reach: paths on this machine (valid: s3://)."""
        return [
            f"{flag}: {value} is a path on this machine, which a remote cluster cannot read "
            "(valid: an s3:// URI)"
            for flag, value in self.paths().items()
            if not is_remote_safe(value)
        ]

    def prepare(self) -> PreparedTask:
        """Every check that needs no Ray: exit 2 on bad input, nothing written."""
        from jobs.models.ref import resolve_ref

        if self.command == "evaluate":
            from jobs.models.evaluate import check_name, default_name, plan_evaluation

            name = self.args.get("name") or default_name(self.args["data"])
            check_name(name)
            ref = resolve_ref(self.ref, self.storage, self.endpoint)
            classes = list(ref.model.info["classes"])
            plan: Any = plan_evaluation(
                self.args["data"],
                self.endpoint,
                classes,
                image_column=self.args.get("image_column", "image"),
                label_column=self.args.get("label_column", "label"),
            )
            return PreparedTask(self, ref, plan, name)
        from jobs.models.predict import plan_prediction

        ref = resolve_ref(self.ref, self.storage, self.endpoint)
        classes = list(ref.model.info["classes"])
        top_k = self.args.get("top_k")
        plan = plan_prediction(
            self.args["input"],
            self.args["output"],
            self.endpoint,
            classes=classes,
            top_k=min(5, len(classes)) if top_k is None else int(top_k),
            fmt=self.args.get("fmt", "parquet"),
            overwrite=bool(self.args.get("overwrite")),
            all_probs=bool(self.args.get("all_probs")),
            image_column=self.args.get("image_column", "image"),
            id_column=self.args.get("id_column"),
        )
        return PreparedTask(self, ref, plan, None)


@dataclass(frozen=True)
class PreparedTask:
    """A pre-flighted task: the verified model and the plan; `run` needs Ray."""

    task: ModelTask
    ref: Any  # jobs.models.ref.ModelRef
    plan: Any  # EvalPlan or PredictPlan
    name: str | None  # the evaluation's name

    @property
    def output_uri(self) -> str:
        """Where the results go: `<run>/eval/<name>/`, or predict's --output."""
        if self.task.command == "evaluate":
            return self.ref.layout.evaluation(self.name).uri
        return self.plan.output.uri

    @property
    def images(self) -> int:
        parquet = getattr(self.plan, "parquet", None)
        return parquet.rows if parquet is not None else len(self.plan.files)

    def run(self, on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Evaluate (metrics.json's content) or predict (_meta.json's content)."""
        if self.task.command == "evaluate":
            from jobs.models.evaluate import evaluate

            return evaluate(self.ref, self.plan, self.name, data_uri=self.task.args["data"])
        from jobs.models.predict import predict

        return predict(self.ref, self.plan, on_rows=on_rows)


def _progress_printer(command: str, total: int) -> Callable[[int], None]:
    """One plain line at most every PROGRESS_EVERY_S (the job's logs, read by --wait)."""
    last = [0.0]

    def on_rows(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done >= total:
            last[0] = now
            print(f"tlctl: {command}: {done}/{total} images", flush=True)

    return on_rows


def run_request(path: str, verbose: bool) -> dict[str, Any]:
    """The cluster job: connect to this cluster, pre-flight from here, run."""
    from jobs.driver.cluster_job import connect_ray
    from jobs.storage.credentials import load_into_environment

    with open(path) as f:
        task = ModelTask.from_json(f.read())
    load_into_environment()  # --pass-credentials: read before Ray touches the working dir
    connect_ray(verbose)
    prepared = task.prepare()
    print(
        f"tlctl: {task.command} {prepared.ref.text} ({prepared.ref.layout.uri}) on "
        f"{prepared.images} images",
        flush=True,
    )
    return prepared.run(on_rows=_progress_printer(task.command, prepared.images))


def main(argv: list[str] | None = None) -> int:
    from jobs.driver.cluster_job import report

    parser = argparse.ArgumentParser(prog="python -m jobs.models.task", description=__doc__)
    parser.add_argument("--request", required=True, help=f"the task ({TASK_FILE})")
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs too")
    args = parser.parse_args(argv)
    return report(lambda: run_request(args.request, args.verbose))


if __name__ == "__main__":
    from jobs.driver.cluster_job import exit_after

    exit_after(main())
