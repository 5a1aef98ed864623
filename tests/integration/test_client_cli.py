"""Client commands against a real `croupier serve` process (TLS, token): one set of connection
flags on every command (--token-file, $CROUPIER_TOKEN, --tls-ca, --tls-server-name), and
`client dump --format jsonl` printing exactly what `simulate --format jsonl` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from croupier.cli import main
from workers.harness import self_signed, terminate

TOKEN = "client-cli-token-0123456789"
SEQUENCE = ["--cluster-sizes", "50,30,20", "--block-size", "4", "--policy", "clusterclip", "--clip", "3",
            "--global-batch", "8", "--seed", "2"]



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-cli")
    cert, key = self_signed(root, "croupier.test")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", *SEQUENCE, "--state-dir", str(root / "state"),
                             "--port", "0", "--token-file", str(token_file), "--tls-cert", str(cert),
                             "--tls-key", str(key), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        yield {"address": f"127.0.0.1:{info['port']}", "port": info["port"], "cert": str(cert),
               "token_file": str(token_file), "root": root}
    finally:
        terminate(proc, 60)


def _dump(server, *extra: str) -> list[str]:
    return ["client", "dump", "--server", server["address"], "--world", "2", "--rank", "1", "--start-step", "0",
            "--steps", "5", *extra]


def test_dump_jsonl_equals_simulate(server, capsys):
    assert main(_dump(server, "--tls-ca", server["cert"], "--token-file", server["token_file"],
                      "--format", "jsonl")) == 0
    dumped = capsys.readouterr()
    assert main(["simulate", *SEQUENCE, "--steps", "5", "--world", "2", "--rank", "1", "--format", "jsonl"]) == 0
    simulated = capsys.readouterr().out
    assert dumped.out == simulated
    assert [json.loads(line)["step"] for line in dumped.out.splitlines()] == [0, 1, 2, 3, 4]
    assert "job " in dumped.err  # the job line goes to stderr, keeping stdout diffable
    assert main(_dump(server, "--tls-ca", server["cert"], "--token-file", server["token_file"])) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("step 0\t")  # text stays the default


def _commands(server, out: Path) -> dict[str, list[str]]:
    tls = ["--server", server["address"], "--tls-ca", server["cert"]]
    return {
        "status": ["status", *tls, "--json"],
        "checkpoint": ["checkpoint", *tls, "--step", "1"],
        "dump": _dump(server, "--tls-ca", server["cert"], "--steps", "1"),
        "report": ["report", *tls, "--out", str(out), "--no-replay", "--table", "0"],
    }


def test_every_client_command_takes_a_token_file_or_the_environment(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CROUPIER_TOKEN", raising=False)
    errs = []
    for name, argv in _commands(server, tmp_path / "report").items():
        assert main([*argv, "--token-file", server["token_file"]]) == 0, (name, capsys.readouterr().err)
        capsys.readouterr()
        monkeypatch.setenv("CROUPIER_TOKEN", TOKEN)
        assert main(argv) == 0, (name, capsys.readouterr().err)
        capsys.readouterr()
        monkeypatch.delenv("CROUPIER_TOKEN")
        assert main(argv) == 2, name
        errs.append((name, capsys.readouterr().err))
    assert [name for name, _ in errs] == ["status", "checkpoint", "dump", "report"]
    assert all("UNAUTHENTICATED" in err for _, err in errs), errs
    # update needs the admin token: a plain token from either source authenticates, then is refused
    update = ["update", "--server", server["address"], "--tls-ca", server["cert"], "--step", "50", "--clip", "2"]
    assert main([*update, "--token-file", server["token_file"]]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv("CROUPIER_TOKEN", TOKEN)
    assert main(update) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.delenv("CROUPIER_TOKEN")
    assert main(update) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_one_tls_flag_name_everywhere_with_the_old_name_kept(server, capsys):
    for argv in (["status", "--server", server["address"], "--json"],
                 _dump(server, "--steps", "1")):
        assert main([*argv, "--tls-root-cert", server["cert"], "--token-file", server["token_file"]]) == 0
        assert "--tls-root-cert is deprecated; use --tls-ca" in capsys.readouterr().err
    # the certificate names croupier.test and 127.0.0.1, not localhost: the name is checked
    local = ["status", "--server", f"localhost:{server['port']}", "--tls-ca", server["cert"],
             "--token-file", server["token_file"], "--json", "--timeout", "5"]
    assert main(local) == 2
    capsys.readouterr()
    assert main([*local, "--tls-server-name", "croupier.test"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] is not None


def test_token_flags_refuse_ambiguity_and_missing_files(server, tmp_path, capsys):
    assert main(_dump(server, "--token", TOKEN, "--token-file", server["token_file"])) == 2
    assert "give --token or --token-file, not both" in capsys.readouterr().err
    assert main(["status", "--server", server["address"], "--token-file", str(tmp_path / "nope")]) == 2
    assert "cannot read token file" in capsys.readouterr().err
    assert main(["status", "--server", server["address"], "--tls-server-name", "croupier.test"]) == 2
    assert "--tls-server-name needs --tls-ca" in capsys.readouterr().err


def test_the_agent_takes_the_shared_connection_flags(tmp_path, capsys):
    import argparse

    from croupier.client.cli import agent_cli

    base = ["agent", "--server", "127.0.0.1:1", "--runtime-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    parser = argparse.ArgumentParser()
    agent_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*base, "--tls-root-cert", "ca.pem", "--tls-server-name", "croupier.test",
                              "--token-file", "token"])
    assert (args.tls_ca, args.tls_server_name, args.token_file) == ("ca.pem", "croupier.test", "token")
    assert "--tls-root-cert is deprecated; use --tls-ca" in capsys.readouterr().err
    assert main([*base, "--tls-server-name", "croupier.test"]) == 2
    assert "--tls-server-name needs --tls-ca" in capsys.readouterr().err
