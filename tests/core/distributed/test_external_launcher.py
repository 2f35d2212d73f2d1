"""``external_launcher``: `torchrun --nproc-per-node 2` runs one LLM program on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backplane import LLM, SamplingParams

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "torchrun_external_launcher.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("pp", [1, 2], ids=["tp2", "pp2"])
def test_torchrun_ranks_agree_with_each_other_and_with_one_rank(llama_model_dir, tmp_path, pp):
    """Both ranks return the same tokens: with pp=2 the second rank (a later stage,
    no output head) takes rank 0's tokens for its own scheduler."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(_free_port()), str(EXAMPLE), llama_model_dir,
         "--json-dir", str(tmp_path), "--max-tokens", "12", "--pp", str(pp)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    assert lines[0]["tokens"] == lines[1]["tokens"]
    # Seeded sampling on one rank draws the same tokens.
    llm = LLM(llama_model_dir, dtype="float32", max_model_len=128, num_kv_blocks=64, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ([1, 5, 9, 13, 200, 17], [1, 44, 45, 46])],
                        SamplingParams(max_tokens=12, temperature=0.8, seed=1234), use_tqdm=False)
    llm.llm_engine.shutdown()
    assert lines[0]["tokens"] == [o.outputs[0].token_ids for o in outs]
