"""The out-of-tree template plugin (examples/plugin_template) installed next to Backplane.

CI installs it (``pip install -e examples/plugin_template``); without it these
tests are skipped with that instruction. Its probe reports it available only
when ``ACME_VISIBLE_DEVICES`` is set, so having it installed does not change
what the rest of the suite runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

import pytest

from tests.plugins.kit_runner import REPO, failures, run_pytest

TEMPLATE = REPO / "examples" / "plugin_template"

try:
    ACME_VERSION = distribution("backplane-acme").version
except PackageNotFoundError:
    ACME_VERSION = None

pytestmark = pytest.mark.skipif(
    ACME_VERSION is None,
    reason="backplane-acme is not installed: pip install -e examples/plugin_template")


@pytest.fixture
def acme_env(monkeypatch):
    from backplane.platforms import reset_platform_cache

    for var in ("BACKPLANE_PLATFORM", "ACME_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    reset_platform_cache()
    yield monkeypatch
    reset_platform_cache()


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("backplane")
    cmd = [exe] if exe else [sys.executable, "-m", "backplane.entrypoints.cli.main"]
    environ = {k: v for k, v in os.environ.items()
               if k not in ("ACME_VISIBLE_DEVICES", "BACKPLANE_PLATFORM")}
    return subprocess.run([*cmd, *args], env={**environ, **env}, capture_output=True,
                          text=True, timeout=300)


def test_backplane_platforms_json_lists_the_template():
    proc = _cli("platforms", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    acme = next(p for p in data["plugins"] if p["name"] == "acme")
    assert (acme["distribution"], acme["version"]) == ("backplane-acme", ACME_VERSION)
    assert acme["target"] == "backplane_acme:descriptor"
    assert (acme["status"], acme["priority"], acme["sdk_version"]) == ("unavailable", 50, "1.1")
    assert "ACME_VISIBLE_DEVICES is not set" in acme["reason"]
    assert acme["attention_backends"] is None  # not loaded while unavailable
    assert data["chosen"] != "acme"


def test_visible_acme_device_wins_automatically(acme_env, capsys):
    from backplane.entrypoints.cli.main import main

    acme_env.setenv("ACME_VISIBLE_DEVICES", "0")
    assert main(["platforms", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # acme (50) beats cpu (0); a real accelerator of higher priority would still win.
    higher = [p["name"] for p in data["plugins"] if p["available"] and p["priority"] > 50]
    if higher:
        assert data["chosen"] == higher[0]
    else:
        assert data["chosen"] == "acme"
        assert data["reason"] == "auto-detected: highest-priority available (priority 50)"
    acme = next(p for p in data["plugins"] if p["name"] == "acme")
    assert acme["attention_backends"] == ["acme_paged"]


def test_device_acme_selects_it_and_fails_loudly_without_a_device(acme_env, capsys):
    from backplane.entrypoints.cli.main import main

    assert main(["platforms", "--device", "acme"]) == 1
    out = capsys.readouterr().out
    assert ("No platform can be chosen: platform 'acme' was requested (device argument) but "
            "cannot be used: unavailable: no Acme device visible") in out
    acme_env.setenv("ACME_VISIBLE_DEVICES", "0")
    assert main(["platforms", "--device", "acme"]) == 0
    assert "Chosen: acme (requested by device argument" in capsys.readouterr().out


def test_generate_through_acme_matches_cpu(acme_env, llama_model_dir):
    from backplane import LLM, SamplingParams

    acme_env.setenv("ACME_VISIBLE_DEVICES", "0")
    prompts = ["The quick brown fox", "Once upon a time there lived", "Hello"]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    common = dict(max_model_len=128, num_kv_blocks=32, dtype="float32")
    acme = LLM(model=llama_model_dir, device="acme", **common)
    assert acme.llm_engine.platform.name == "acme"
    acme_tokens = [o.outputs[0].token_ids
                   for o in acme.generate(prompts, params, use_tqdm=False)]
    cpu = LLM(model=llama_model_dir, device="cpu", **common)
    assert cpu.llm_engine.platform.name == "cpu"
    cpu_tokens = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]
    assert acme_tokens == cpu_tokens
    assert all(len(t) == 10 for t in acme_tokens)


def test_template_test_suite_passes(tmp_path):
    # The plugin's own CI: its tests plus Backplane's conformance suite for acme.
    outcomes = run_pytest(tmp_path, [], cwd=TEMPLATE)
    assert not failures(outcomes)
    passed = [n for n, o in outcomes.items() if o == "passed"]
    assert "test_probe_needs_a_visible_device" in passed
    assert "test_attention_matches_reference_float32[acme_paged-mixed]" in passed
    assert "test_communicator_collective[all_gather]" in passed
    assert outcomes["test_attention_matches_reference_float32[acme_paged-block_size_1]"] == "skipped"
