"""Launchers: gcloud command building (dry run, never calls gcloud) and the local launcher."""
from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import local, tpu

WORKER = str(Path(__file__).with_name("_dist_worker.py"))
PRETRAIN = ["jaxttt", "pretrain", "--config", "configs/pretrain/120m.yaml",
            "run_dir=runs/x ckpt_dir=gs://BUCKET/runs/x"]


def _args(action: str, *extra: str, command: list[str] | None = None):
    argv = [action, "--name", "my-tpu", *extra]
    return tpu.parse_args(argv + (["--", *command] if command else []))


def _flag(cmd: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return value


# --------------------------------------------------------------------------------------------
# TPU launcher
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("acc,zone,version", [
    ("v4-8", "us-central2-b", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite"),
])
def test_create_command(acc, zone, version):
    [cmd] = tpu.build_commands("create", _args("create", "--zone", zone, "--type", acc, "--spot"))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert _flag(cmd, "accelerator-type") == acc
    assert _flag(cmd, "zone") == zone
    assert _flag(cmd, "version") == version
    assert "--spot" in cmd and "--preemptible" not in cmd


def test_runtime_version_override_and_unknown_type():
    args = _args("create", "--zone", "z", "--type", "v5litepod-16", "--runtime-version", "mine")
    assert _flag(tpu.build_commands("create", args)[0], "version") == "mine"
    with pytest.raises(ValueError, match="--runtime-version"):
        tpu.build_commands("create", _args("create", "--zone", "z", "--type", "v9-8"))


def test_setup_copies_and_installs_on_all_workers():
    archive, scp, ssh = tpu.build_commands("setup", _args("setup", "--zone", "us-central2-b",
                                                          "--project", "proj"))
    assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp[4] == "scp" and scp[5] == tarball and scp[6] == "my-tpu:jaxttt.tar.gz"
    for cmd in (scp, ssh):
        assert "--worker=all" in cmd and "--project=proj" in cmd
    script = _flag(ssh, "command")
    assert "tar -xzf" in script and '"jax[tpu]"' in script and '-e ".[dev]"' in script


@pytest.mark.parametrize("acc,zone", [("v4-8", "us-central2-b"), ("v5litepod-16", "us-west4-a")])
def test_run_dry_run_prints_quoted_command(acc, zone, capsys):
    command = PRETRAIN + ["data.text=a b; c"]  # needs quoting twice: in the script, for the shell
    argv = ["run", "--name", "my-tpu", "--zone", zone, "--type", acc, "--dry-run", "--", *command]
    assert tpu.main(argv) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    cmd = shlex.split(line)
    assert cmd == tpu.build_commands("run", tpu.parse_args(argv))[0]
    assert cmd[4:6] == ["ssh", "my-tpu"] and "--worker=all" in cmd and f"--zone={zone}" in cmd
    script = _flag(cmd, "command")
    assert "JAXTTT_COORDINATOR=auto" in script and "nohup" in script
    assert shlex.join(command) in script


def test_ckpt_dir_is_appended_as_override():
    args = _args("run", "--zone", "z", "--ckpt-dir", "gs://b/r", command=["jaxttt", "pretrain"])
    assert tpu.remote_command(args) == ["jaxttt", "pretrain", "ckpt_dir=gs://b/r"]


DISCOVER = ["jaxttt", "discover", "--ckpt", "smollm2-135m-instruct", "--env",
            "circle_packing:n=26", "--out", "/mnt/shared/runs/cp", "--config",
            "configs/discover/official.yaml", "sampling.max_new_tokens=512"]
SDFT = ["jaxttt", "sdft", "--ckpt", "smollm2-135m-instruct", "--data", "skill.jsonl", "--out",
        "/mnt/shared/runs/sdft", "--config", "configs/sdft/default.yaml", "eval.probes=''"]


@pytest.mark.parametrize("command", [DISCOVER, SDFT], ids=["discover", "sdft"])
def test_run_dry_run_starts_any_jaxttt_command_on_every_worker(command, capsys):
    """discover and sdft start like pretraining: the same quoted command on all workers."""
    argv = ["run", "--name", "my-tpu", "--zone", "us-west4-a", "--log-name", command[1],
            "--dry-run", "--", *command]
    assert tpu.main(argv) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    cmd = shlex.split(line)
    assert cmd[4:6] == ["ssh", "my-tpu"] and "--worker=all" in cmd
    script = _flag(cmd, "command")
    assert "JAXTTT_COORDINATOR=auto" in script
    assert f"setsid nohup {shlex.join(command)} > $HOME/jaxttt-logs/{command[1]}.log" in script


def test_subcommand_and_ckpt_dir_only_for_pretrain(capsys):
    assert tpu.jaxttt_subcommand(DISCOVER) == "discover"
    assert tpu.jaxttt_subcommand(["python", "-m", "jaxttt.cli", "sdft", "--out", "o"]) == "sdft"
    assert tpu.jaxttt_subcommand(["python", "train.py"]) is None
    argv = ["run", "--name", "t", "--zone", "z", "--dry-run", "--ckpt-dir", "gs://b/r", "--",
            *DISCOVER]
    assert tpu.main(argv) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "only `jaxttt pretrain` reads" in err and "`jaxttt discover`" in err


def test_logs_stop_delete_target_all_workers():
    for action in ("logs", "stop", "delete"):
        [cmd] = tpu.build_commands(action, _args(action, "--zone", "z"))
        assert cmd[4] == {"logs": "ssh", "stop": "ssh", "delete": "delete"}[action]
        assert action == "delete" or "--worker=all" in cmd
    assert "tail -n 100" in _flag(tpu.build_commands("logs", _args("logs", "--zone", "z"))[0],
                                  "command")


def test_worker_scripts_run_and_stop_under_bash(tmp_path):
    """The run/stop scripts on a fake worker home: starts in the background, refuses a second
    run, stop kills the whole process group. pkill is replaced by a recorder."""
    venv_bin, fake_bin = tmp_path / "jaxttt-venv/bin", tmp_path / "fakebin"
    for d in (venv_bin, fake_bin, tmp_path / "jaxttt"):
        d.mkdir(parents=True)
    (venv_bin / "jaxttt").write_text('#!/bin/sh\necho "args=$* coord=$JAXTTT_COORDINATOR"\n'
                                     "sleep 60 & wait\n")
    (fake_bin / "pkill").write_text('#!/bin/sh\necho "$*" > "$HOME/pkill.args"\n')
    for f in (venv_bin / "jaxttt", fake_bin / "pkill"):
        f.chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path), PATH=f"{fake_bin}:{os.environ['PATH']}")
    args = _args("run", "--zone", "z", command=["jaxttt", "pretrain", "x=a b"])
    sh = lambda script: subprocess.run(["bash", "-c", script], env=env, timeout=30,
                                       capture_output=True, text=True)
    assert sh(tpu.run_script(args)).returncode == 0
    log = tmp_path / "jaxttt-logs/run.log"
    pgid = int((tmp_path / "jaxttt-logs/run.pid").read_text())
    _wait_for(lambda: log.read_text() == "args=pretrain x=a b coord=auto\n")
    assert sh(tpu.run_script(args)).returncode == 1  # already running
    assert sh(tpu.stop_script(args)).returncode == 0
    _wait_for(lambda: not _group_alive(pgid))
    assert (tmp_path / "pkill.args").read_text().split() == ["-KILL", "-f", tpu.PKILL_PATTERN]


def test_missing_gcloud_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcloud
    monkeypatch.setattr(tpu.subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    assert tpu.main(["create", "--name", "t", "--zone", "z", "--type", "v4-8"]) == 2
    err = capsys.readouterr().err
    assert "`gcloud` is not on PATH" in err and "--dry-run" in err
    with pytest.raises(tpu.GcloudNotFound):
        tpu.execute([["gcloud", "version"]])


# --------------------------------------------------------------------------------------------
# Local launcher
# --------------------------------------------------------------------------------------------
def test_child_env_overrides_device_count():
    env = local.child_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                           "PYTHONPATH": "/x"}, rank=1, n=2, port=1234, devices_per_process=2)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAXTTT_COORDINATOR"] == "127.0.0.1:1234" and env["JAXTTT_PROCESS_ID"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(local.REPO_ROOT), "/x"]


def test_two_processes_sum_across_hosts(tmp_path):
    out = io.StringIO()
    rc = local.launch_local([sys.executable, WORKER, "sum"], n=2, devices_per_process=2,
                            log_dir=tmp_path, timeout=120, out=out)
    text = out.getvalue()
    assert rc == 0, text
    for r in (0, 1):  # global array [1, 1, 2, 2] summed over 4 devices in 2 processes
        assert f"[p{r}] rank={r} devices=4 sum=6.0 ranks=[0, 1]" in text, text
        assert f"rank={r} devices=4" in (tmp_path / f"p{r}.log").read_text()


_PIECEMEAL = """
import sys, time
sys.stderr.write("[lib] connected to 1"); sys.stderr.flush(); time.sleep(0.3)
print("rank=0 done", flush=True); time.sleep(0.3)
sys.stderr.write(" peer\\n"); sys.stderr.flush()
"""


def test_lines_stay_whole_when_stderr_is_written_in_pieces(tmp_path):
    # gloo writes its stderr lines in pieces; a line the program prints must not land inside one
    out = io.StringIO()
    rc = local.launch_local([sys.executable, "-c", _PIECEMEAL], n=1, log_dir=tmp_path, out=out,
                            timeout=60)
    lines = out.getvalue().splitlines()
    assert rc == 0 and "[p0] rank=0 done" in lines and "[p0] [lib] connected to 1 peer" in lines
    assert set((tmp_path / "p0.log").read_text().splitlines()) == {
        "rank=0 done", "[lib] connected to 1 peer"}


def test_failure_kills_the_other_process_group(tmp_path):
    out = io.StringIO()
    start = time.monotonic()
    rc = local.launch_local([sys.executable, WORKER, "fail", str(tmp_path)], n=2, out=out,
                            timeout=60, kill_grace=2.0)
    assert rc == 3, out.getvalue()
    assert time.monotonic() - start < 30
    assert "[p1] rank 1 failing on purpose" in out.getvalue()
    for pid in map(int, (tmp_path / "pids").read_text().split()):  # rank 0 and its `sleep`
        _wait_for(lambda: not _alive(pid))


def test_timeout_stops_everything():
    out = io.StringIO()
    rc = local.launch_local([sys.executable, "-c", "import time; time.sleep(60)"], n=2,
                            timeout=1.0, out=out, kill_grace=1.0)
    assert rc == local.TIMEOUT_RC and "timed out" in out.getvalue()


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        local.main(["-n", "2"])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_alive(int(p)) for p in os.listdir("/proc") if p.isdigit()
               and _pgid(int(p)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
