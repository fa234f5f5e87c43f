"""A separate Python environment for breaching, the public framework fl-sim measures itself against.

breaching is installed into its own virtual environment under the asset cache
(`$FL_SIM_HOME/envs/breaching-<hash of the source>`), never into the project's. The environment
reuses the project's own PyTorch through a site hook: a speed comparison is only fair when
both sides run the same torch build with the same BLAS and oneDNN, and it saves a second
multi-GB torch install. breaching's own requirements (hydra-core, omegaconf, ...) go into its
environment; what it finds already installed (torch, scipy, lpips) it takes from the project's.

The hook names no path: the project that runs breaching passes its own site-packages in
`FL_SIM_PROJECT_SITE` (see `run_env`). One cached environment then serves every checkout of the
project, and a deleted checkout cannot leave it pointing at nothing (it did: an environment
built by one clone found no torch from the next).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

DEFAULT_SOURCE = "breaching==0.1.2"
_STAMP = ".fl-sim-installed"
_HOOK_NAME = "zz_fl_sim_project.pth"
_SITE_VAR = "FL_SIM_PROJECT_SITE"
# An `import` line in a .pth file runs at start-up; addsitedir also processes the project's
# own .pth files (its editable install), so fl_sim imports there too.
_HOOK = f"import os, site; os.environ.get({_SITE_VAR!r}) and site.addsitedir(os.environ[{_SITE_VAR!r}])\n"


def env_dir(source: str) -> Path:
    from fl_sim.assets import home

    tag = hashlib.sha256(source.encode()).hexdigest()[:10]
    return home() / "envs" / f"breaching-{tag}"


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def run_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables a breaching-environment process needs to see this project's torch."""
    return {**(os.environ if base is None else base), _SITE_VAR: sysconfig.get_paths()["purelib"]}


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def ensure(source: str = DEFAULT_SOURCE, log=print) -> Path:
    """The breaching environment's python, created and installed on first use.

    source: a pip requirement (`breaching==0.1.2`) or the path of a local checkout.
    """
    if Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    env = env_dir(source)
    python = _python(env)
    if (env / _STAMP).is_file() and _hook_current(python):
        return python
    from filelock import FileLock

    # Two runs at once (two test suites, bench shards) would each wipe the other's half-built
    # environment: the second waits for the first and then finds it ready.
    env.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env.parent / f"{env.name}.lock")):
        if (env / _STAMP).is_file():
            _write_hook(python)  # an environment from an older fl-sim: its hook named one checkout
            return python
        return _create(env, python, source, log)


def _hook_current(python: Path) -> bool:
    hook = _site_packages(python) / _HOOK_NAME
    return hook.is_file() and hook.read_text() == _HOOK


def _write_hook(python: Path) -> None:
    (_site_packages(python) / _HOOK_NAME).write_text(_HOOK)


def _create(env: Path, python: Path, source: str, log) -> Path:
    log(f"creating breaching's own environment in {env} (once; it shares this project's torch)")
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    _write_hook(python)
    # pip must see the project's torch, or it would install a second one into the environment
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", source], check=True, env=run_env())
    check = subprocess.run([str(python), "-c", "import breaching, torch; print(torch.__version__)"],
                           capture_output=True, text=True, cwd=env, env=run_env())
    if check.returncode != 0:
        raise RuntimeError(f"breaching was installed into {env} but does not import:\n{check.stderr[-2000:]}")
    (env / _STAMP).write_text(source + "\n")
    return python
