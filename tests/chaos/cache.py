"""The fault campaign for the cache: kills and store faults during cache writes, damaged
entries, and two programs sharing one store and its cache.

One run (its seed picks everything)::

    generate(seed) ─▶ a DAG of 3-7 steps (thread or process), each cached or not,
                      each with a salt; 3-5 rounds, each changing some salts and
                      picking a fault:
                        none      one program runs the workflow
                        kill      the program SIGKILLs itself inside its k-th cache
                                  write, after the row is written, before the commit
                        fail      its k-th cache write fails with StoreFaultError
                        damage    before the round, bytes of a stored entry are changed
                        share     two programs run (different salts) at once on the store
                   ─▶ then one clean run of the last round's workflow, and the checks

What is checked (``INVARIANTS``):

* ``no-cache-failure``: every program not killed ends ``succeeded`` (the cache
  never fails a run: a failed or killed write, a damaged entry, a program
  writing the same entries at the same time);
* ``no-wrong-reuse``: every run's artifacts equal those of the same workflow
  run without a store (computed by every step, nothing reused);
* ``reused-from-success``: a step that reused names a run in which that step
  succeeded with the very outputs it reused;
* ``store-whole``: the store passes ``PRAGMA integrity_check`` at the end.

    python -m tests.chaos.cache --runs 30 --seed 7
    python -m tests.chaos.cache --replay 123 -v
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import stepvisor as sv

INVARIANTS: Final = ("no-cache-failure", "no-wrong-reuse", "reused-from-success", "store-whole")
FAULTS: Final = ("none", "kill", "fail", "damage", "share")
ROOT: Final = Path(__file__).resolve().parents[2]
#: A program's bound: a hang is a violation, not a stuck campaign.
PROGRAM_BOUND: Final = 120.0

#: A step: (id, the ids it needs, its salt, cached, executor).
StepSpec = tuple[str, list[str], int, bool, Literal["thread", "process"]]


def node(ctx: sv.StepContext) -> dict[str, int]:
    """A value made from the step's salt and what it sees, so a wrong reuse shows."""
    acc = int(ctx.params["salt"])
    for name in sorted(ctx.inputs):
        acc = (acc * 31 + int(ctx.inputs[name])) % 1_000_003
    return {ctx.step_id: acc}


def workflow(spec: Sequence[StepSpec]) -> sv.Workflow:
    return sv.Workflow(
        "chaos-cache",
        [
            sv.Step(sid, node, needs=needs, params={"salt": salt}, cache=cached, executor=ex)
            for sid, needs, salt, cached, ex in spec
        ],
    )


def reference(spec: Sequence[StepSpec]) -> dict[str, int]:
    """The artifacts computed by every step: no store, no cache."""
    uncached: list[StepSpec] = [
        (sid, needs, salt, False, "thread") for sid, needs, salt, *_ in spec
    ]
    result = sv.run(workflow(uncached))
    assert result.status == "succeeded", result.error
    return dict(result.artifacts)


# -- the program ----------------------------------------------------------------------------------


def drive(spec_file: Path, store: Path, *, kill_at: int, fail_at: int) -> int:
    """Run the workflow in ``spec_file`` on ``store``, faulting the cache's k-th write.

    Prints ``{"run_id", "status"}``; SIGKILLs itself inside write ``kill_at``.
    """
    from stepvisor.errors import StoreFaultError  # noqa: PLC0415
    from stepvisor.store.sqlite import _cache  # noqa: PLC0415

    original = _cache.CacheTable.cache_put
    writes = 0

    def faulty_put(self: Any, entry: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == kill_at:
            with self._transaction("write to the cache of", entry.run_id, write=True) as conn:
                row, payload = _cache.entry_rows(entry)
                conn.execute(_cache.PUT, row)
                conn.execute(_cache.PUT_PAYLOAD, payload)
                os.kill(os.getpid(), signal.SIGKILL)  # mid-transaction: never committed
        if writes == fail_at:
            raise StoreFaultError(
                f"injected: the disk is full writing {store}", path=str(store), fault="disk full"
            )
        original(self, entry)

    _cache.CacheTable.cache_put = faulty_put  # type: ignore[method-assign]
    spec: Any = [tuple(s) for s in json.loads(spec_file.read_text())]
    result = sv.run(workflow(spec), store=str(store))
    print(json.dumps({"run_id": result.run_id, "status": str(result.status)}), flush=True)
    return 0


def _start(spec: Sequence[StepSpec], store: Path, workdir: Path, *, kill_at: int = 0,
           fail_at: int = 0) -> subprocess.Popen[str]:  # fmt: skip
    spec_file = workdir / f"spec-{secrets.token_hex(4)}.json"
    spec_file.write_text(json.dumps(list(spec)))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.cache", "--drive", str(spec_file), "--store",
         str(store), "--kill-at", str(kill_at), "--fail-at", str(fail_at)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    faults: Counter[str] = field(default_factory=Counter)
    reused: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    programs: int = 0
    killed: int = 0
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        return (
            f"seed {self.seed}: {self.programs} programs ({self.killed} killed), faults {faults}; "
            f"{self.reused} steps reused; {len(self.violations)} violations"
        )


def generate(seed: int) -> tuple[list[StepSpec], list[tuple[str, list[StepSpec], list[StepSpec]]]]:
    """The first workflow and the rounds: (fault, spec, the other program's spec)."""
    rng = random.Random(seed)
    spec: list[StepSpec] = []
    for i in range(rng.randint(3, 7)):
        needs = sorted(rng.sample([s[0] for s in spec], k=min(len(spec), rng.randint(0, 2))))
        executor: Literal["thread", "process"] = "process" if rng.random() < 0.25 else "thread"
        spec.append((f"s{i}", needs, rng.randint(0, 3), rng.random() < 0.8, executor))

    def mutate(base: list[StepSpec]) -> list[StepSpec]:
        return [
            (sid, needs, rng.randint(0, 3) if rng.random() < 0.3 else salt, cached, ex)
            for sid, needs, salt, cached, ex in base
        ]

    rounds = []
    current = spec
    for _ in range(rng.randint(3, 5)):
        current = mutate(current)
        rounds.append((rng.choice(FAULTS), current, mutate(current)))
    return spec, rounds


def _damage(store: Path, rng: random.Random) -> bool:
    """Change bytes of a random entry's payload (or its parts) in place; False if none."""
    with sqlite3.connect(store) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM cache_payloads ORDER BY key")]
        if not keys:
            return False
        key = rng.choice(keys)
        (payload,) = conn.execute(
            "SELECT payload FROM cache_payloads WHERE key = ?", (key,)
        ).fetchone()
        data = bytearray(payload)
        at = rng.randrange(len(data))
        data[at] ^= 0xFF
        conn.execute("UPDATE cache_payloads SET payload = ? WHERE key = ?", (bytes(data), key))
    conn.close()
    return True


def run_one(seed: int, workdir: Path) -> Report:
    report = Report(seed)
    rng = random.Random(seed ^ 0x5EED)
    here = workdir / f"run-{seed}"
    here.mkdir()
    store = here / "runs.db"
    first, rounds = generate(seed)
    finished: list[tuple[str, list[StepSpec]]] = []  # (run id, its spec) of runs that ended

    def collect(proc: subprocess.Popen[str], spec: list[StepSpec], *, may_die: bool) -> None:
        try:
            out, err = proc.communicate(timeout=PROGRAM_BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            report.violations.append(f"no-cache-failure: a program hung past {PROGRAM_BOUND} s")
            return
        report.programs += 1
        if proc.returncode == -signal.SIGKILL and may_die:
            report.killed += 1
            return
        if proc.returncode != 0 or not out.strip():
            report.violations.append(
                f"no-cache-failure: program exit {proc.returncode}: {err[-500:]}"
            )
            return
        told = json.loads(out.strip().splitlines()[-1])
        if told["status"] != "succeeded":
            report.violations.append(f"no-cache-failure: run {told['run_id']} {told['status']}")
        finished.append((told["run_id"], spec))

    collect(_start(first, store, here), first, may_die=False)
    for fault, spec, other in rounds:
        report.faults[fault] += 1
        if fault == "damage":
            _damage(store, rng)
        if fault == "share":
            procs = [_start(spec, store, here), _start(other, store, here)]
            for proc, s in zip(procs, (spec, other), strict=True):
                collect(proc, s, may_die=False)
            continue
        k = rng.randint(1, 2)  # a later write may never come: most steps are reused
        proc = _start(spec, store, here, kill_at=k if fault == "kill" else 0,
                      fail_at=k if fault == "fail" else 0)  # fmt: skip
        collect(proc, spec, may_die=fault == "kill")
    final = sv.run(workflow(rounds[-1][1]), store=str(store))
    if final.status != "succeeded":
        report.violations.append(f"no-cache-failure: the clean run {final.status}: {final.error}")
    finished.append((final.run_id, rounds[-1][1]))
    _check(store, finished, report)
    shutil.rmtree(here, ignore_errors=True)
    return report


def _check(store: Path, finished: list[tuple[str, list[StepSpec]]], report: Report) -> None:
    refs: dict[str, dict[str, int]] = {}
    with sv.SQLiteStore(store) as kept:
        for run_id, spec in finished:
            key = json.dumps(spec)
            if key not in refs:
                refs[key] = reference(spec)
            stored = kept.load(run_id)
            artifacts = {k: v for outs in stored.outputs.values() for k, v in outs.items()}
            if artifacts != refs[key]:
                report.violations.append(
                    f"no-wrong-reuse: run {run_id} made {artifacts}, not {refs[key]}"
                )
            for sid, record in stored.steps.items():
                if record.cache_note is not None:
                    report.notes[record.cache_note.split(" run ")[0].split(" of ")[0]] += 1
                if record.reused_from is None:
                    continue
                report.reused += 1
                source = kept.load(record.reused_from)
                was = source.steps.get(sid)
                if was is None or was.status != "succeeded":
                    report.violations.append(
                        f"reused-from-success: {run_id}/{sid} reused {record.reused_from}, "
                        f"where it is {None if was is None else was.status.value}"
                    )
                elif source.outputs.get(sid) != stored.outputs.get(sid):
                    report.violations.append(
                        f"reused-from-success: {run_id}/{sid} outputs differ from "
                        f"{record.reused_from}'s"
                    )
    with sqlite3.connect(store) as conn:
        (verdict,) = conn.execute("PRAGMA integrity_check").fetchone()
    conn.close()
    if verdict != "ok":
        report.violations.append(f"store-whole: integrity_check says {verdict}")


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.cache", description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--replay", type=int, action="append", default=None, metavar="SEED")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--drive", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fail-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive is not None:
        return drive(args.drive, args.store, kill_at=args.kill_at, fail_at=args.fail_at)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    seeds = args.replay or [rng.getrandbits(40) for _ in range(args.runs)]
    print(f"stepvisor cache chaos: campaign seed {seed}, {len(seeds)} runs", flush=True)
    started = time.monotonic()
    total = Report(seed)
    workdir = Path(tempfile.mkdtemp(prefix="stepvisor-chaos-cache-"))
    try:
        for run_seed in seeds:
            report = run_one(run_seed, workdir)
            if args.verbose or report.violations:
                print(report.line(), flush=True)
                for violation in report.violations:
                    print(f"  VIOLATION {violation}", flush=True)
            total.faults.update(report.faults)
            total.notes.update(report.notes)
            total.reused += report.reused
            total.programs += report.programs
            total.killed += report.killed
            total.violations += report.violations
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    faults = ", ".join(f"{k} {v}" for k, v in sorted(total.faults.items()))
    notes = ", ".join(f"{k!r} {v}" for k, v in total.notes.most_common())
    print(
        f"{len(seeds)} runs, {total.programs} programs ({total.killed} killed mid cache write) "
        f"in {time.monotonic() - started:.0f} s\nfaults: {faults}\nnotes: {notes}\n"
        f"steps reused: {total.reused}\ninvariants: {', '.join(INVARIANTS)}\n"
        f"violations: {len(total.violations)}",
        flush=True,
    )
    return 1 if total.violations else 0


if __name__ == "__main__":
    sys.exit(main())
