"""`backplane collect-env` runs, names the chosen platform, and masks secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from backplane.entrypoints.cli.collect_env import _ranges, environment


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "BACKPLANE_LOGGING_LEVEL": "WARNING", **env}
    return subprocess.run(
        [sys.executable, "-m", "backplane.entrypoints.cli.main", "collect-env", *args],
        capture_output=True, text=True, env=full_env, timeout=120,
    )


def test_json_report_names_chosen_platform_and_versions():
    proc = _run("--json", OMP_NUM_THREADS="2", BACKPLANE_MAX_MODEL_LEN="64",
                HF_TOKEN="hf_secret_value")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    from backplane.version import __version__

    assert data["versions"]["backplane"] == __version__
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    chosen = data["platforms"]["chosen"]
    names = {p["name"] for p in data["platforms"]["plugins"]}
    assert "cpu" in names and chosen in names  # cpu is always there; a GPU may win
    assert all(p["reason"] for p in data["platforms"]["plugins"])
    assert data["accelerator"]["platform"] == chosen
    assert data["cpu"]["usable_cores"] >= 1 and data["cpu"]["memory_total_bytes"] > 0
    assert data["environment"]["OMP_NUM_THREADS"] == "2"
    assert data["environment"]["BACKPLANE_MAX_MODEL_LEN"] == "64"
    assert data["environment"]["HF_TOKEN"] == "<set>"
    assert "hf_secret_value" not in proc.stdout
    assert any(d["group"] == "backplane.platforms" for d in data["plugin_distributions"])


def test_text_report():
    proc = _run(BACKPLANE_PLATFORM="cpu")
    assert proc.returncode == 0, proc.stderr
    assert "== Versions ==" in proc.stdout and "== CPU ==" in proc.stdout
    assert "chosen: cpu (requested by" in proc.stdout


def test_helpers():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    env = environment({"BACKPLANE_API_KEY": "x", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert env == {"BACKPLANE_API_KEY": "<set>", "CUDA_VISIBLE_DEVICES": "0"}
