"""`backplane/core` never names hardware; platforms use only the plugin SDK.

The core reaches hardware only through `backplane.platforms.resolve_platform`
and the `backplane.plugins_sdk` parts; this test reads every core module's AST
and fails, naming file and line, on anything else. The SDK, the contract
between the two, names no hardware either.

The other direction: a platform package (in-tree under `backplane/platforms/`,
or the out-of-tree template in `examples/plugin_template`) imports from
Backplane only `backplane.plugins_sdk` and its own package, never the core nor
another platform, so that each can be packaged, installed and broken alone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "backplane" / "core"
SDK_DIR = REPO / "backplane" / "plugins_sdk"
PLATFORMS_DIR = REPO / "backplane" / "platforms"
TEMPLATE_PACKAGE = REPO / "examples" / "plugin_template" / "backplane_acme"
SDK = "backplane.plugins_sdk"

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


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute name) of every module, and every ``module.name`` imported from one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            found.append((node.lineno, base))
            # `from backplane.platforms import cpu` names a platform; `import resolve_platform`
            # from there names a function of the discovery module, not a module.
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names
                      if base != "backplane.platforms" or a.name in PLATFORM_PACKAGES]
    return found


def violations(source: str, module: str = "backplane.core.x", is_package: bool = False
               ) -> list[tuple[int, str]]:
    """(line, problem) for every hardware reference in ``source``."""
    tree = ast.parse(source)
    found = [(line, p) for line, name in imported_names(tree, module, is_package)
             if (p := _bad_module(name))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in DEVICE_SUBMODULES:
            found.append((node.lineno, f"uses .{node.attr} (device-specific torch API)"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.lower() in VENDOR_WORDS:
                found.append((node.lineno, f"names a vendor/device string {node.value!r}"))
    return sorted(set(found))


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _sdk_files() -> list[Path]:
    return sorted(SDK_DIR.rglob("*.py"))


def _problems(files: list[Path], check) -> list[str]:
    """``path:line: problem`` for every finding of ``check(source, module, is_package)``."""
    return [f"{path.relative_to(REPO)}:{line}: {problem}"
            for path in files
            for line, problem in check(path.read_text(), _module_name(path),
                                       path.name == "__init__.py")]


def test_core_has_modules():
    assert len(_core_files()) > 10


def test_core_names_no_hardware():
    problems = _problems(_core_files(), violations)
    assert not problems, "hardware references in backplane/core:\n" + "\n".join(problems)


def test_sdk_names_no_hardware():
    assert any(path.name == "torch_sdpa.py" for path in _sdk_files())
    problems = _problems(_sdk_files(), violations)
    assert not problems, "hardware references in backplane/plugins_sdk:\n" + "\n".join(problems)


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


# ---------------------------------------------------------------- platform isolation

# (importing platform, imported platform) -> why that one dependency is accepted.
ALLOWED_PLATFORM_DEPENDENCIES = {
    ("rocm", "cuda"): "PyTorch exposes ROCm/HIP as torch.cuda, so the rocm platform is the "
                      "cuda platform under another name (backplane/platforms/rocm/platform.py)",
}
# A module path in a string (importlib.import_module, "module:attribute" specs).
_MODULE_STRING = re.compile(r"^backplane\.platforms\.(\w+)(\.\w+)*(:\w+)?$")


def _platform_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["backplane", "platforms"] else None


def foreign_imports(source: str, module: str, is_package: bool = False
                    ) -> list[tuple[int, str]]:
    """(line, problem) for every Backplane import of ``source`` other than the SDK and the
    module's own platform package (plus the dependencies in ALLOWED_PLATFORM_DEPENDENCIES)."""
    own = _platform_of(module)
    allowed = {SDK} | ({f"backplane.platforms.{own}"} if own else set()) | {
        f"backplane.platforms.{dep}" for (user, dep) in ALLOWED_PLATFORM_DEPENDENCIES
        if user == own}
    tree = ast.parse(source)
    found, flagged = [], set()
    for line, name in imported_names(tree, module, is_package):
        if not name.startswith("backplane.") or any(
                name == a or name.startswith(a + ".") for a in allowed):
            continue
        if any(name.startswith(f"{prefix}.") for at, prefix in flagged
               if at == line and prefix != "backplane.platforms"):
            continue  # `from bad import x`: report `bad` once, not `bad.x` too
        flagged.add((line, name))
        other = _platform_of(name)
        what = f"platform {other!r}" if other else "a module outside the plugin SDK"
        found.append((line, f"imports {name} ({what})"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match and f"backplane.platforms.{match.group(1)}" not in allowed:
                found.append((node.lineno, f"names module {node.value!r} of another platform"))
    return sorted(set(found))


def _platform_packages() -> list[Path]:
    return sorted(d for d in PLATFORMS_DIR.iterdir() if (d / "__init__.py").exists())


def _template_module_name(path: Path) -> str:
    parts = path.relative_to(TEMPLATE_PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_in_tree_platform_is_scanned():
    assert {d.name for d in _platform_packages()} >= {"cpu", "cuda", "rocm", "tpu"}


@pytest.mark.parametrize("package", [d.name for d in _platform_packages()])
def test_platform_imports_only_the_sdk_and_itself(package):
    problems = _problems(sorted((PLATFORMS_DIR / package).rglob("*.py")), foreign_imports)
    assert not problems, (
        f"platform {package!r} must use only backplane.plugins_sdk and its own package "
        "(shared code belongs in the SDK):\n" + "\n".join(problems))


def test_allowed_platform_dependencies_are_still_needed():
    # An exception that no import uses any more is removed, not kept "just in case".
    for user, dep in ALLOWED_PLATFORM_DEPENDENCIES:
        names = {name for path in (PLATFORMS_DIR / user).rglob("*.py")
                 for _, name in imported_names(ast.parse(path.read_text()),
                                               _module_name(path), path.name == "__init__.py")}
        assert any(_platform_of(n) == dep for n in names), (
            f"{user} no longer imports {dep}: drop it from ALLOWED_PLATFORM_DEPENDENCIES")


def test_template_plugin_imports_only_the_sdk():
    files = sorted(TEMPLATE_PACKAGE.rglob("*.py"))
    assert files
    problems = [f"{path.relative_to(REPO)}:{line}: {problem}"
                for path in files
                for line, problem in foreign_imports(
                    path.read_text(), _template_module_name(path), path.name == "__init__.py")]
    assert not problems, "the template plugin must use only backplane.plugins_sdk:\n" + (
        "\n".join(problems))


@pytest.mark.parametrize(("source", "module", "problem"), [
    ("from backplane.platforms.cuda.sdpa_attention import X\n", "backplane.platforms.tpu.platform",
     "imports backplane.platforms.cuda.sdpa_attention (platform 'cuda')"),
    ("from ..cuda import platform\n", "backplane.platforms.tpu.platform",
     "imports backplane.platforms.cuda (platform 'cuda')"),
    ("import backplane.platforms.cpu.runtime\n", "backplane.platforms.tpu.runtime",
     "imports backplane.platforms.cpu.runtime (platform 'cpu')"),
    ("from backplane.platforms import cpu\n", "backplane.platforms.tpu.platform",
     "imports backplane.platforms.cpu (platform 'cpu')"),
    ("from backplane.platforms import resolve_platform\n", "backplane.platforms.tpu.platform",
     "imports backplane.platforms (a module outside the plugin SDK)"),
    ("from backplane.core.layers import x\n", "backplane.platforms.cpu.fused_layers",
     "imports backplane.core.layers (a module outside the plugin SDK)"),
    ("importlib.import_module('backplane.platforms.cpu.native')\n",
     "backplane.platforms.cuda.platform", "names module 'backplane.platforms.cpu.native'"),
    ("from backplane.platforms.tpu import runtime\n", "backplane.platforms.rocm.platform",
     "imports backplane.platforms.tpu (platform 'tpu')"),
    ("from backplane.platforms.cpu import runtime\n", "backplane_acme.platform",
     "imports backplane.platforms.cpu (platform 'cpu')"),
])
def test_isolation_detector_catches(source, module, problem):
    found = foreign_imports(source, module)
    assert any(problem in p for _, p in found), found


@pytest.mark.parametrize(("source", "module"), [
    ("from backplane.plugins_sdk import Platform, TorchSdpaPagedAttentionBackend\n",
     "backplane.platforms.tpu.platform"),
    ("from backplane.plugins_sdk.descriptor import PlatformDescriptor\n",
     "backplane.platforms.tpu"),
    ("from backplane import plugins_sdk\n", "backplane.platforms.tpu.platform"),
    ("from .runtime import TpuRuntime\n", "backplane.platforms.tpu.platform"),
    ("from backplane.platforms.cuda import triton_kernels\n",
     "backplane.platforms.cuda.triton_attention"),
    ("from backplane.platforms.cuda.platform import CudaPlatform\n",
     "backplane.platforms.rocm.platform"),  # the one allowed dependency
    ("'the tpu plugin reads backplane.platforms.cuda for reference'\n",
     "backplane.platforms.tpu.platform"),  # prose, not a module path
    ("from backplane_acme.attention import AcmeAttentionBackend\n", "backplane_acme.platform"),
])
def test_isolation_detector_allows(source, module):
    assert foreign_imports(source, module) == []
