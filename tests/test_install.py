"""klrl installs like a real package: a wheel carries conf/ and sweeps/ (as klrl._conf and klrl._sweeps) and the
hydra_plugins, and the installed `klrl` works from any directory, with no checkout in sight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import FAST

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from (a copy of these: building in the checkout would leave build/ and *.egg-info there).
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "klrl", "hydra_plugins", "conf", "sweeps")


def tree_packages() -> set[str]:
    """The packages pyproject.toml must list: every folder of klrl/ and hydra_plugins/, and of each folder that
    package-dir maps onto a package (conf/ -> klrl._conf, ...)."""
    tomllib = pytest.importorskip("tomllib")
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    roots = {"klrl": ROOT / "klrl", "hydra_plugins": ROOT / "hydra_plugins"}
    roots |= {pkg: ROOT / folder for pkg, folder in mapped.items()}
    out = set()
    for pkg, top in roots.items():
        for f in top.rglob("*"):  # a folder counts if it holds a file (a stale __pycache__ alone does not count)
            rel = f.relative_to(top).parts
            if f.is_file() and not any(part == "__pycache__" or part.startswith(".") for part in rel):
                out |= {".".join((pkg, *rel[:i])) for i in range(len(rel))}
    return out


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    expected = tree_packages()
    assert listed == expected, (f"[tool.setuptools] packages in pyproject.toml is out of date (a folder left out "
                                f"is missing from the wheel): add {sorted(expected - listed)}, "
                                f"remove {sorted(listed - expected)}")


def test_checkout_finds_its_own_conf():
    """Run from a checkout (editable install, or nothing installed), klrl reads that checkout's conf/ and sweeps/."""
    import klrl.paths

    if ROOT not in Path(klrl.paths.__file__).resolve().parents:
        pytest.skip("klrl is not imported from this checkout")
    assert Path(klrl.paths.CONF_DIR) == ROOT / "conf" and klrl.paths.SWEEPS_DIR == ROOT / "sweeps"


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("klrl-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new virtualenv holding klrl only from `wheel`. Its dependencies come from this interpreter's site-packages,
    offline: a folder of links to everything there except klrl's own files (the editable install's finder and
    metadata), put on the new venv's path by a .pth file."""
    deps = tmp / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_path("purelib"))
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("klrl", "__editable__")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (deps / entry.name).symlink_to(entry)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    (venv_site / "_klrl_test_deps.pth").write_text(f"{deps}\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_from_any_directory(tmp_path, klrl_cache):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {f"klrl/_{p.relative_to(ROOT).as_posix()}" for d in ("conf", "sweeps") for p in (ROOT / d).rglob("*.yaml")}
    code = {p.relative_to(ROOT).as_posix() for d in ("klrl", "hydra_plugins") for p in (ROOT / d).rglob("*.py")}
    assert not (data | code) - names, f"missing from the wheel: {sorted((data | code) - names)}"

    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # an unrelated directory: no checkout, no conf/ beside it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"KLRL_CACHE": str(klrl_cache), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc

    where = json.loads(run(str(venv / "bin" / "python"), "-c", (
        "import json, klrl, klrl.paths, hydra_plugins.klrl_sweeps as p; print(json.dumps({'klrl': list(klrl.__path__), "
        "'conf': klrl.paths.CONF_DIR, 'sweeps': str(klrl.paths.SWEEPS_DIR), 'plugins': p.__file__}))")).stdout)
    venv_dir = venv.resolve()
    for what, path in [*(("klrl", p) for p in where["klrl"]), ("conf", where["conf"]), ("sweeps", where["sweeps"]),
                       ("plugins", where["plugins"])]:
        assert venv_dir in Path(path).resolve().parents, f"{what} resolves to {path}, not the fresh venv's copy"
        assert ROOT not in Path(path).resolve().parents, f"{what} resolves to the checkout: {path}"

    klrl_bin = str(venv / "bin" / "klrl")
    assert "model:" in run(klrl_bin, "train", "--cfg", "job").stdout
    listed = run(klrl_bin, "sweep", "tiny", "--list").stdout  # sweeps/ found; klrl's Hydra sweeper registered
    assert listed.startswith("tiny: 10 runs")

    # A relative run dir resolves against the working directory.
    run(klrl_bin, "train", *FAST, "steps=2", "eval.at_start=false", "hydra.run.dir=outputs/runs/installed")
    summary = json.loads((elsewhere / "outputs" / "runs" / "installed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2
