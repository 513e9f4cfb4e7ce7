"""Every bad input: one line naming the field, file or flag, exit 2, before Ray starts, and
nothing written to storage. One table, run against the real CLI (`tlctl submit --local`,
`validate`, `runs`, `report`): input → exit code → words the message must contain.

Ray is never reached: `ray.init` raises in these tests, so a row whose input slipped past
validation fails loudly instead of training. Storage is a local directory (it must not
exist afterwards) or, for the S3 rows, the session's real SeaweedFS bucket (no new object).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz9secret"
KEY = "AKIAEXAMPLEKEY00042"
MARKER = "tlctl-pickle-payload-ran"


# --- inputs --------------------------------------------------------------------------------


def images(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 16) -> Path:
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (size, size), (40 * i, 20 * j, 90)).save(root / cls / f"{j}.png")
    return root


def png_bytes(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def parquet(path: Path, table: pa.Table) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def good_table(n: int = 8) -> dict[str, Any]:
    return {"image": [png_bytes()] * n, "label": ["cat", "dog"] * (n // 2)}


class _Payload:
    """What an attacker's pickled cell does when it is unpickled: leave a marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def pickled_label_table(tmp: Path) -> pa.Table:
    """A label column of Ray's pickled-object extension type (what `to_pylist` unpickles),
    registered as the cluster job registers it by importing ray.data."""
    import ray.data  # noqa: F401
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    cells = [pickle.dumps(_Payload(str(tmp / MARKER))) for _ in range(8)]
    labels = ArrowPythonObjectType().wrap_array(pa.array(cells, pa.large_binary()))
    return pa.table({"image": pa.array([png_bytes()] * 8), "label": labels})


# --- the table -----------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    words: tuple[str, ...]  # all must be in the error line
    spec: dict[str, Any] = field(default_factory=dict)  # deep-merged into the base spec
    text: str | bytes | None = None  # the spec file's content instead
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], dict[str, Any]] | None = None  # makes files; returns overrides
    command: tuple[str, ...] = ("submit", "{spec}", "--local")
    secret: str | None = None  # must appear in no output and no stored object
    s3: bool = False  # storage is the real S3 bucket


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def data_dir(make: Callable[[Path], Any]) -> Callable[[Path], dict[str, Any]]:
    """A setup that builds a data tree under tmp/d and points data.train at it."""

    def setup(tmp: Path) -> dict[str, Any]:
        root = tmp / "d"
        make(root)
        return {"data": {"train": str(root)}}

    return setup


def parquet_data(make: Callable[[Path], pa.Table], **data: Any):
    def setup(tmp: Path) -> dict[str, Any]:
        return {"data": {"train": parquet(tmp / "d" / "train.parquet", make(tmp)), **data}}

    return setup


def weights_file(make: Callable[[Path], str]):
    def setup(tmp: Path) -> dict[str, Any]:
        return {"backbone": {"weights": make(tmp)}}

    return setup


def _symlink_loop(root: Path) -> None:
    """A class directory that is a link back to the data root (a walk would never end)."""
    images(root)
    (root / "loop").symlink_to(root, target_is_directory=True)


def _dev_zero(root: Path) -> None:
    images(root)
    (root / "cat" / "zero.png").symlink_to("/dev/zero")


def _fifo(root: Path) -> None:
    images(root)
    os.mkfifo(root / "dog" / "pipe.png")


def _sparse(tmp: Path, size: int) -> str:
    path = tmp / "big.pt"
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


def _weights_dir(tmp: Path) -> str:
    (tmp / "wdir").mkdir()
    return str(tmp / "wdir")


def _weights_dev_zero(tmp: Path) -> str:
    (tmp / "w.pt").symlink_to("/dev/zero")
    return str(tmp / "w.pt")


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

CASES = [
    # --- URIs and endpoints: one rule for every field --------------------------------------
    Case("storage-one-slash", ("storage.uri",), spec={"storage": {"uri": "s3:/bucket/x"}}),
    Case("storage-no-slash", ("storage.uri",), spec={"storage": {"uri": "s3:bucket/x"}}),
    Case("storage-empty", ("storage.uri",), spec={"storage": {"uri": ""}}),
    Case("storage-no-bucket", ("storage.uri",), spec={"storage": {"uri": "s3:///x"}}),
    Case("storage-gs", ("storage.uri", "s3://"), spec={"storage": {"uri": "gs://b/x"}}),
    Case("storage-ftp", ("storage.uri",), spec={"storage": {"uri": "ftp://h/x"}}),
    Case("train-empty", ("data.train",), spec={"data": {"train": ""}}),
    Case("train-gs", ("data.train",), spec={"data": {"train": "gs://b/train"}}),
    Case("train-one-slash", ("data.train",), spec={"data": {"train": "s3:/b/train"}}),
    Case("val-no-slash", ("data.val",), spec={"data": {"val": "s3:b/val"}}),
    Case("endpoint-path", ("storage.endpoint",), spec={"storage": {"endpoint": "http://h:9000/x"}}),
    Case("endpoint-port-text", ("storage.endpoint",), spec={"storage": {"endpoint": "http://h:p"}}),
    Case(
        "endpoint-port-range",
        ("storage.endpoint",),
        spec={"storage": {"endpoint": "http://h:70000"}},
    ),
    Case("endpoint-no-scheme", ("storage.endpoint",), spec={"storage": {"endpoint": "h:9000"}}),
    Case("endpoint-ftp", ("storage.endpoint",), spec={"storage": {"endpoint": "ftp://h:21"}}),
    Case("data-endpoint-path", ("data.endpoint",), spec={"data": {"endpoint": "http://h:1/p"}}),
    Case(
        "env-endpoint-no-scheme",
        ("AWS_ENDPOINT_URL",),
        env={"AWS_ENDPOINT_URL": "localhost:9000"},
        spec={"storage": {"uri": "s3://bkt/runs"}},
    ),
    Case(
        "runs-endpoint-flag",
        ("--endpoint",),
        command=("runs", "list", "--storage", "s3://bkt/runs", "--endpoint", "localhost:9000"),
    ),
    Case("runs-storage-flag", ("--storage",), command=("runs", "list", "--storage", "s3:/b")),
    Case(
        "report-storage-flag",
        ("--storage",),
        command=("report", "x", "--storage", "gs://b/runs", "--out", "{tmp}/o"),
    ),
    Case(
        "local-storage-remote-cluster",
        ("storage.uri", "cluster"),
        command=("submit", "{spec}", "--address", "http://10.255.0.1:8265"),
    ),
    Case(
        "file-storage-remote-cluster",
        ("storage.uri", "cluster"),
        spec={"storage": {"uri": "file:///tmp/runs"}},
        command=("submit", "{spec}", "--address", "http://10.255.0.1:8265"),
    ),
    # --- secrets: refused, and never echoed ---------------------------------------------
    Case(
        "env-endpoint-userinfo",
        ("AWS_ENDPOINT_URL",),
        env={"AWS_ENDPOINT_URL": f"http://{KEY}:{SECRET}@127.0.0.1:9000"},
        spec={"storage": {"uri": "s3://bkt/runs"}},
        secret=SECRET,
    ),
    Case(
        "storage-uri-userinfo",
        ("storage.uri",),
        spec={"storage": {"uri": f"s3://{KEY}:{SECRET}@bucket/x"}},
        secret=SECRET,
    ),
    Case(
        "endpoint-userinfo-no-scheme",
        ("storage.endpoint",),
        spec={"storage": {"endpoint": f"{KEY}:{SECRET}@127.0.0.1:9000"}},
        secret=SECRET,
    ),
    Case(
        "endpoint-userinfo",
        ("storage.endpoint",),
        spec={"storage": {"endpoint": f"http://{KEY}:{SECRET}@127.0.0.1:9000"}},
        secret=SECRET,
    ),
    Case(
        "data-endpoint-userinfo",
        ("data.endpoint",),
        spec={"data": {"endpoint": f"http://{KEY}:{SECRET}@127.0.0.1:9000"}},
        secret=SECRET,
    ),
    Case(
        "address-userinfo",
        ("--address",),
        command=("submit", "{spec}", "--address", f"http://user:{SECRET}@10.1.2.3:8265"),
        spec={"storage": {"uri": "s3://bkt/runs"}, "data": {"train": "s3://bkt/train"}},
        secret=SECRET,
    ),
    Case(
        "weights-uri-userinfo",
        ("backbone.weights",),
        spec={"backbone": {"weights": f"s3://{KEY}:{SECRET}@b/model"}},
        secret=SECRET,
    ),
    # --- the spec file ---------------------------------------------------------------------
    Case("not-utf8", ("spec.yaml", "UTF-8"), text=b"name: caf\xe9\n"),
    Case("duplicate-key", ("duplicate", "train"), text="{base}\ntrain: {{epochs: 2}}\n"),
    Case("alias-bomb", ("alias",), text=BOMB),
    Case("yaml-syntax", ("spec.yaml",), text="name: [unclosed\n"),
    Case("not-a-mapping", ("spec:", "mapping"), text="- a\n- b\n"),
    Case("python-tag", ("spec.yaml",), text="name: !!python/object/apply:os.system [id]\n"),
    Case("missing-file", ("nope.yaml",), command=("submit", "{tmp}/nope.yaml", "--local")),
    Case("spec-is-dir", ("spec",), command=("submit", "{tmp}", "--local")),
    Case("set-not-yaml", ("--set",), args=("--set", "train.epochs=[1")),
    Case("set-tag", ("--set",), args=("--set", "train.epochs=!!python/name:os.system")),
    Case("set-no-equals", ("--set",), args=("--set", "train.epochs")),
    Case("set-unknown-field", ("train.epoch",), args=("--set", "train.epoch=3")),
    Case("name-newline", ("name",), spec={"name": "demo\n"}),
    Case("name-upper", ("name",), spec={"name": "Demo"}),
    Case("name-slash", ("name",), spec={"name": "a/b"}),
    Case("name-markup", ("name",), spec={"name": "a[/]b"}),
    Case("lr-inf", ("train.lr",), spec={"train": {"lr": float("inf")}}),
    Case("lr-nan", ("train.lr",), spec={"train": {"lr": float("nan")}}),
    Case("dropout-nan", ("head.dropout",), spec={"head": {"dropout": float("nan")}}),
    Case("val-fraction-inf", ("data.val_fraction",), spec={"data": {"val_fraction": float("inf")}}),
    Case("epochs-zero", ("train.epochs",), spec={"train": {"epochs": 0}}),
    Case("epochs-text", ("train.epochs",), spec={"train": {"epochs": "ten"}}),
    Case("unknown-section", ("trian",), spec={"trian": {"epochs": 1}}),
    Case("unknown-backbone", ("backbone.name", "resnet18"), spec={"backbone": {"name": "resnet9"}}),
    Case("freeze-too-deep", ("backbone.freeze_depth",), spec={"backbone": {"freeze_depth": 99}}),
    Case("image-size-small", ("data.image_size",), spec={"data": {"image_size": 8}}),
    Case("missing-train", ("data.train",), spec={"data": {"train": None}}),
    Case(
        "workers-beyond-machine",
        ("scaling", "CPU"),
        spec={"scaling": {"num_workers": 64, "cpus_per_worker": 4}},
    ),
    Case(
        "grid-overflow",
        ("search",),
        spec={"search": {"batch_size": {"range": [1, 10**12]}, "search_alg": "grid"}},
    ),
    Case(
        "grid-too-big",
        ("search", "1280 trials", "--yes"),
        spec={
            "search": {
                "lr": [0.1 * i for i in range(1, 41)],
                "freeze_depth": [0, 1, 2, 3],
                "weight_decay": [0.0, 0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-6, 0.2],
                "search_alg": "grid",
            }
        },
    ),
    # --- data ------------------------------------------------------------------------------
    Case("train-missing-dir", ("data.train",), spec={"data": {"train": "{tmp}/nowhere"}}),
    Case("one-class", ("data.train", "2 class"), setup=data_dir(lambda r: images(r, ("cat",)))),
    Case(
        "zero-byte-image",
        ("empty.png",),
        setup=data_dir(lambda r: (images(r), (r / "cat" / "empty.png").write_bytes(b""))),
    ),
    Case("dev-zero-symlink", ("zero.png",), setup=data_dir(_dev_zero)),
    Case("fifo", ("pipe.png",), setup=data_dir(_fifo)),
    Case("symlink-loop", ("loop",), setup=data_dir(_symlink_loop)),
    Case(
        "parquet-pickled-label",
        ("data.label_column", "label"),
        setup=parquet_data(pickled_label_table),
    ),
    Case(
        "parquet-list-label",
        ("data.label_column", "list"),
        setup=parquet_data(lambda t: pa.table({**good_table(), "label": [[1]] * 8})),
    ),
    Case(
        "parquet-struct-label",
        ("data.label_column", "struct"),
        setup=parquet_data(lambda t: pa.table({**good_table(), "label": [{"a": 1}] * 8})),
    ),
    Case(
        "parquet-float-label",
        ("data.label_column", "double"),
        setup=parquet_data(lambda t: pa.table({**good_table(), "label": [float("nan")] * 8})),
    ),
    Case(
        "parquet-null-label",
        ("data.label_column", "null"),
        setup=parquet_data(lambda t: pa.table({**good_table(), "label": ["cat", None] * 4})),
    ),
    Case(
        "parquet-int-image",
        ("data.image_column", "int64"),
        setup=parquet_data(lambda t: pa.table({**good_table(), "image": list(range(8))})),
    ),
    Case(
        "parquet-null-image",
        ("data.image_column", "null"),
        setup=parquet_data(
            lambda t: pa.table({**good_table(), "image": pa.array([png_bytes(), None] * 4)})
        ),
    ),
    Case(
        "parquet-missing-column",
        ("data.label_column", "class"),
        setup=parquet_data(lambda t: pa.table(good_table()), label_column="class"),
    ),
    Case(
        "parquet-empty-val",
        ("data.val", "no rows"),
        setup=lambda tmp: {
            "data": {
                "train": parquet(tmp / "d" / "train.parquet", pa.table(good_table())),
                "val": parquet(tmp / "d" / "val.parquet", pa.table(good_table()).slice(0, 0)),
            }
        },
    ),
    Case(
        "parquet-no-train-rows",
        ("data.val_fraction",),
        setup=parquet_data(
            lambda t: pa.table({"image": [png_bytes()] * 3, "label": ["cat", "dog", "cat"]}),
            val_fraction=0.7,
        ),
    ),
    Case(
        "not-parquet",
        ("train.parquet",),
        setup=lambda tmp: {
            "data": {
                "train": str((tmp / "train.parquet", (tmp / "train.parquet").write_text("x"))[0])
            }
        },
    ),
    # --- weights ---------------------------------------------------------------------------
    Case("weights-dir", ("backbone.weights",), setup=weights_file(_weights_dir)),
    Case("weights-dev-zero", ("backbone.weights",), setup=weights_file(_weights_dev_zero)),
    Case(
        "weights-too-large",
        ("backbone.weights",),
        setup=weights_file(lambda tmp: _sparse(tmp, 3 * 2**30)),
    ),
    Case("weights-missing", ("backbone.weights",), spec={"backbone": {"weights": "{tmp}/no.pt"}}),
    # --- S3: nothing written at the storage root -------------------------------------------
    Case(
        "s3-missing-data",
        ("data.train",),
        spec={"data": {"train": "s3://{bucket}/no/train"}},
        s3=True,
    ),
    Case("s3-bad-lr", ("train.lr",), spec={"train": {"lr": -1.0}}, s3=True),
]


# --- the run -------------------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("bad input reached ray.init")

    monkeypatch.setattr(ray, "init", refuse)


def _fill(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    return value


def _objects(s3_server, bucket: str) -> list[str]:
    client = s3_server.client()
    found = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in found)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, no_ray, request, monkeypatch) -> None:
    tmp = tmp_path
    images(tmp / "data")
    subs = {"tmp": str(tmp)}
    storage = {"uri": str(tmp / "runs")}
    s3 = None
    if case.s3:
        s3 = request.getfixturevalue("s3_env")
        subs["bucket"] = request.getfixturevalue("s3_bucket")
        storage = {"uri": f"s3://{subs['bucket']}/runs", "endpoint": s3.endpoint}
        before = _objects(s3, subs["bucket"])
    base = {
        "name": "demo",
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
        "data": {"train": str(tmp / "data"), "image_size": 16},
        "train": {"epochs": 1, "batch_size": 4},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": storage,
    }
    spec = merge(base, _fill(case.spec, subs))
    if case.setup is not None:
        spec = merge(spec, case.setup(tmp))
    spec = {k: v for k, v in spec.items() if v is not None}
    spec["data"] = {k: v for k, v in spec["data"].items() if v is not None}
    path = tmp / "spec.yaml"
    if case.text is None:
        path.write_text(yaml.safe_dump(spec))
    elif isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text.replace("{base}", yaml.safe_dump(spec)))
    subs["spec"] = str(path)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    args = [_fill(a, subs) for a in (*case.command, *case.args)]
    result = runner.invoke(app, args, env=case.env)

    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    # One line, or a spec's heading and one line per problem (`field: what is wrong`).
    message = "\n".join(lines[errors[0] :])
    assert len(message) < 2000, f"{len(message)} characters of error"
    for word in case.words:
        assert word in message, (word, message)
    if case.secret:
        assert case.secret not in output
    # Nothing written: no run directory, no storage object, no payload run.
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())
    assert not (tmp / MARKER).exists()
    if s3 is not None:
        assert _objects(s3, subs["bucket"]) == before


def test_the_table_has_at_least_sixty_rows() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
