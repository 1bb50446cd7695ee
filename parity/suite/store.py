"""The out directory of a suite run: what is done, persisted so that a kill loses at most the items in flight.

    OUT/manifest.json        the suite: its key, input, both sides, scoring mode, shard, every item's id and length
    OUT/sides.json           each side's Implementation.describe() (written once, when the first item returns)
    OUT/items/NNNNNN.npz     an item's per-position statistics (parity.suite.stats.PositionStats.to_bytes)
    OUT/items/NNNNNN.json    its record (id, tokens, seconds, error); written AFTER the npz: it marks the item done
    OUT/progress.jsonl       one line per run start, item start and item done (what ran when; appended)
    OUT/floor.json           the reference's own variation of a calibrated run (parity.suite.calibrate)
    OUT/suite.json           the receipt (parity/schema/suite.schema.json), rewritten at the end of each run

Every file is written by the one atomic writer (parity.core.fs: temp file, fsync, rename), and only by the
coordinating process, which holds OUT/.lock while it runs. After a SIGKILL an item is either done (both files,
complete) or not; `--resume` computes exactly the items without a record (an item that failed is not done:
a resume retries it). The manifest's `suite_key` (items' tokens, both sides' specs, models and parameters,
scoring mode) must match to resume into, or merge, a directory: a different suite is refused (exit 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_bytes, atomic_write_json, file_lock
from parity.errors import UsageError
from parity.suite import stats
from parity.suite.inputs import Item

MANIFEST = "manifest.json"
SIDES = "sides.json"
ITEMS = "items"
PROGRESS = "progress.jsonl"
RECEIPT = "suite.json"
MANIFEST_KIND = "parity-suite-manifest"


def suite_key(items: Sequence[Item], sides: dict[str, Any], mode: str) -> str:
    """SHA-256 of everything that decides the numbers: every item's tokens, both sides, the scoring mode."""
    h = hashlib.sha256()
    h.update(json.dumps({"sides": sides, "mode": mode}, sort_keys=True).encode())
    for it in items:
        h.update(f"\n{it.index}:{it.id}:".encode())
        h.update(",".join(map(str, it.tokens)).encode())
    return h.hexdigest()


def in_shard(index: int, shard: tuple[int, int] | None) -> bool:
    """Shard K/N (1-based K) holds the items whose index is K-1 modulo N."""
    return shard is None or index % shard[1] == shard[0] - 1


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """The out directory's writer lock (held from before the manifest is read): a second run into the same
    directory waits a few seconds, then stops naming the lock file."""
    with file_lock(root / ".lock", what=f"suite out directory {root}", timeout=5.0):
        yield


class Store:
    """One out directory, opened for writing (`create` or `resume`) or for reading (`open_read`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.items_dir = root / ITEMS

    @property
    def key(self) -> str:
        return str(self.manifest["suite_key"])

    @staticmethod
    def read_manifest(root: Path) -> dict[str, Any] | None:
        path = root / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path} is unreadable ({exc})", fix="use another --out-dir, or delete this one") from exc
        if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
            raise UsageError(f"{path} is not a parity suite manifest", fix="use another --out-dir")
        return data

    @classmethod
    def open_write(cls, root: Path, manifest: dict[str, Any], resume: bool) -> Store:
        """Create the directory's manifest, or (resume) check that it is this suite's; exit 2 otherwise."""
        old = cls.read_manifest(root)
        if old is not None:
            if old.get("suite_key") != manifest["suite_key"]:
                raise UsageError(
                    f"{root} holds another suite (other items, sides, models, threads or scoring mode)",
                    fix="use another --out-dir (or delete this one)",
                )
            if old.get("shard") != manifest["shard"]:
                raise UsageError(
                    f"{root} holds shard {old.get('shard')}, this run is shard {manifest['shard']}",
                    fix="give each shard its own --out-dir",
                )
            store = cls(root, old)
            done = store.done()
            if done and not resume:
                raise UsageError(
                    f"{root} already holds {len(done)} finished item(s) of this suite",
                    fix="pass --resume to compute only what is missing, or use another --out-dir",
                )
            return store
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open_read(cls, root: Path) -> Store:
        manifest = cls.read_manifest(root)
        if manifest is None:
            raise UsageError(
                f"{root} is not a parity suite out directory (no {MANIFEST})", fix="pass a --out-dir of `parity suite`"
            )
        return cls(root, manifest)

    # ---------------------------------------------------------------------------------------------- items

    def _paths(self, index: int) -> tuple[Path, Path]:
        base = self.items_dir / f"{index:06d}"
        return base.with_suffix(".npz"), base.with_suffix(".json")

    def done(self) -> dict[int, dict[str, Any]]:
        """Records of the finished items, by index (a torn or foreign record is not done)."""
        out: dict[int, dict[str, Any]] = {}
        if not self.items_dir.is_dir():
            return out
        for path in sorted(self.items_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(rec, dict) and rec.get("suite_key") == self.key and self._paths(rec["index"])[0].is_file():
                out[int(rec["index"])] = rec
        return out

    def save(
        self,
        index: int,
        item_id: str,
        n_tokens: int,
        values: stats.PositionStats,
        seconds: float,
        evidence: dict[str, Any] | None = None,
    ) -> None:
        """Persist a finished item: statistics first, then the record that marks it done (with the calibrated
        verdict's per-position `evidence`, parity.suite.verdicts.evidence, when the run computed it)."""
        npz, rec = self._paths(index)
        atomic_write_bytes(npz, values.to_bytes())
        record = {"index": index, "id": item_id, "n_tokens": n_tokens, "n_scored": len(values), "seconds": seconds}
        if evidence is not None:
            record["evidence"] = evidence
        atomic_write_json(rec, {**record, "suite_key": self.key})

    def load_values(self, index: int) -> stats.PositionStats:
        return stats.load(self._paths(index)[0])

    def save_sides(self, described: dict[str, Any]) -> None:
        if not (self.root / SIDES).is_file():
            atomic_write_json(self.root / SIDES, described)

    def sides(self) -> dict[str, Any] | None:
        path = self.root / SIDES
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return data
        except (OSError, json.JSONDecodeError):
            return None

    # -------------------------------------------------------------------------------------------- progress

    def progress(self, event: str, **fields: Any) -> None:
        """Append one line to progress.jsonl (a kill may tear the last line; readers skip it)."""
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields}) + "\n"
        fd = os.open(self.root / PROGRESS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_progress(root: Path) -> list[dict[str, Any]]:
    """The events of progress.jsonl (torn lines skipped)."""
    out: list[dict[str, Any]] = []
    path = root / PROGRESS
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out
