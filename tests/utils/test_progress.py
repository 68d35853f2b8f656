"""Progress bars (`modiff.utils.progress`): the text bar, also inside a Jupyter kernel, so executed
notebooks show no `TqdmWarning: IProgress not found` box."""
from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

from tqdm.std import tqdm

from modiff.utils.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]

# A Jupyter kernel without ipywidgets, as tqdm.autonotebook recognises one (the modules it looks at), then
# the modules of modiff that show progress bars, imported and used.
FAKE_KERNEL = """
import sys, types, warnings
warnings.simplefilter("always")
ipython = types.ModuleType("IPython")
ipython.get_ipython = lambda: types.SimpleNamespace()
sys.modules["IPython"] = ipython
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
sys.modules["ipywidgets"] = None  # not installed
{imports}
"""
MODIFF_IMPORTS = """
import modiff, modiff.pipelines.generate, modiff.pipelines.train, modiff.pipelines.train_ldm
import modiff.metrics.classifier, modiff.quant.ptq.data, modiff.quant.ptq.lsq
from modiff.utils.progress import progress_bar
for _ in progress_bar(range(3), "kernel"):
    pass
"""
BANNED = ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook")


def _stderr_in_fake_kernel(imports: str) -> str:
    done = subprocess.run([sys.executable, "-c", FAKE_KERNEL.format(imports=imports)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_no_ipprogress_warning_inside_a_kernel() -> None:
    """The fake kernel reproduces the warning with tqdm.auto; modiff's bars do not raise it."""
    assert "IProgress not found" in _stderr_in_fake_kernel("import tqdm.auto")
    stderr = _stderr_in_fake_kernel(MODIFF_IMPORTS)
    assert "TqdmWarning" not in stderr and "IProgress" not in stderr
    assert "kernel: 100%" in stderr  # the text bar was drawn


def test_the_bar_is_the_text_bar_and_can_be_off() -> None:
    shown, hidden = io.StringIO(), io.StringIO()
    bar = progress_bar(range(2), "x", unit="img", file=shown)
    assert type(bar) is tqdm and list(bar) == [0, 1]
    bar.close()
    assert "x: 100%" in shown.getvalue() and "2/2" in shown.getvalue() and "img/s" in shown.getvalue()
    assert list(progress_bar(range(2), "x", enabled=False, file=hidden)) == [0, 1] and hidden.getvalue() == ""


def test_no_module_imports_the_notebook_bar() -> None:
    """Only `modiff.utils.progress` picks the bar: no module imports tqdm.auto or the widget bar."""
    offenders = []
    for path in sorted([*(ROOT / "modiff").rglob("*.py"), *(ROOT / "analysis").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n in BANNED for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
