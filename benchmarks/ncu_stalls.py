"""Where a kernel's warps wait, instruction by instruction, from ncu's source page exported as CSV.

    ncu --section WarpStateStats --section SourceCounters -o REPORT python3 ...   # on the GPU
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > FILE.csv      # phase 58 of device_runs.sh
    python3 benchmarks/ncu_stalls.py FILE.csv[.xz] [--top 12] [--out FILE.md]

For each kernel in the export: its stall samples by reason, by how often the instruction ran (instructions run
equally often are one stretch of code: the K loop, a unit's prologue), and the instructions that gathered the most.
A sample lands on the instruction that waits, not on the load it waits for, so each top instruction that waits on a
load's scoreboard (long_sb) names the load that last wrote one of its registers, searched backwards and, in a
loop, around its back edge.
"""

from __future__ import annotations

import argparse
import csv
import io
import lzma
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
_REG = re.compile(r"\bR(\d+)\b")
_LOAD = re.compile(r"^(?:@!?U?P\w+\s+)?(LDG|LDS|LDC|LDSM|LDGSTS|LD)\b")


@dataclass
class Instr:
    address: int
    text: str
    samples: int
    executed: int
    stalls: dict[str, int]


@dataclass
class Kernel:
    name: str
    instrs: list[Instr] = field(default_factory=list)


def read(path: str) -> list[Kernel]:
    """The kernels of an ncu source-page CSV (``.xz`` read as is), in the order they were profiled."""
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    kernels: list[Kernel] = []
    header: list[str] | None = None
    for row in rows:
        if not row:
            continue
        if row[0] == "Kernel Name":
            kernels.append(Kernel(row[1] if len(row) > 1 else "?"))
        elif row[0] == "Address":
            header = row
        elif kernels and header:
            col = dict(zip(header, row))
            stalls = {k[len("stall_"):]: int(v) for k, v in col.items()
                      if k.startswith("stall_") and "Not Issued" not in k and v.isdigit() and int(v)}  # fmt: skip
            kernels[-1].instrs.append(Instr(int(row[0], 16), row[1].strip(), int(col.get(SAMPLES, 0) or 0),
                                            int(col.get(EXECUTED, 0) or 0), stalls))  # fmt: skip
    if not kernels or not any(k.instrs for k in kernels):
        raise ValueError(f"{path}: no kernel with instructions (is it ncu's --page source --csv export?)")
    return kernels


def _dest_and_sources(text: str) -> tuple[set[int], set[int]]:
    """Registers an instruction writes (its first operand; a 128-bit load and an MMA's fp32 sums 4) and reads."""
    body = re.sub(r"^@!?U?P\w+\s+", "", text)
    op, _, args = body.partition(" ")
    parts = [p.strip() for p in args.split(",")]
    if not parts or not parts[0]:
        return set(), set()
    dest = {int(r) for r in _REG.findall(parts[0])} if not op.startswith(("ST", "RED", "ATOM", "BRA", "ISETP",
                                                                          "FSETP")) else set()  # fmt: skip
    width = {".64": 2, ".128": 4}.get(next((w for w in (".128", ".64") if w in op), ""), 1)
    if op.startswith("HMMA") and ".F32" in op:  # m16n8k16 fp32 sums: 4 registers
        width = 4
    elif op.startswith(("IMAD.WIDE", "CS2R")):
        width = 2
    if dest and width > 1:
        first = min(dest)
        dest = set(range(first, first + width))
    sources = {int(r) for p in (parts[1:] if dest else parts) for r in _REG.findall(p)}
    return dest, sources


def producer(kernel: Kernel, at: int) -> tuple[Instr, int] | None:
    """The load that last wrote a register instruction ``at`` reads, in a loop as the iterations after the first see
    it, and how many instructions run from it to ``at``; None where the last write is not a load."""
    _, wanted = _dest_and_sources(kernel.instrs[at].text)
    if not wanted:
        return None
    # the stretch of code around ``at`` that runs as often (a loop's body): inside it first, then its tail (the write
    # the last iteration left), then the code before it
    lo = hi = at
    while lo > 0 and kernel.instrs[lo - 1].executed == kernel.instrs[at].executed:
        lo -= 1
    while hi + 1 < len(kernel.instrs) and kernel.instrs[hi + 1].executed == kernel.instrs[at].executed:
        hi += 1
    order = list(range(at - 1, lo - 1, -1)) + list(range(hi, at, -1)) + list(range(lo - 1, -1, -1))
    for i in order:
        dest, _ = _dest_and_sources(kernel.instrs[i].text)
        if dest & wanted:
            if not _LOAD.match(kernel.instrs[i].text):
                return None
            return kernel.instrs[i], at - i if i < at else (hi - i + 1) + (at - lo)
    return None


def report(kernels: list[Kernel], top: int = 12) -> str:
    lines = []
    for n, k in enumerate(kernels):
        total = sum(x.samples for x in k.instrs) or 1
        reasons: Counter[str] = Counter()
        stretch: Counter[int] = Counter()
        count: Counter[int] = Counter()
        for x in k.instrs:
            reasons.update(x.stalls)
            stretch[x.executed] += x.samples
            count[x.executed] += 1
        lines += [f"### kernel {n + 1}: `{k.name[:80]}`", "",
                  f"{total} samples over {len(k.instrs)} instructions; by reason: "
                  + ", ".join(f"{r} {v} ({100 * v / total:.0f}%)" for r, v in reasons.most_common(6)), "",
                  "| times run (warp) | instructions | samples | share |", "|---:|---:|---:|---:|"]  # fmt: skip
        for ex, s in stretch.most_common(6):
            lines.append(f"| {ex} | {count[ex]} | {s} | {100 * s / total:.0f}% |")
        lines += ["", "| address | times run | samples | share | instruction | top reasons | waits on the load |",
                  "|---|---:|---:|---:|---|---|---|"]  # fmt: skip
        ranked = sorted(range(len(k.instrs)), key=lambda i: -k.instrs[i].samples)[:top]
        for i in ranked:
            x = k.instrs[i]
            why = ", ".join(f"{r} {v}" for r, v in sorted(x.stalls.items(), key=lambda t: -t[1])[:2])
            found = producer(k, i) if x.stalls.get("long_sb", 0) * 2 >= x.samples > 0 else None
            src = (f"`{found[0].text}` ({found[0].address & 0xFFFFF:05x}, run {found[0].executed}; "
                   f"{found[1]} instructions before)") if found else ""  # fmt: skip
            lines.append(f"| {x.address & 0xFFFFF:05x} | {x.executed} | {x.samples} | {100 * x.samples / total:.0f}% "
                         f"| `{x.text}` | {why} | {src} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass, as is or .xz")
    ap.add_argument("--top", type=int, default=12, help="instructions listed per kernel")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args(argv)
    try:
        text = report(read(args.csv), args.top)
    except (OSError, ValueError, lzma.LZMAError) as e:
        print(f"ncu_stalls: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
