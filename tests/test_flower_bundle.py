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
    # restorer weights cannot travel in a FAB; under `flwr run` they are read from the
    # installed project (the test below).
    missing = sorted(f for f in tracked if f not in shipped and not f.endswith(".pt"))
    assert not missing, f"not in the Flower app bundle: {missing}"
    assert "configs/demo.yaml" in shipped  # the default `config` of [tool.flwr.app.config]


def test_code_running_from_the_bundle_finds_the_shipped_restorer(tmp_path):
    """The bundle has no .pt files, yet the demo's DFLeak restores with the shipped
    artefact-net: code imported from the unpacked bundle reads the installed project's copy
    (checked against its sha256) instead of failing."""
    import sys

    from flwr.cli.build import build_fab_from_disk

    zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).extractall(tmp_path)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import attacks.restorers.artefact as a; "
             "assert a.__file__.startswith(sys.argv[1]), a.__file__; assert not a.SHIPPED.exists(); "
             "net, _ = a.load_network(); print(a.shipped_weights())")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve() == (ROOT / "attacks/restorers/weights/artefact-net.pt").resolve()
