"""The CLI's answers to an operator's mistakes: one line and a non-zero status, never a traceback or a
silent 0; the tools that run beside a server read its settings (MYGPT_*)."""

from __future__ import annotations

import socket

import pytest

from mygpt import cli


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_bench_says_when_every_request_failed_and_checks_its_levels(capsys):
    with pytest.raises(SystemExit) as end:
        cli.main(["bench", "--base-url", dead_url(), "--requests", "2", "--max-tokens", "2"])
    assert "every request failed" in str(end.value.code)  # (it printed nan and exited 0)
    for bad in ("0", "abc", "1,-4"):
        with pytest.raises(SystemExit) as end:
            cli.main(["bench", "--concurrency", bad])
        assert end.value.code == 2 and "--concurrency" in capsys.readouterr().err


def test_finetune_without_a_server_is_one_line(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    url = dead_url()
    with pytest.raises(SystemExit) as end:
        cli.main(["finetune", str(train), "--base-url", url])
    assert end.value.code == f"mygpt finetune: cannot reach the server at {url}"


def test_eval_reads_the_servers_settings(monkeypatch, tmp_path):
    """In the server's container everything is set through MYGPT_*: eval looked in ./adapters."""
    from mygpt.finetune import cli as ft

    seen = {}
    monkeypatch.setattr(ft, "evaluate", lambda args: seen.update(vars(args)))
    monkeypatch.setenv("MYGPT_ADAPTER_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MYGPT_CACHE_DIR", str(tmp_path / "cache"))
    cli.main(["eval", "valid.jsonl", "--adapter", "support"])
    assert (seen["adapter_dir"], seen["cache_dir"], seen["model"]) == (
        str(tmp_path / "store"), str(tmp_path / "cache"), "default",
    )  # fmt: skip
    cli.main(["eval", "valid.jsonl", "--adapter", "support", "--adapter-dir", "mine"])
    assert seen["adapter_dir"] == "mine"  # a flag wins


def test_a_model_path_that_is_no_model_says_so(tmp_path):
    """(A missing path fell through to the hub: "Repo id must be in the form...")."""
    from mygpt.config import Settings
    from mygpt.engine.loader import resolve_source

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    for model, says in (
        (str(tmp_path / "nope"), "no such file or directory"),
        (str(tmp_path / "empty"), "without config.json"),
        (str(tmp_path / "weights.bin"), "not a model directory"),
    ):
        with pytest.raises(ValueError, match=says):
            resolve_source(Settings(model=model, cache_dir=tmp_path / "cache"))
    assert (
        resolve_source(Settings(model="HuggingFaceTB/SmolLM2-135M-Instruct"))
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
