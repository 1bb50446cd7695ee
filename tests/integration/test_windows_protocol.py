"""The external-command protocol with real processes: what a command receives, and every way it can fail."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from parity.workflow import runner

from .test_windows_html import EXAMPLES

CONFIG = """
[run]
steps = {steps}
window = 6

[input]
program = ["push 1", "push 2", "add", "store a", "push 0", "jnz 0", "jmp 0"]

[[implementation]]
name = "vm-ref"
role = "reference"
kind = "command"
options = {{ command = ["{python}", "{stackvm}", "--impl", "ref"] }}

[[implementation]]
name = "vm-port"
role = "alternate"
kind = "command"
options = {{ command = ["{python}", "{stackvm}", "--impl", "port"] }}

[[implementation]]
name = "odd"
role = "alternate"
kind = "command"
options = {{ command = ["{python}", "{script}"], timeout = {timeout}, params = {{ answer = 42 }}, env = {{ ODD_MODE = "on" }} }}
"""

SCRIPTS = {
    "echo": """
        import json, os, sys
        request = json.load(sys.stdin)
        seen = {"argv": sys.argv[1:], "request": request,
                "env": {k: v for k, v in os.environ.items() if k.startswith(("PARITY_", "ODD_"))}, "cwd": os.getcwd()}
        with open(os.path.join(os.environ["PARITY_SCRATCH_DIR"], "seen.json"), "w") as f:
            json.dump(seen, f)
        import io, runpy
        sys.argv = [STACKVM, "--impl", "port", *sys.argv[1:]]
        sys.stdin = io.StringIO(json.dumps(request))
        runpy.run_path(STACKVM, run_name="__main__")
    """,
    "sleepy": """
        import os, sys, time
        open(os.path.join(os.environ["PARITY_SCRATCH_DIR"], "pid"), "w").write(str(os.getpid()))
        time.sleep(60)
    """,
    "crash": """
        import sys
        print("loading the emulator", file=sys.stderr)
        print("boom: unknown opcode 0x17", file=sys.stderr)
        sys.exit(3)
    """,
    "segv": """
        import os, signal
        os.kill(os.getpid(), signal.SIGSEGV)
    """,
    "garbage": """
        print('{"step": 0, "pc": 1}')
        print("pc=2 sp=0")
    """,
    "skip": """
        print('{"step": 0}')
        print('{"step": 2}')
    """,
    "short": """
        import json, sys, runpy, io
        sys.argv = [STACKVM, "--impl", "port", *sys.argv[1:]]
        buf = io.StringIO()
        real, sys.stdout = sys.stdout, buf
        try:
            runpy.run_path(STACKVM, run_name="__main__")
        except SystemExit:
            pass
        sys.stdout = real
        print("\\n".join(buf.getvalue().splitlines()[:-1]))
    """,
}


def setup(tmp_path: Path, script: str, *, timeout: float = 30, steps: int = 6) -> Path:
    body = f"STACKVM = {str(EXAMPLES / 'stackvm.py')!r}\n" + textwrap.dedent(SCRIPTS[script])
    (tmp_path / f"{script}.py").write_text(body, encoding="utf-8")
    cfg = tmp_path / "impls.toml"
    cfg.write_text(
        CONFIG.format(
            steps=steps,
            python="{python}",
            stackvm=EXAMPLES / "stackvm.py",
            script=tmp_path / f"{script}.py",
            timeout=timeout,
        ),
        encoding="utf-8",
    )
    return cfg


def run(cfg: Path, tmp_path: Path) -> runner.Outcome:
    return runner.execute(runner.Request("run", cfg, tmp_path / "run", quiet=True))


def odd(out: runner.Outcome, window: int = 0) -> dict[str, object]:
    p: dict[str, object] = out.state["windows"][window]["attempts"][-1]["participants"]["odd"]
    return p


def test_what_a_command_receives(tmp_path: Path) -> None:
    out = run(setup(tmp_path, "echo", steps=12), tmp_path)
    assert out.code == 0 and odd(out, 1)["result"] == "match"
    seen = json.loads((tmp_path / "run" / "scratch" / "odd" / "seen.json").read_text())
    assert seen["argv"] == ["--start", "6", "--count", "6"]
    req = seen["request"]
    assert (req["protocol"], req["implementation"], req["role"], req["start"], req["count"], req["end"]) == (
        1,
        "odd",
        "alternate",
        6,
        6,
        12,
    )
    assert req["input"]["program"][0] == "push 1" and req["tokens"] == [] and req["params"] == {"answer": 42}
    env = seen["env"]
    assert env["PARITY_WINDOW_START"] == "6" and env["PARITY_WINDOW_COUNT"] == "6" and env["PARITY_WINDOW_END"] == "12"
    assert env["PARITY_IMPL"] == "odd" and env["PARITY_ROLE"] == "alternate" and env["PARITY_PROTOCOL"] == "1"
    assert env["PARITY_SCRATCH_DIR"].endswith("scratch/odd") and env["ODD_MODE"] == "on"
    assert seen["cwd"] == str(tmp_path)  # commands run in the implementations file's directory
    assert (tmp_path / "run" / "traces" / "w000006" / "a1" / "odd.stderr").is_file()


def test_timeout_kills_the_command_and_it_does_not_take_part(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = run(setup(tmp_path, "sleepy", timeout=1), tmp_path)
    assert time.monotonic() - t0 < 30
    assert out.code == 0  # vm-port verified the window; odd is recorded as not taking part
    assert odd(out)["status"] == "unavailable" and "timed out after 1 s on window [0, 6) (killed)" in str(
        odd(out)["reason"]
    )
    pid = int((tmp_path / "run" / "scratch" / "odd" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("crash", "odd exited with code 3 on window [0, 6); stderr: loading the emulator | boom: unknown opcode 0x17"),
        ("segv", "odd was killed by SIGSEGV on window [0, 6)"),
        ("garbage", "protocol error on window [0, 6): stdout line 2 is not JSON"),
        ("skip", "protocol error on window [0, 6): stdout line 2 has step 2, expected 1"),
    ],
)
def test_failures_are_recorded_as_unavailable(tmp_path: Path, script: str, reason: str) -> None:
    out = run(setup(tmp_path, script), tmp_path)
    assert odd(out)["status"] == "unavailable" and reason in str(odd(out)["reason"])
    assert out.state["windows"][0]["status"] == "verified"  # vm-port still checked the window


def test_fewer_steps_than_asked_is_a_divergence(tmp_path: Path) -> None:
    out = run(setup(tmp_path, "short"), tmp_path)
    assert out.code == 1 and odd(out)["result"] == "diverged" and odd(out)["steps"] == 5
    (div,) = out.state["divergences"]
    assert div["fields"] == ["<steps>"] and div["diverging"] == ["odd"] and div["matching"] == ["vm-port"]


def test_a_missing_program_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    cfg = setup(tmp_path, "crash")
    cfg.write_text(
        cfg.read_text().replace(
            'command = ["{python}", "' + str(tmp_path / "crash.py") + '"]', 'command = ["/no/such/engine"]'
        )
    )
    out = run(cfg, tmp_path)
    assert "cannot start '/no/such/engine'" in str(odd(out)["reason"])
    assert out.state["windows"][0]["status"] == "verified"  # the harness itself kept going


def test_the_documented_minimal_command_speaks_the_protocol(tmp_path: Path) -> None:
    doc = (EXAMPLES.parents[1] / "README.md").read_text(encoding="utf-8")
    after = doc[doc.index("The smallest command that speaks the protocol") :]
    code = after[after.index("```python\n") + len("```python\n") : after.index("```\n", after.index("```python"))]
    (tmp_path / "minimal.py").write_text(code, encoding="utf-8")
    cfg = tmp_path / "minimal.toml"
    cfg.write_text(
        "[run]\nsteps = 12\n\n"
        + "".join(
            f'[[implementation]]\nname = "{n}"\nrole = "{r}"\nkind = "command"\n'
            f'options = {{ command = ["{{python}}", "minimal.py"] }}\n\n'
            for n, r in (("one", "reference"), ("two", "alternate"))
        ),
        encoding="utf-8",
    )
    out = run(cfg, tmp_path)
    assert out.code == 0 and out.headline == "No divergences found, verified through step 11."
