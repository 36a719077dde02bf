"""Every file under terraform/ reads as what it claims to be, and is formatted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terraform.hcl import EXAMPLE, INTERREGION, REGION, ROOT, TERRAFORM, fmt_problems, parse
from tests.terraform.hcl import tf_files as all_tf_files

TF_FILES = all_tf_files()
BOOTSTRAP = REGION / "files" / "relay-bootstrap.py"


def test_the_layout_the_issue_names() -> None:
    for directory in (TERRAFORM, REGION, INTERREGION, EXAMPLE):
        for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
            assert (directory / name).is_file(), directory / name
    assert (REGION / "README.md").is_file()
    assert (REGION / "templates" / "cloud-init.yaml.tftpl").is_file()
    assert (REGION / "templates" / "relay.toml.tftpl").is_file()
    assert (ROOT / "docs" / "DEPLOY.md").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=[str(p.relative_to(TERRAFORM)) for p in TF_FILES])
def test_every_tf_file_parses(path: Path) -> None:
    doc = parse(path)
    assert doc, f"{path} is empty"


@pytest.mark.parametrize("path", TF_FILES, ids=[str(p.relative_to(TERRAFORM)) for p in TF_FILES])
def test_every_tf_file_is_formatted(path: Path) -> None:
    problems = fmt_problems(path)
    assert not problems, "\n".join(problems)


def test_every_module_pins_terraform_and_the_aws_provider() -> None:
    for directory in (TERRAFORM, REGION, INTERREGION, EXAMPLE):
        (block,) = parse(directory / "versions.tf")["terraform"]
        assert block["required_version"].startswith(">= 1.")
        (providers,) = block["required_providers"]
        assert providers["aws"]["source"] == "hashicorp/aws"
        assert re.fullmatch(r">= 5\.\d+, < 7\.0", providers["aws"]["version"])


def test_checkov_skips_are_inline_with_a_reason() -> None:
    """A skipped check is written next to its resource with why; nothing is skipped
    wholesale (no .checkov config, no --skip-check)."""
    pattern = re.compile(r"#\s*checkov:skip=(\S*)")
    seen = 0
    for path in TERRAFORM.rglob("*"):
        if path.is_file() and path.suffix in (".tf", ".tftpl"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = pattern.search(line)
                if m:
                    seen += 1
                    assert re.fullmatch(r"CKV2?_AWS_\d+:.{20,}", line[m.start(1) :].strip()), (
                        f"{path}:{n}: a skip needs its check id and a reason"
                    )
    assert seen, "expected the documented skips"
    for name in (".checkov.yaml", ".checkov.yml", ".checkov.json"):
        assert not (ROOT / name).exists() and not (TERRAFORM / name).exists()


def test_the_bootstrap_script_runs_on_the_nodes_python() -> None:
    """Amazon Linux 2023's system Python is 3.9: the script must be 3.9 syntax, lint-clean."""
    for args in (
        ["check", "--target-version", "py39", "--select", "E,F,W,I,B,UP,SIM", str(BOOTSTRAP)],
        ["format", "--check", "--target-version", "py39", str(BOOTSTRAP)],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
    source = BOOTSTRAP.read_text(encoding="utf-8")
    assert source.startswith("#!/usr/bin/env python3\n")
    assert "from __future__ import annotations" in source  # X | None in annotations on 3.9
    assert not re.search(r"^\s*match\s", source, re.M)
