"""bench/device.sh's control flow, on the CPU: syntax, --help, the stage cap (SIGINT first so reports are
written, SIGKILL at the cap, and the summary says which), the caps-within-total check, the stop without a GPU,
and a run of a stage subset with a fake nvidia-smi (the GPU's own arch reaches the build and the tests through
LMMRT_CUDA_ARCHS)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

NO_NVIDIA_SMI = shutil.which("nvidia-smi") is None
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench/device.sh", "bench/cuda_checks.sh", "bench/stages.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _capped(tmp_path, cap: int, body: str):
    """Run `capped CAP LOG python -c BODY` from a shell that ignores SIGINT, like a background job
    of a non-interactive shell (the device machine's runner may start us that way)."""
    log = tmp_path / "stage.log"
    cmd = f'. bench/stages.sh; capped {cap} "{log}" "{sys.executable}" -c "$BODY"; echo "rc=$?"'
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, BODY=body, PY=sys.executable),
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    return r.stdout.strip(), time.monotonic() - t0, log.read_text()


def test_capped_stops_with_sigint_and_the_report_is_written(tmp_path):
    report = tmp_path / "report.xml"
    body = ("import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
            f"    open({str(report)!r}, 'w').write('<testsuite/>')\n    print('interrupted, report written')\n"
            "    raise SystemExit(2)")
    out, took, log = _capped(tmp_path, 4, body)
    assert out == "rc=124", out  # timeout's status for a command it stopped
    assert report.read_text() == "<testsuite/>" and "report written" in log
    assert took < 5, took


def test_capped_kills_at_the_cap_what_ignores_sigint(tmp_path):
    body = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)"
    out, took, _ = _capped(tmp_path, 4, body)
    assert out == "rc=137", out
    assert 3.5 < took < 6, took


def test_caps_over_the_total_are_refused(tmp_path):
    r = subprocess.run(["bash", "bench/device.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TOTAL_S="100", OUT=str(tmp_path), PY=sys.executable))
    assert r.returncode == 2 and "over TOTAL_S=100s" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "stages.tsv").exists()  # nothing ran


def test_default_plan_fits_eight_minutes(tmp_path):
    r = subprocess.run(["bash", "bench/device.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PY=sys.executable))
    assert r.returncode == 0, r.stderr
    plan = dict(ln.split(" ", 1) for ln in r.stdout.splitlines())
    caps = {k: int(v) for k, v in plan.items() if k != "total"}
    # most important first: the build, then model parity / CUDA-graph decode, then kernel numerics
    assert list(caps)[:4] == ["env", "build", "tests_model", "tests_kernels"]
    assert "bench_tp" not in caps  # opt-in
    total, limit = map(int, plan["total"].split(" of "))
    assert total == sum(caps.values()) <= limit <= 8 * 60 - 20


def test_stage_subset_with_fake_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *compute_cap*noheader*) echo "9.0";; *) echo "fake nvidia-smi";; esac\n')
    smi.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "LMMRT_CUDA_ARCHS"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out), PY=sys.executable, STAGES="merge",
               CAP_merge="90")  # its imports alone can take 15 s on a busy CI box
    r = subprocess.run(["bash", "bench/device.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln.split("\t") for ln in (out / "stages.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == ["stage", "merge"]  # only the stages asked for
    assert rows[1][1] == "0", (out / "logs" / "merge.log").read_text()
    assert "LMMRT_CUDA_ARCHS=90" in (out / "summary.md").read_text()


def test_cuda_checks_runs_the_four_sanitizers(tmp_path):
    # A fake compute-sanitizer records its arguments; racecheck "finds" an error, which must fail
    # the run while the other three still run and report.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    fake = bin_dir / "compute-sanitizer"
    fake.write_text(f'#!/bin/sh\necho "$*" > "{calls}/$2"\n[ "$2" = racecheck ] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, OUT=str(log),
               STEPS="sanitize")
    r = subprocess.run(["bash", "bench/cuda_checks.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    tools = ("memcheck", "racecheck", "synccheck", "initcheck")
    assert sorted(p.name for p in calls.iterdir()) == sorted(tools)
    for tool in tools:
        args = (calls / tool).read_text()
        assert args.startswith(f"--tool {tool} --error-exitcode 1 {sys.executable} -m pytest")
        assert "-k sanitize" in args
    summary = (log / "summary.txt").read_text()
    assert "=== racecheck: rc=1" in summary and "=== memcheck: rc=0" in summary
    assert "cuda_checks: FAIL" in summary


def test_a_stopped_parallel_pytest_still_writes_its_junit_xml(tmp_path):
    # The tests stages' pytest command (xdist workers, per-test timeout) stopped at its cap by SIGINT, with the
    # tests stages' grace: the finished test is in the junit XML, written as pytest exits. The hanging worker
    # does not take SIGINT (as one inside a CUDA call or still importing torch does not): xdist waits 10 s for
    # it before it kills it and writes the XML, which a grace under that did not leave (killed at the cap).
    (tmp_path / "test_dummy.py").write_text(
        "import signal, time\n\ndef test_fast():\n    pass\n\n"
        "def test_hangs():\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n    time.sleep(60)\n")
    xml = tmp_path / "junit.xml"
    cmd = (f'. bench/stages.sh; STAGE_GRACE=$XDIST_GRACE_S capped 40 "{tmp_path}/log" "{sys.executable}" -m pytest '
           f'-q -n 2 --timeout 60 --timeout-method thread -p no:cacheprovider --junitxml "{xml}" '
           f'"{tmp_path}/test_dummy.py"; echo "rc=$?"')
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PY=sys.executable))
    assert r.stdout.strip() == "rc=124", r.stdout + (tmp_path / "log").read_text()
    report = xml.read_text()
    assert 'name="test_fast"' in report, report + (tmp_path / "log").read_text()


def _device_sh(tmp_path, *args, fake_smi: str | None = None, **env):
    """`bash bench/device.sh ARGS` with OUT=tmp_path/out, PY this Python, `env` added, and fake_smi (a shell
    body) as nvidia-smi when given: (CompletedProcess, seconds)."""
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable, **env}
    if fake_smi is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{fake_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        full["PATH"] = f"{bin_dir}:{full['PATH']}"
    t0 = time.monotonic()
    r = subprocess.run(["bash", "bench/device.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=full)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_settings_and_runs_nothing(tmp_path, flag):
    r, _ = _device_sh(tmp_path, flag)
    assert r.returncode == 0, r.stderr
    for knob in ("STAGES=", "CAP_<stage>", "TOTAL_S=", "GRACE_S=", "DRY_RUN=1", "OUT=", "PY=", "ALLOW_NO_GPU=1",
                 "bench_tp"):
        assert knob in r.stdout, knob
    assert not (tmp_path / "out").exists()


def test_an_argument_is_refused(tmp_path):
    r, _ = _device_sh(tmp_path, "tests_model")
    assert r.returncode == 2 and "unknown argument 'tests_model'" in r.stderr and "--help" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fake_smi, reason", [
    ('echo "No devices were found"; exit 6', "exit status 6: No devices were found"),
    ("exit 0", "exit status 0: no output"),
    pytest.param(None, "nvidia-smi is not on PATH",
                 marks=pytest.mark.skipif(not NO_NVIDIA_SMI, reason="this machine has an nvidia-smi")),
])
def test_without_a_gpu_it_stops_at_once_and_the_summary_says_so(tmp_path, fake_smi, reason):
    r, took = _device_sh(tmp_path, fake_smi=fake_smi)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NO GPU" in r.stderr and reason in r.stderr and "ALLOW_NO_GPU=1" in r.stderr, r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "NO GPU" in summary and reason in summary and "no stage ran" in summary, summary
    assert (tmp_path / "out" / "stages.tsv").read_text().splitlines() == ["stage\trc\tseconds\tcap"]
    assert took < 10, took  # no stage ran to its cap


def test_a_stage_killed_at_its_cap_says_so_in_the_summary(tmp_path):
    # ALLOW_NO_GPU runs the stages without a GPU. The tests stage's pytest is a fake that ignores SIGINT, as
    # pytest-xdist "bringing up nodes" did; capped's exec wrapper (PY -c ...) is the real Python.
    fake_py = tmp_path / "python"
    fake_py.write_text(f'#!/bin/bash\n[ "$1" = -c ] && exec "{sys.executable}" "$@"\n'
                       "echo 'bringing up nodes...'\ntrap '' INT\nsleep 30\n")
    fake_py.chmod(0o755)
    r, took = _device_sh(tmp_path, ALLOW_NO_GPU="1", STAGES="tests_model", CAP_tests_model="4", PY=str(fake_py))
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    assert (out / "stages.tsv").read_text().splitlines()[1].split("\t")[:2] == ["tests_model", "137"]
    summary = " ".join((out / "summary.md").read_text().split())
    assert "tests_model: KILLED at its cap (4s)" in summary and "no junit XML" in summary, summary
    assert "last line: bringing up nodes..." in summary, summary
    assert took < 15, took


def test_opt_in_stages_count_in_the_caps_check(tmp_path):
    r, _ = _device_sh(tmp_path, DRY_RUN="1", STAGES="bench_tp merge", CAP_bench_tp="60", CAP_merge="10")
    assert r.returncode == 0 and r.stdout.splitlines() == ["bench_tp 60", "merge 10", "total 70 of 460"], r.stdout
    r, _ = _device_sh(tmp_path, STAGES="bench_tp merge", CAP_bench_tp="60", CAP_merge="10", TOTAL_S="69")
    assert r.returncode == 2 and "sum to 70s, over TOTAL_S=69s" in r.stderr, r.stderr


def test_an_unknown_stage_is_refused(tmp_path):
    r, _ = _device_sh(tmp_path, STAGES="build tests_modle")
    assert r.returncode == 2 and "STAGES names 'tests_modle', which is no stage" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "stages.tsv").exists()


def test_the_summary_counts_the_tests_from_their_junit_xml(tmp_path):
    # The tests stage's pytest is a fake that writes a junit XML where --junitxml says, as pytest does.
    fake_py = tmp_path / "python"
    fake_py.write_text(f'#!/bin/bash\n[ "$1" = -c ] && exec "{sys.executable}" "$@"\n'
                       'while [ "$1" != --junitxml ]; do shift; done\n'
                       """echo '<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="17">"""
                       """</testsuite></testsuites>' > "$2"\necho '14 passed, 2 failed, 1 error in 9.0s'\n""")
    fake_py.chmod(0o755)
    r, _ = _device_sh(tmp_path, ALLOW_NO_GPU="1", STAGES="tests_kernels", PY=str(fake_py))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "tests_kernels: 17 tests, 2 failures, 1 errors, 3 skipped (junit). 14 passed, 2 failed" in summary, summary
