"""Security properties that are not about one stage: secrets stay out of run.json and logs, no
shell is ever given user input, the HTML report cannot run injected scripts (see test_report)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from audit.redact import REDACTED, redact, redact_text

AUDIT = Path(__file__).resolve().parents[1] / "audit"


def test_url_passwords_and_secret_environment_values_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-example-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("HOME_DIRECTORY_NAME", "not-a-secret-value")
    text = ("s3://AKIA:wJalrXUtnFEMI-example-secret@bucket/x https://user:pa55word@host/p "
            "token hf_abcdefghijklmnop and not-a-secret-value")
    clean = redact_text(text)
    assert "wJalrXUtnFEMI" not in clean and "pa55word" not in clean and "hf_abcdefghijklmnop" not in clean
    assert f"https://user:{REDACTED}@host/p" in clean and "not-a-secret-value" in clean
    assert redact({"a": [text], text: 1})["a"][0] == clean


def test_run_json_and_logs_hold_no_secret_from_the_environment(ray_local: str, tiny_checkpoint: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture) -> None:
    from audit.cli import main

    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("MEMAUDIT_TEST_API_TOKEN", secret)
    checkpoint = tmp_path / f"ckpt-{secret}"  # a path that carries the secret: logged and recorded
    shutil.copytree(tiny_checkpoint, checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    args = ["-v", "run", "--set", f"run.root={tmp_path / 'runs'}", "--set", f"model.path={checkpoint}",
            "--set", f"prompts.source={prompts}", "--set", "reference.path=null", "--set", "generation.steps=2",
            "--set", "generation.samples_per_prompt=1", "--set", f"run.model_name=m-{secret[:2]}",
            "--set", "embedding.kind=builtin"]
    monkeypatch.setattr("sys.argv", ["memaudit", *args, f"--note=https://me:{secret}@example.org"])
    assert main(args) == 0
    run_json = next((tmp_path / "runs").glob("*/*/*/run.json")).read_text()
    assert secret not in run_json
    assert json.loads(run_json)["config"]["model"]["path"] == str(tmp_path / f"ckpt-{REDACTED}")
    assert json.loads(run_json)["environment"]["argv"][-1] == f"--note=https://me:{REDACTED}@example.org"
    out, err = capfd.readouterr()
    assert f"hashing checkpoint {tmp_path / f'ckpt-{REDACTED}'}" in err  # the log line is there, redacted
    assert secret not in err


def test_no_shell_and_no_eval_anywhere_in_the_package() -> None:
    offenders = []
    for path in sorted(AUDIT.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{path.name}:{node.value.lineno} shell=")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {
                    "system", "popen"} and getattr(node.func.value, "id", "") == "os":
                offenders.append(f"{path.name}:{node.lineno} os.{node.func.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec"}:
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert offenders == []


def test_local_ray_listens_on_loopback_only_and_serves_no_dashboard(ray_local: str) -> None:
    import ipaddress

    import psutil

    ray_pids = {p.pid for p in psutil.process_iter(["cmdline"])
                if any("ray" in part for part in (p.info["cmdline"] or []))}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    assert listening  # the GCS and raylet at least
    for conn in listening:
        address = ipaddress.ip_address(conn.laddr.ip)
        address = address.ipv4_mapped or address if address.version == 6 else address
        assert address.is_loopback, conn
    assert 8265 not in {c.laddr.port for c in listening}  # no dashboard UI / Jobs API by default
