"""The house's rooms and their one-way doors (docs/design.md), checked on the
real import graph by import-linter (the contract is in pyproject.toml), and
what an app-side Python user pays for: the runtime alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_module

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path | None = None) -> subprocess.CompletedProcess:
    need_module("importlinter", "import-linter (scripts/setup.sh installs the test extra)")
    env = {"PATH": "/usr/bin:/bin"}
    if package_parent is not None:  # a copy of the package, found first on sys.path
        env["PYTHONPATH"] = str(package_parent)
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent or ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def _copy_package(dest: Path) -> Path:
    """The package's Python files (no .venv, .emulators, data) under dest/qwen35_mobile."""
    pkg = dest / "qwen35_mobile"
    for src in ROOT.rglob("*.py"):
        rel = src.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".emulators", "tests", "scripts", "demo", "out") or rel.parts[
            0
        ].startswith("."):
            continue
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, pkg / rel)
    return pkg


def test_imports_follow_the_layers():
    out = _lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    "module,reverse_import",
    [
        ("bindings/model.py", "from ..compile import config as _reversed"),  # runtime -> compiler
        ("compile/pipeline.py", "from ..parity import report as _reversed"),  # compiler -> rig
        ("parity/report.py", "from .. import cli as _reversed"),  # rig -> CLI
    ],
)
def test_a_reversed_import_breaks_the_contract(tmp_path, module, reverse_import):
    """Negative control: the same check on a copy with one import the wrong way fails, naming it."""
    pkg = _copy_package(tmp_path)
    path = pkg / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + reverse_import + "\n" + rest)
    out = _lint(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and "0 kept, 1 broken" in out.stdout, out.stdout
    importer = "qwen35_mobile." + module[:-3].replace("/", ".")
    assert importer in out.stdout, out.stdout


def test_the_runtime_alone_runs_an_artifact(artifact):
    """After `import qwen35_mobile.bindings` and a generation, nothing of the
    compiler, the rig, the presets or the CLI is loaded, and the runtime works
    where PyTorch and transformers are absent (an app's environment): the probe
    makes importing them fail.  (tvm_ffi 0.1.15 imports torch on its own when it
    is installed, docs/surprises.md; that is TVM's, not ours.)"""
    art = artifact("tiny", "q0f32")
    probe = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is not installed in an app')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from qwen35_mobile.bindings.model import Model\n"
        f"m = Model.load({str(art)!r})\n"
        "assert len(m.generate('Hello', max_new_tokens=4, temperature=0)) > 0\n"
        "assert m.logits(m.encode('a b c')).shape[0] == 3\n"
        "rooms = [['qwen35_mobile', r] for r in ('compile', 'parity', 'targets', 'cli')]\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[:2] in rooms or n.split('.')[0] in ('torch', 'transformers'))\n"
        "print('loaded:', bad[:20])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "loaded: []" in out.stdout
