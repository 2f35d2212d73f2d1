"""General plugins (entry point group ``backplane.plugins``) loaded with pluggy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backplane.plugins import (
    general_plugin_report,
    get_logits_processors,
    get_plugin_manager,
    load_general_plugins,
)

# A general plugin: a Llama variant under a new architecture name, an extra
# attention backend for the cpu platform, and a logits processor.
GOOD_PLUGIN = '''
from backplane.plugins_sdk import ReferenceAttentionBackend, hookimpl

sdk_version = "1.1"
CALLS = {{"register_models": 0}}
ARCH = "{arch}"


class PluginReferenceBackend(ReferenceAttentionBackend):
    name = "plugin_reference"


def ban_token_zero(logits, output_token_ids):
    logits[:, 0] = float("-inf")
    return logits


@hookimpl
def register_models(registry):
    from backplane.core.models.llama import LlamaForCausalLM

    class PluginLlamaForCausalLM(LlamaForCausalLM):
        """The Llama definition, served under the plugin's architecture name."""

    CALLS["register_models"] += 1
    registry.register_model(ARCH, PluginLlamaForCausalLM)


@hookimpl
def register_attention_backends(platform_name):
    return [PluginReferenceBackend] if platform_name == "cpu" else []


@hookimpl
def register_logits_processors():
    return [ban_token_zero]
'''


def _install_general_plugin(fake_site, name: str, source: str, dist: str | None = None) -> str:
    module = f"{fake_site.prefix}_{name}"
    fake_site.dist(dist or f"fake-general-{name}", "0.4.2", {module: source},
                   {"backplane.plugins": {name: module}})
    return module


@pytest.fixture
def good_plugin(fake_site, request):
    arch = f"PluginLlama{request.node.name.replace('_', '').title()[:24]}ForCausalLM"
    module = _install_general_plugin(fake_site, "goodplug", GOOD_PLUGIN.format(arch=arch))
    return module, arch


def test_load_is_idempotent_and_registers_models_once(good_plugin):
    import importlib

    from backplane.core.models.registry import supported_architectures

    module, arch = good_plugin
    first = load_general_plugins()
    assert load_general_plugins() is first
    plugin_module = importlib.import_module(module)
    assert plugin_module.CALLS["register_models"] == 1
    assert arch in supported_architectures()
    info = {p.name: p for p in general_plugin_report()}["goodplug"]
    assert (info.status, info.distribution, info.dist_version) == ("loaded", "fake-general-goodplug",
                                                                    "0.4.2")
    assert info.hooks == ["register_attention_backends", "register_logits_processors",
                          "register_models"]


def test_attention_backend_is_appended_to_the_named_platform(good_plugin):
    from backplane.platforms import explain_selection, resolve_platform

    cpu = resolve_platform("cpu")
    names = [b.name for b in cpu.all_attention_backends()]
    assert names == ["cpu_paged", "cpu_sdpa", "plugin_reference"]
    assert [b.name for b in cpu.attention_backends()] == ["cpu_paged", "cpu_sdpa"]  # own only
    assert explain_selection("cpu").plugin("cpu").attention_backends == names


def test_logits_processors_are_collected(good_plugin):
    import torch

    processors = get_logits_processors()
    assert [p.__name__ for p in processors] == ["ban_token_zero"]
    logits = processors[0](torch.zeros(2, 5), [[], [1]])
    assert torch.isinf(logits[:, 0]).all()


def test_broken_plugins_are_reported_and_do_not_stop_others(fake_site, good_plugin):
    _install_general_plugin(fake_site, "importfail", "raise ImportError('needs libfoo')\n")
    _install_general_plugin(fake_site, "hookfail", (
        "from backplane.plugins_sdk import hookimpl\n"
        "@hookimpl\n"
        "def register_models(registry):\n"
        "    raise RuntimeError('bad weights map')\n"))
    _install_general_plugin(fake_site, "future", "sdk_version = '2.0'\n")
    _install_general_plugin(fake_site, "nohooks", "VALUE = 1\n")
    _install_general_plugin(fake_site, "badsig", (
        "from backplane.plugins_sdk import hookimpl\n"
        "@hookimpl\n"
        "def register_models(registry, extra_argument):\n"
        "    pass\n"))
    report = {p.name: p for p in general_plugin_report()}
    assert report["importfail"].status == "import_error"
    assert report["importfail"].reason == "import failed: ImportError: needs libfoo"
    assert report["hookfail"].status == "loaded"
    assert report["hookfail"].errors == ["register_models raised RuntimeError: bad weights map"]
    assert report["future"].status == "incompatible"
    assert "written for plugin SDK 2.0" in report["future"].reason
    assert report["nohooks"].reason == "implements no backplane hook"
    assert report["badsig"].status == "invalid" and "extra_argument" in report["badsig"].reason
    assert report["goodplug"].status == "loaded" and not report["goodplug"].errors


def test_allow_list_env_var(good_plugin, monkeypatch):
    monkeypatch.setenv("BACKPLANE_PLUGINS", "someone_else")
    info = {p.name: p for p in general_plugin_report()}["goodplug"]
    assert info.status == "disabled"
    assert info.reason == "not listed in BACKPLANE_PLUGINS (someone_else)"
    assert get_logits_processors() == []


def test_manager_is_process_wide(good_plugin):
    assert load_general_plugins() is get_plugin_manager()


def test_platforms_cli_lists_general_plugins(good_plugin, capsys):
    from backplane.entrypoints.cli.main import main

    assert main(["platforms", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plugins = {g["name"]: g for g in data["general_plugins"]}
    assert plugins["goodplug"]["status"] == "loaded"
    cpu = next(p for p in data["plugins"] if p["name"] == "cpu")
    assert cpu["attention_backends"] == ["cpu_paged", "cpu_sdpa", "plugin_reference"]


def test_llm_serves_a_model_architecture_registered_by_a_plugin(good_plugin, llama_model_dir,
                                                                 tmp_path):
    from backplane import LLM, SamplingParams

    _, arch = good_plugin
    plugin_model = tmp_path / "plugin-model"
    shutil.copytree(llama_model_dir, plugin_model)
    config_path = Path(plugin_model, "config.json")
    config = json.loads(config_path.read_text())
    config["architectures"] = [arch]
    config_path.write_text(json.dumps(config))

    prompts = ["The quick brown fox", "Rivers carry water"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    common = dict(max_model_len=128, num_kv_blocks=32, dtype="float32", device="cpu")
    # The plugin's model, run through the plugin's attention backend (forced by name)...
    plugin_llm = LLM(model=str(plugin_model), attention_backend="plugin_reference", **common)
    plugin_out = plugin_llm.generate(prompts, params, use_tqdm=False)
    # ...gives the built-in Llama's greedy tokens on the built-in backend.
    builtin_out = LLM(model=llama_model_dir, **common).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plugin_out] == [
        o.outputs[0].token_ids for o in builtin_out]
    assert plugin_llm.llm_engine.platform.all_attention_backends()[-1].name == "plugin_reference"
