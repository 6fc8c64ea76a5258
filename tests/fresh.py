"""Running code in a new Python process: scripts and torchrun jobs (:func:`run_python`,
:func:`torchrun`), and one function of a test module (:func:`run_in_fresh_process`).

This module imports neither lavis-ext nor LAVIS, so a test module that imports only it (and
not ``conftest``) at its top can hand its own functions to a process where no patch has been
applied yet.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def run_python(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` with captured output. A run that hangs past ``timeout`` fails with the
    Python stacks of its ranks (``SIGUSR1``, see ``lavis_ext.cli``) and its output's tail."""
    process = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in child_pids(process.pid) or [process.pid]:  # torchrun's workers, or the process
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)  # the stacks end the output
        for pid in child_pids(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n--- stdout\n{stdout[-3000:]}\n"
                    f"--- stderr (with the ranks' stacks)\n{stderr[-12000:]}", pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def torchrun(args: list[str], env: dict[str, str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args],
                      env, timeout=timeout)


@dataclass(frozen=True)
class FreshRun:
    """What a function did in its own process: ``error`` is the last line of the exception it
    raised (``"AssertionError: ..."``), ``None`` when it returned."""

    error: str | None
    output: str  # stdout and stderr, for failure messages


_ERROR_MARK = "FRESH-PROCESS ERROR: "


def run_in_fresh_process(fn: Callable[[], object], env: dict[str, str], timeout: int = 120) -> FreshRun:
    """Call ``fn`` (a module-level function of a file under ``tests/``) in a new Python process
    with environment ``env``. The process imports ``fn``'s module and nothing else of the tests."""
    source = Path(sys.modules[fn.__module__].__file__).resolve()
    result = run_python([__file__, str(source), fn.__qualname__], env, timeout=timeout)
    output = f"{result.stdout}\n{result.stderr}"[-4000:]
    errors = [line[len(_ERROR_MARK):] for line in result.stderr.splitlines() if line.startswith(_ERROR_MARK)]
    if result.returncode == 0:
        return FreshRun(None, output)
    return FreshRun(errors[-1] if errors else f"exit status {result.returncode}", output)


def _main(source: str, name: str) -> int:
    sys.path.insert(0, str(TESTS))
    spec = importlib.util.spec_from_file_location(Path(source).stem, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        getattr(module, name)()
    except BaseException as e:  # noqa: BLE001  (reported to the parent, whatever it is)
        traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"{_ERROR_MARK}{message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
