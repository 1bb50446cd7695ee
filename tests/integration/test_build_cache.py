"""Two processes (two clones, a CI job beside a developer) building the same cache entry at once: one builds, the
other waits on the cache's lock and then finds the entry complete. CMake and scikit-build-core are replaced by
fakes that hold the lock until both processes are up, so this costs about five seconds; the real build is tests/integration/test_setup_cpp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from parity.backends import build, lock

    log = Path(sys.argv[1])
    src = Path(sys.argv[2])

    def build_lib(spec, p, src, *, verbose, jobs, into):
        with log.open("a") as f:
            f.write(f"lib {into}\\n")
        deadline = time.time() + 60
        while len(list(log.parent.glob("ready-*"))) < 2 and time.time() < deadline:
            time.sleep(0.05)  # the other builder is about to ask for the lock...
        time.sleep(3.0)  # ...and waits on it (it says so after 1 s)
        (into / "prefix" / "include").mkdir(parents=True)
        (into / "prefix" / "include" / "llama.h").write_text("// llama.h")
        (into / "build").mkdir()
        (into / "lib.json").write_text("{}")
        return 1.0

    def build_bridge(p, *, verbose):
        with log.open("a") as f:
            f.write(f"bridge {p.bridge_dir}\\n")
        p.bridge_path.write_bytes(b"\\x7fELF")

    lock.acquire = lambda spec, override, verbose=False: lock.SourceTree(src, "fake", "c0ffee", "fp")
    build._build_lib, build._build_bridge = build_lib, build_bridge
    (log.parent / f"ready-{os.getpid()}").touch()
    print(build.ensure_built(lock.get_spec("llama")).bridge_path)
    """
)


def test_two_builders_of_one_key_build_it_once(tmp_path: Path) -> None:
    log, src = tmp_path / "builds.log", tmp_path / "src"
    src.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PARITY_LLAMA_SRC"}
    env["PARITY_CACHE"] = str(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(log), str(src)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == b"\x7fELF"
    built = log.read_text().splitlines()
    assert [line.split()[0] for line in built] == ["lib", "bridge"], built  # once, by one of them
    assert all(line.split()[1].endswith(".partial") for line in built)  # built aside, published by a rename
    waited = [err for _, err in results if "waiting for another parity process" in err]
    assert len(waited) == 1, results
    assert not list((tmp_path / "cache").glob("*.partial"))
