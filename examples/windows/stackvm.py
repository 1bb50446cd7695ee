#!/usr/bin/env python3
"""A tiny stack machine in two implementations, speaking parity's windows protocol (README.md, section Stepwise parity).

`--impl ref` is a plain interpreter over instruction strings (the "C reference emulator" of the story);
`--impl port` is a table-driven rewrite with pre-decoded instructions and registers in a list (the "port").
Both must produce identical step records:

    {"step": n, "pc": pc, "op": "add", "stack": [...], "registers": {"a": .., "b": .., "i": ..},
     "memory_digest": "<sha256 of the 16 memory cells>", "halted": false}

describing the machine AFTER executing step n (the instruction at `pc`). A window [start, start + count)
replays steps 0..start-1 silently (microseconds here; a slow emulator would checkpoint in
$PARITY_SCRATCH_DIR) and prints the window's records, one JSON object per line.

Arithmetic is modulo 2**16. Instructions: push N, load R, store R, add, sub, mul, dup, swap, pop,
mstore (pops address, then value), mload (pops address), jmp A, jnz A (pops; jumps if non-zero), halt.

A deliberate bug for demonstrations and tests: params `bug_step` / `bug_field` (a dotted field such as
`registers.b`) make the emitted record of that one step differ by +1 in that one field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

MASK = 0xFFFF
REGISTERS = ("a", "b", "i")
MEMORY_CELLS = 16


def digest(memory: list[int]) -> str:
    return hashlib.sha256(b"".join(v.to_bytes(2, "little") for v in memory)).hexdigest()


class RefMachine:
    """The reference: decode each instruction string as it executes it."""

    def __init__(self, program: list[str]) -> None:
        self.program = program
        self.pc = 0
        self.stack: list[int] = []
        self.regs = dict.fromkeys(REGISTERS, 0)
        self.memory = [0] * MEMORY_CELLS
        self.halted = False

    def step(self) -> tuple[int, str]:
        pc = self.pc
        if self.halted or pc >= len(self.program):
            self.halted = True
            return pc, "halt"
        parts = self.program[pc].split()
        op, arg = parts[0], (parts[1] if len(parts) > 1 else None)
        self.pc = pc + 1
        if op == "push":
            self.stack.append(int(arg or 0) & MASK)
        elif op == "load":
            self.stack.append(self.regs[arg or ""])
        elif op == "store":
            self.regs[arg or ""] = self.stack.pop()
        elif op in ("add", "sub", "mul"):
            b, a = self.stack.pop(), self.stack.pop()
            self.stack.append((a + b if op == "add" else a - b if op == "sub" else a * b) & MASK)
        elif op == "dup":
            self.stack.append(self.stack[-1])
        elif op == "swap":
            self.stack[-1], self.stack[-2] = self.stack[-2], self.stack[-1]
        elif op == "pop":
            self.stack.pop()
        elif op == "mstore":
            addr = self.stack.pop()
            self.memory[addr % MEMORY_CELLS] = self.stack.pop()
        elif op == "mload":
            self.stack.append(self.memory[self.stack.pop() % MEMORY_CELLS])
        elif op == "jmp":
            self.pc = int(arg or 0)
        elif op == "jnz":
            if self.stack.pop():
                self.pc = int(arg or 0)
        elif op == "halt":
            self.halted = True
            self.pc = pc
        else:
            raise SystemExit(f"stackvm: unknown instruction {self.program[pc]!r} at {pc}")
        return pc, op

    def record(self, step: int, pc: int, op: str) -> dict[str, Any]:
        return {
            "step": step,
            "pc": pc,
            "op": op,
            "stack": list(self.stack),
            "registers": dict(self.regs),
            "memory_digest": digest(self.memory),
            "halted": self.halted,
        }


class PortMachine:
    """The port: instructions decoded once into (handler, argument) pairs, registers in a list."""

    def __init__(self, program: list[str]) -> None:
        self.code = [self._decode(line) for line in program]
        self.names = [line.split()[0] for line in program]
        self.pc = 0
        self.stack: list[int] = []
        self.regs = [0] * len(REGISTERS)
        self.memory = [0] * MEMORY_CELLS
        self.halted = False

    def _decode(self, line: str) -> tuple[Any, int]:
        op, *rest = line.split()
        table = {
            "push": (self._push, 0),
            "load": (self._load, 0),
            "store": (self._store, 0),
            "add": (self._arith, 0),
            "sub": (self._arith, 1),
            "mul": (self._arith, 2),
            "dup": (self._dup, 0),
            "swap": (self._swap, 0),
            "pop": (self._pop, 0),
            "mstore": (self._mstore, 0),
            "mload": (self._mload, 0),
            "jmp": (self._jmp, 0),
            "jnz": (self._jnz, 0),
            "halt": (self._halt, 0),
        }
        if op not in table:
            raise SystemExit(f"stackvm: unknown instruction {line!r}")
        fn, variant = table[op]
        arg = REGISTERS.index(rest[0]) if op in ("load", "store") else int(rest[0]) if rest else variant
        return fn, arg

    def _push(self, v: int) -> None:
        self.stack.append(v & MASK)

    def _load(self, r: int) -> None:
        self.stack.append(self.regs[r])

    def _store(self, r: int) -> None:
        self.regs[r] = self.stack.pop()

    def _arith(self, kind: int) -> None:
        b = self.stack.pop()
        a = self.stack.pop()
        self.stack.append((a + b, a - b, a * b)[kind] & MASK)

    def _dup(self, _: int) -> None:
        self.stack.append(self.stack[-1])

    def _swap(self, _: int) -> None:
        self.stack[-2:] = self.stack[-1:-3:-1]

    def _pop(self, _: int) -> None:
        del self.stack[-1]

    def _mstore(self, _: int) -> None:
        addr = self.stack.pop() % MEMORY_CELLS
        self.memory[addr] = self.stack.pop()

    def _mload(self, _: int) -> None:
        self.stack.append(self.memory[self.stack.pop() % MEMORY_CELLS])

    def _jmp(self, target: int) -> None:
        self.pc = target

    def _jnz(self, target: int) -> None:
        if self.stack.pop() != 0:
            self.pc = target

    def _halt(self, _: int) -> None:
        self.halted = True
        self.pc -= 1

    def step(self) -> tuple[int, str]:
        pc = self.pc
        if self.halted or pc >= len(self.code):
            self.halted = True
            return pc, "halt"
        fn, arg = self.code[pc]
        self.pc += 1
        fn(arg)
        return pc, self.names[pc]

    def record(self, step: int, pc: int, op: str) -> dict[str, Any]:
        return {
            "step": step,
            "pc": pc,
            "op": op,
            "stack": self.stack[:],
            "registers": {name: self.regs[k] for k, name in enumerate(REGISTERS)},
            "memory_digest": digest(self.memory),
            "halted": self.halted,
        }


def inject(record: dict[str, Any], dotted: str) -> None:
    """The deliberate bug: +1 on one (numeric) field of one record."""
    *parents, leaf = dotted.split(".")
    target = record
    for p in parents:
        target = target[p]
    target[leaf] = target[leaf] + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", choices=("ref", "port"), required=True)
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    request = json.load(sys.stdin)
    program = request["input"]["program"]
    params = request.get("params", {})
    machine = RefMachine(program) if args.impl == "ref" else PortMachine(program)
    for _ in range(args.start):
        machine.step()
    for n in range(args.start, args.start + args.count):
        pc, op = machine.step()
        rec = machine.record(n, pc, op)
        if params.get("bug_step") == n:
            inject(rec, str(params.get("bug_field", "registers.a")))
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
