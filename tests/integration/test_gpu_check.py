"""scripts/gpu_check.py runs end to end on the CPU (tiny shape): every section the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "server"), "PYTHONUNBUFFERED": "1"}
    env.pop(
        "TRITON_INTERPRET", None
    )  # the CPU's own paths: the kernels' modes run only where Triton compiles
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "gpu_check.py"),
        "--cpu",
        "--out",
        str(tmp_path),
        "--new-tokens",
        "16",
        "--profile",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["device"] == "cpu" and report["shape"] == "tiny"
    assert set(report["section_s"]) >= {
        "naive baseline",
        "engine eager",
        "engine static",
        "parity",
        "e2e",
        "embeddings",
    }
    emb = report["embeddings"]  # (figures: the GPU's; here the code path)
    assert emb["min_cosine"] > 0.999 and emb["engine_512_s"] > 0 and emb["engine_512_one_by_one_s"] > 0
    assert emb["engine_512_steps"]["steps"] > 0 and emb["engine_512_steps"]["forward_s"] > 0
    for budget in (512, 2048):  # one eager step: here, in another thread, chunks one by one
        assert set(emb[f"eager_step_{budget}"]) == {"wall_ms", "thread_wall_ms", "one_by_one_wall_ms"}
    for mode in (
        "alone",
        "every step, capped",
        "every step, uncapped",
        "share 0.5, capped",
        "share 0.5, uncapped",
    ):
        assert len(emb[f"itl_{mode}_ms"]) == 3  # p50, p99, mean
        assert mode == "alone" or emb[f"embed_wall_{mode}_s"] > 0
    assert report["naive_1_stream_tok_s"] > 0 and report["naive_32x8_tok_s"] > 0
    for variant in ("rows", "overlap", "compile", "compile-rows"):  # the same greedy tokens, every stream
        assert report[f"{variant}_same_tokens"] == {
            "1 stream + adapter": "1/1",
            "32 streams / 32 adapters": "32/32",
        }
        assert report[f"{variant}_common_prefix"] == {
            "1 stream + adapter": 16,
            "32 streams / 32 adapters": 16,
        }
    assert report["compile_warmup_s"] > 0
    assert set(report["mixed_step_ms static-rows"]) == {"eager", "graphed rows"}
    assert set(report["mixed_step_ms static-compile-rows"]) == {"compiled pieces", "eager", "graphed rows"}
    assert report["parity_float32"]["static"] == [True] * 3  # its prompts' first step: graphed rows
    # static-lora, static-compile-lora: the LoRA kernels where Triton compiles; here (no GPU, no
    # interpreter) the grouped products
    modes = ("eager", "static", "static-rows", "static-overlap", "static-compile", "static-compile-rows")
    for mode in (*modes, "static-lora", "static-compile-lora"):
        figures = report[f"engine_{mode}"]
        for k in ("1 stream + adapter", "32 streams / 1 adapter", "32 streams / 32 adapters"):
            assert figures[k] > 0 and figures[f"{k}: decode tok/s"] > 0  # (and the decode steps alone)
            # the prompts' step, within the run's whole time (new tokens at figures[k] tok/s)
            run_ms = 1e3 * 16 * (32 if "32" in k else 1) / figures[k]  # --new-tokens 16
            assert 0 < figures[f"{k}: prompt step ms"] < run_ms
    stats = report["graph_stats"]
    assert stats["static"]["eager"] > 0  # the static decoder ran (no capture on a CPU)
    assert stats["static"]["prompt_steps"] == 0 < stats["static-rows"]["prompt_steps"]
    assert report["parity_float32"] == {
        "eager": [True] * 3,
        "static": [True] * 3,
        "static-compile": [True] * 3,
    }
    assert max(report["logits_rel_err"]) < 1e-4  # float32 on the CPU: the same math as peft's
    assert report["errors"] == {}, report["errors"]
    for mode in ("static", "static-compile", "static-compile-lora"):  # the engine's own thread profiled
        assert "aten::" in (tmp_path / f"profile-engine-{mode}.txt").read_text(), mode
    levels = {r["concurrency"]: r for r in report["e2e_bench"]}
    assert set(levels) == {1, 32} and all(r["errors"] == 0 and r["tokens_per_s"] > 0 for r in levels.values())
    assert report["e2e_structured"] == "4 of 4 valid"
    engine = report["e2e_engine"]  # the server's /metrics: its engine took every bench token
    assert engine["steps"] > 0 and engine["step_ms"] > 0
    assert engine["tokens"] >= sum(r["output_tokens"] for r in levels.values())
    assert "mygpt engine (static), 32 streams / 32 adapters" in done.stdout  # the table, printed last


def test_gpu_check_runs_any_combination_of_the_options(tmp_path):
    """--modes takes the engine options in any combination and order (mode_flags), beyond the modes
    the full run lists: each runs as its own engine mode, its greedy tokens against the default's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "server"), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    mode = "static-lora-overlap-compile"  # no such mode in the full run's list
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path),
           "--new-tokens", "8", "--quick", "--skip-e2e", "--modes", f"static,{mode}"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert {k for k in report if k.startswith("engine_")} == {"engine_static", f"engine_{mode}"}
    assert report["compile_warmup_s"] > 0  # compiled, and overlapped: steps launched ahead and used
    launched, used = report[f"engine_{mode}"]["32 streams / 32 adapters: steps launched ahead / used"]
    assert launched > 0 and used > 0
    assert report["lora-overlap-compile_same_tokens"] == {
        "1 stream + adapter": "1/1",
        "32 streams / 32 adapters": "32/32",
    }
    assert report["errors"] == {}, report["errors"]


def test_a_mistyped_mode_stops_the_check_before_it_builds_anything(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "server")}
    env.pop("TRITON_INTERPRET", None)
    for modes, says in (
        ("static,static-compil", "no option compil"),
        ("graphs-compile", "start with 'static'"),  # a GPU's mode name on the CPU
    ):
        cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path),
               "--modes", modes]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and says in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "gpu-check.json").exists()
