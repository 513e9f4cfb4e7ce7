"""The docs that are generated stay generated, and the front door stays short and linked."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.spec.reference import render
from jobs.storage.layout import LAYOUT, layout_tree

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 8 * 1024


def test_the_spec_reference_is_generated_from_the_model() -> None:
    text = (ROOT / "docs" / "spec.md").read_text()
    assert text == render(), "docs/spec.md is stale: python -m jobs.spec.reference > docs/spec.md"


def test_the_reference_lists_every_field_and_the_storage_layout() -> None:
    from jobs.spec.model import JobSpec
    from jobs.spec.search import SearchSpec

    text = render()
    sections = {"search": SearchSpec}
    for section, field in JobSpec.model_fields.items():
        model = sections.get(section, field.annotation)
        for name in getattr(model, "model_fields", None) or [section]:
            key = f"{section}.{name}" if name != section else section
            assert f"`{key}`" in text, f"{key} missing from docs/spec.md"
    assert layout_tree() in text
    assert all(path in text for path, _ in LAYOUT)


def test_the_readme_is_the_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text
    for link in re.findall(r"\]\(([^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
