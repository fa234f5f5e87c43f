"""`flwr run .` ships the project to the ServerApp as a Flower app bundle (FAB), which
carries only some file types. Every file the four packages hold must be in it, or the
ServerApp breaks under `flwr run` while `fl-sim run` works (a template file once did)."""
from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_sim", "attacks", "clients", "server")


def test_flower_app_bundle_carries_every_package_file():
    from flwr.cli.build import build_fab_from_disk

    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > 20, "run from a git checkout of the project"
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    shipped = set(fab.namelist())
    # Flower bundles only text types (its FAB_INCLUDE_PATTERNS, not overridable): the shipped
    # restorer weights cannot travel in a FAB; under `flwr run` artefact-net says so and takes
    # restorer_params.model instead.
    missing = sorted(f for f in tracked if f not in shipped and not f.endswith(".pt"))
    assert not missing, f"not in the Flower app bundle: {missing}"
    assert "configs/demo.yaml" in shipped  # the default `config` of [tool.flwr.app.config]
