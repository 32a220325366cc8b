"""The compile cache: artifacts saved by one process make a fresh process (empty inductor cache)
hit the cache; nothing new → nothing written; a broken file is reported and skipped; `ablate
clean` keeps it. Compiles one small function with inductor on the CPU (needs a C++ compiler)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.training import compile_cache
from cli_run import ablate_in

pytestmark = pytest.mark.seconds(25)  # on one core (tests/conftest.py: longest files first)

SCRIPT = """
import sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from ablate.training import compile_cache
directory, load = Path(sys.argv[1]), sys.argv[2] == "load"
loaded, known = compile_cache.load(directory, print) if load else (0, set())
f = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(), dynamic=False)
f(torch.randn(64))
print("loaded", loaded, "hits", counters["inductor"]["fxgraph_cache_hit"], "saved", compile_cache.save(directory, known))
"""


def _run(tmp_path: Path, inductor_dir: str, mode: str) -> dict[str, int]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "compile"), mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()[-6:]
    return {words[i]: int(words[i + 1]) for i in range(0, 6, 2)}


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_saved_artifacts_make_a_fresh_process_hit_the_cache(tmp_path):
    first = _run(tmp_path, "inductor-a", "save")
    files = list((tmp_path / "compile").glob("*.bin"))
    assert first["hits"] == 0 and first["saved"] > 0 and [f.stat().st_size for f in files] == [first["saved"]]
    second = _run(tmp_path, "inductor-b", "load")  # a fresh inductor cache: only the saved artifacts
    assert second["loaded"] == first["saved"] and second["hits"] >= 1
    assert second["saved"] == 0 and list((tmp_path / "compile").glob("*.bin")) == files  # nothing new


def test_an_unreadable_artifact_file_is_reported_and_skipped(tmp_path):
    (tmp_path / "broken.bin").write_bytes(b"not a cache")
    warnings: list[str] = []
    assert compile_cache.load(tmp_path, warnings.append) == (0, set())
    assert len(warnings) == 1 and "broken.bin" in warnings[0]


def test_clean_keeps_the_compile_cache(tmp_path, monkeypatch):
    cache = tmp_path / ".ablate-cache"
    (cache / compile_cache.DIR_NAME / "torch-gpu").mkdir(parents=True)
    (cache / compile_cache.DIR_NAME / "torch-gpu" / "a.bin").write_bytes(b"x")
    (cache / "oracle-0123456789abcdef").mkdir()
    assert ablate_in(tmp_path, monkeypatch, "clean") == 0
    assert (cache / compile_cache.DIR_NAME / "torch-gpu" / "a.bin").is_file()
    assert not (cache / "oracle-0123456789abcdef").exists()
