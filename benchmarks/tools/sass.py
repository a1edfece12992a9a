"""Reading sm_90 machine code: instructions, their scoreboard bits, loops, and round trips.

A Hopper SASS instruction is 128 bits. Bits 105 to 125 are its scheduling control:
``stall[4] yield[1] write-barrier[3] read-barrier[3] wait-mask[6] reuse[4]``. An instruction
of variable latency (a global load, a shared-memory load, a conversion) names one of six
scoreboards (barrier 7 is none) that it releases when its result is written; a later
instruction that needs the result names that scoreboard in its wait mask, and the warp
stalls there until every op counted on it is done. ``DEPBAR.LE SBk, n`` waits until at most
``n`` ops are still counted on scoreboard ``k``.

So the waits, not the order of the instructions, say how many DRAM round trips a loop
iteration costs: :func:`simulate` issues the instructions in order, gives every global load
one unit of latency and everything else none, and counts the units that pass. A loop whose
next ids are loaded while the current rows are in flight costs one unit per iteration; one
whose every id must come back before its row load can issue costs two per unrolled step.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from typing import Dict, List, Optional, Sequence, Set, Tuple

NO_BARRIER = 7

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_HIGH = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_REGISTER = re.compile(r"(?<![\w.])R(\d+)(\.64)?\b")
_PREDICATE = re.compile(r"!?P(T|\d)")
# ops with no destination register: every register they name is read
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3",
            "DEPBAR", "WARPSYNC", "BSYNC", "BSSY", "RET", "CALL", "NOP", "MEMBAR", "ERRBAR", "CCTL", "YIELD")


@dataclasses.dataclass
class Instruction:
    address: int
    predicate: str  # "@P0", "@!P1", or ""
    opcode: str  # with modifiers: "LDG.E.128"
    operands: List[str]
    stall: int
    write_barrier: int  # the scoreboard this op releases when its result is written (7: none)
    read_barrier: int  # the scoreboard it releases once its source registers are read (7: none)
    wait_mask: int  # scoreboards waited on before it issues (bit i: scoreboard i)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def is_global_load(self) -> bool:
        return self.base in ("LDG", "LD")

    @property
    def load_bytes(self) -> int:
        """Bytes per thread of a load: LDG.E.128 is a 16-byte vector, LDG.E 4, LDG.E.U16 2."""
        mods = self.opcode.split(".")[1:]
        for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if mod in mods:
                return size
        return 4

    def branch_target(self) -> Optional[int]:
        if self.base != "BRA":
            return None
        match = re.search(r"0x([0-9a-f]+)", self.operands[-1] if self.operands else "")
        return int(match.group(1), 16) if match else None

    def registers(self) -> Tuple[Set[int], Set[int]]:
        """(written, read) general registers, widened by the op's vector width where it shows."""
        written: Set[int] = set()
        read: Set[int] = set()
        width = max(1, self.load_bytes // 4)
        # a predicate written first (SHFL.BFLY PT, R36, ...; ATOMG PT, R5, ...): the register written is next
        dest = 1 if self.operands and _PREDICATE.fullmatch(self.operands[0]) and self.base not in _NO_DEST else 0
        for i, operand in enumerate(self.operands):
            for match in _REGISTER.finditer(operand):
                first = int(match.group(1))
                if first == 255:  # RZ is spelt RZ; R255 never appears, but be safe
                    continue
                count = 2 if match.group(2) else 1
                if i == dest and self.base not in _NO_DEST and "[" not in operand:
                    if self.base in ("LDG", "LD", "LDS", "LDC"):
                        count = max(count, width)
                    elif ".WIDE" in self.opcode:
                        count = 2
                    written.update(range(first, first + count))
                else:
                    if self.base in ("STG", "ST", "STS") and "[" not in operand:
                        count = max(count, width)  # the data operand of a vector store
                    read.update(range(first, first + count))
        return written, read


def parse(sass: str) -> Dict[str, List[Instruction]]:
    """``cuobjdump -sass`` text -> instructions per function."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    pending: Optional[Tuple[int, str, int]] = None
    for line in sass.splitlines():
        name = re.match(r"\s*Function : (\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        match = _LINE.search(line)
        if match:
            pending = (int(match.group(1), 16), match.group(2), int(match.group(3), 16))
            continue
        high = _HIGH.match(line)
        if high and pending is not None and current is not None:
            address, text, low = pending
            current.append(_instruction(address, text, int(high.group(1), 16)))
            pending = None
    return functions


def _instruction(address: int, text: str, high: int) -> Instruction:
    control = (high >> 41) & 0x1FFFFF
    predicate = ""
    if text.startswith("@"):
        predicate, text = text.split(None, 1)
    opcode, _, rest = text.partition(" ")
    operands = [op.strip() for op in _split_operands(rest)] if rest.strip() else []
    return Instruction(address, predicate, opcode, operands, stall=control & 0xF,
                       write_barrier=(control >> 5) & 7, read_barrier=(control >> 8) & 7,
                       wait_mask=(control >> 11) & 0x3F)


def _split_operands(text: str) -> List[str]:
    out, depth, token = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(token)
            token = ""
        else:
            token += ch
    out.append(token)
    return out


def disassemble(cubin: bytes, cuobjdump: str) -> str:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loops(code: Sequence[Instruction]) -> List[Tuple[int, int]]:
    """Every loop as (index of its first instruction, index of its backward branch)."""
    index = {ins.address: i for i, ins in enumerate(code)}
    out = []
    for i, ins in enumerate(code):
        target = ins.branch_target()
        if target is not None and target <= ins.address and target in index:
            out.append((index[target], i))
    return out


def innermost_loops(code: Sequence[Instruction]) -> List[Tuple[int, int]]:
    """The loops that hold global loads and no other loop."""
    found = loops(code)
    inner = [(s, e) for s, e in found
             if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in found)]
    return [(s, e) for s, e in inner if any(code[i].is_global_load for i in range(s, e + 1))]


def spill_instructions(code: Sequence[Instruction], indices) -> int:
    """Spill stores and loads (STL, LDL: the thread's stack in local memory) among ``indices``."""
    return sum(1 for i in indices if code[i].base in ("STL", "LDL"))


def data_loads(code: Sequence[Instruction], start: int, end: int) -> Set[int]:
    """Indices of the loop's global loads whose values are data (rows, gradients), not
    indices: a load is an index load when its result flows, through any chain of ops, into
    the address of a memory access or an integer compare (a mask, a range check), within
    two passes over the loop (its value may be used in the next iteration)."""
    body = list(range(start, end + 1))
    out = set()
    for i in body:
        if not code[i].is_global_load:
            continue
        tainted, _ = code[i].registers()
        feeds_address = False
        for j in body[body.index(i) + 1:] + body + body:
            if not tainted:
                break
            ins = code[j]
            written, read = ins.registers()
            in_address = any(int(m.group(1)) in tainted
                             for op in ins.operands if "[" in op for m in _REGISTER.finditer(op))
            if in_address or (ins.base == "ISETP" and read & tainted):  # an address, or a mask or range check
                feeds_address = True
                break
            if read & tainted and not ins.is_global_load:
                tainted |= written
            else:
                tainted -= written
        if not feeds_address:
            out.add(i)
    return out


@dataclasses.dataclass
class LoopTiming:
    round_trips: int  # serial DRAM round trips per iteration, in steady state
    data_loads: int  # row-load instructions per iteration
    load_bytes: int  # widest row load, bytes per thread
    peak_in_flight: int  # most row loads outstanding at once, per thread
    bytes_per_iteration: int  # row bytes per thread per iteration


def simulate(code: Sequence[Instruction], start: int, end: int, iterations: int = 4) -> LoopTiming:
    """Issue the loop body ``iterations`` times in order (every instruction, predicated or
    not, as the worst case), each global load taking one unit of latency and every other op
    none; the round trips are the units that pass in the last iteration."""
    data = data_loads(code, start, end)
    # the row loads are the widest data loads: per-id weights and scales are 4-byte scalars
    # beside 16-byte row vectors (with scalar rows, they count as rows too)
    widest = max((code[i].load_bytes for i in data), default=0)
    rows = {i for i in data if code[i].load_bytes == widest}
    outstanding: Dict[int, List[Tuple[float, bool]]] = {b: [] for b in range(6)}  # (done at, is a row load)
    now = 0.0
    ends = []
    peak = 0
    for _ in range(iterations):
        for i in range(start, end + 1):
            ins = code[i]
            now = _wait(ins, now, outstanding)
            _issue(ins, now, outstanding, i in rows)
            in_flight = sum(1 for b in outstanding.values() for done, row in b if row and done > now)
            peak = max(peak, in_flight)
        ends.append(now)
    per_iteration = ends[-1] - ends[-2] if iterations > 1 else ends[-1]
    return LoopTiming(round(per_iteration), len(rows), widest, peak, sum(code[i].load_bytes for i in rows))


def _issue(ins: Instruction, now: float, outstanding: Dict[int, List[Tuple[float, bool]]], row: bool) -> None:
    """Count ``ins`` on its scoreboards: a global load is done one unit after it issues,
    everything else (and the reading of any op's sources) at once."""
    if ins.write_barrier != NO_BARRIER:
        outstanding[ins.write_barrier].append((now + (1.0 if ins.is_global_load else 0.0), row))
    if ins.read_barrier != NO_BARRIER:
        outstanding[ins.read_barrier].append((now, False))


def _wait(ins: Instruction, now: float, outstanding: Dict[int, List[Tuple[float, bool]]]) -> float:
    for b in range(6):
        if ins.wait_mask >> b & 1 and outstanding[b]:
            now = max(now, max(done for done, _ in outstanding[b]))
            outstanding[b] = []
    if ins.base == "DEPBAR":
        match = re.search(r"SB(\d)\s*,\s*(0x[0-9a-f]+|\d+)", " ".join(ins.operands))
        if match:
            b, allowed = int(match.group(1)), int(match.group(2), 0)
            ops = sorted(outstanding[b])
            if len(ops) > allowed:
                now = max(now, ops[len(ops) - allowed - 1][0])
                outstanding[b] = ops[len(ops) - allowed:]
    return now


def unwaited_reads(code: Sequence[Instruction]) -> List[str]:
    """A check of the decoding: every global load's result must be read only after some
    instruction waited on the load's scoreboard (or a DEPBAR drained it). Returns the loads
    that break this, which a correct decoding of correct code never finds."""
    index = {ins.address: i for i, ins in enumerate(code)}
    problems = []
    for i, load in enumerate(code):
        if not load.is_global_load or load.write_barrier == NO_BARRIER:
            continue
        dest, _ = load.registers()
        waited = False
        j, wrapped = i + 1, False
        while j < len(code):
            ins = code[j]
            if ins.wait_mask >> load.write_barrier & 1 or (
                    ins.base == "DEPBAR" and f"SB{load.write_barrier}" in " ".join(ins.operands)):
                waited = True
            written, read = ins.registers()
            if read & dest and not waited:
                problems.append(f"{load.address:#06x} {load.opcode} read at {ins.address:#06x} {ins.opcode} "
                                f"with no wait on scoreboard {load.write_barrier}")
                break
            if read & dest or written & dest or ins.base == "EXIT" and not ins.predicate:
                break
            target = ins.branch_target()
            if target is not None and target <= load.address and not wrapped:
                j, wrapped = index[target], True  # a loop's back edge: follow the next iteration
                continue
            j += 1
    return problems


def prologue_round_trips(code: Sequence[Instruction], end: int) -> int:
    """Serial DRAM round trips before instruction ``end`` (a loop's first), the code issued in
    order from the start with the latencies of :func:`simulate`: the chain of dependent loads
    (metadata, offsets, ids) a program waits for before its loop."""
    outstanding: Dict[int, List[Tuple[float, bool]]] = {b: [] for b in range(6)}
    now = 0.0
    for ins in code[:end]:
        now = _wait(ins, now, outstanding)
        _issue(ins, now, outstanding, False)
    return round(now)
