"""`backplane/core` never names hardware: no platform imports, no torch.cuda, no vendor stacks.

The core reaches hardware only through `backplane.platforms.resolve_platform`
and the `backplane.plugins_sdk` parts; this test reads every core module's AST
and fails, naming file and line, on anything else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "backplane" / "core"

# Discovery is the core's one door to platforms; platform packages are off limits.
ALLOWED_PLATFORM_MODULES = {
    "backplane.platforms", "backplane.platforms.discovery", "backplane.platforms.selection",
}
VENDOR_MODULES = ("triton", "torch_xla", "torch_npu", "habana_frameworks",
                  "intel_extension_for_pytorch", "pynvml", "amdsmi")
DEVICE_SUBMODULES = ("cuda", "xpu", "mps", "npu", "hpu")
VENDOR_WORDS = ("cuda", "nccl", "rocm", "hip", "xla", "tpu", "triton")
# Platform packages: the in-tree ones and whatever else lives under backplane/platforms/.
PLATFORM_PACKAGES = {"cpu", "cuda", "rocm", "tpu"} | {
    d.name for d in (REPO / "backplane" / "platforms").iterdir() if (d / "__init__.py").exists()}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _bad_module(name: str) -> str | None:
    if name.startswith("backplane.platforms.") and name not in ALLOWED_PLATFORM_MODULES:
        return f"imports platform module {name}"
    root = name.split(".")[0]
    if root in VENDOR_MODULES:
        return f"imports vendor module {name}"
    if root == "torch" and len(name.split(".")) > 1 and name.split(".")[1] in DEVICE_SUBMODULES:
        return f"imports device module {name}"
    return None


def violations(source: str, module: str = "backplane.core.x", is_package: bool = False
               ) -> list[tuple[int, str]]:
    """(line, problem) for every hardware reference in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, p) for a in node.names if (p := _bad_module(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            names = [base]
            if base == "backplane.platforms":  # `from backplane.platforms import cpu`
                names += [f"{base}.{a.name}" for a in node.names if a.name in PLATFORM_PACKAGES]
            else:
                names += [f"{base}.{a.name}" for a in node.names]
            found += [(node.lineno, p) for n in names if (p := _bad_module(n))]
        elif isinstance(node, ast.Attribute) and node.attr in DEVICE_SUBMODULES:
            found.append((node.lineno, f"uses .{node.attr} (device-specific torch API)"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.lower() in VENDOR_WORDS:
                found.append((node.lineno, f"names a vendor/device string {node.value!r}"))
    return sorted(set(found))


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_has_modules():
    assert len(_core_files()) > 10


def test_core_names_no_hardware():
    problems = []
    for path in _core_files():
        module = _module_name(path)
        for line, problem in violations(path.read_text(), module, path.name == "__init__.py"):
            problems.append(f"{path.relative_to(REPO)}:{line}: {problem}")
    assert not problems, "hardware references in backplane/core:\n" + "\n".join(problems)


@pytest.mark.parametrize(("source", "problem"), [
    ("import torch\ntorch.cuda.synchronize()\n", "uses .cuda"),
    ("x = t.cuda()\n", "uses .cuda"),
    ("from torch import cuda\n", "imports device module torch.cuda"),
    ("import torch.cuda\n", "imports device module torch.cuda"),
    ("from torch.cuda import graphs\n", "imports device module torch.cuda"),
    ("import triton\n", "imports vendor module triton"),
    ("import triton.language as tl\n", "imports vendor module triton.language"),
    ("import torch_xla.core.xla_model as xm\n", "imports vendor module torch_xla"),
    ("from backplane.platforms.cuda import descriptor\n", "imports platform module"),
    ("from backplane.platforms import cpu\n", "imports platform module backplane.platforms.cpu"),
    ("import backplane.platforms.cpu.attention\n", "imports platform module"),
    ("from ...platforms.rocm import platform\n", "imports platform module backplane.platforms"),
    ("if device == 'cuda':\n    pass\n", "names a vendor/device string 'cuda'"),
])
def test_detector_catches(source, problem):
    found = violations(source, "backplane.core.engine.x")
    assert any(problem in p for _, p in found), found


@pytest.mark.parametrize("source", [
    "from backplane.platforms import resolve_platform\n",
    "from backplane.plugins_sdk import Platform\n",
    "import torch\nx = torch.zeros(2, device=platform.runtime.device())\n",
    "from . import scheduler\n",
    "text = 'the cuda platform is chosen by discovery'\n",  # prose, not a device name
])
def test_detector_allows(source):
    assert violations(source, "backplane.core.engine.x") == []
