"""The decode kernels' sm_90 code, read on a machine without a GPU: registers, and what a K tile costs.

    python3 benchmarks/sass_census.py [--ptxas P] table [--maxnreg N] [--place] [--early] [--bm N] [--staged]
                                                      [--wgmma]
                                                      [--out FILE.md]
                                                              # registers, programs an SM, K loops
    python3 benchmarks/sass_census.py dump FILE.json          # the opcodes of every default variant (and of the
                                                              # opt-in place and early on one code set), in order
    python3 benchmarks/sass_census.py diff A.json B.json      # the variants whose code differs between two dumps
    python3 benchmarks/sass_census.py marlin MODULE.so [--out FILE.md]
                                                              # SGLang's Marlin MoE (its prebuilt module, from
                                                              # .tvm-ffi.tar.xz): the main loop of each uint4 kernel

A dump before and a diff after a kernel change show which variants it changed, opcode by opcode (the twenty-sixth
session's removals were checked so). The Triton release sets the code: this machine's venv and the lent GPU's image
(3.6) differ, so compare dumps of one release, and read the registers of the table as this release's.
Needs Triton's cuobjdump (the wheel carries it) and no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from sass_tools import _cuobjdump, compile_decode, disassemble, k_loop, loops, opcodes, resources  # noqa: E402

# kernel code sets (moe_gemm_gluon.KERNEL_CODES: bit 0 bf16, 1 to 4 w1 to w4, 5 w8) and the BN the launch takes
# for them (moe._as_gluon: two MMA tiles of rows a warp for narrow sets)
CODE_SETS = {
    "w4 + w2 (the layer benchmark's mixed)": (0b10100, 128),
    "w4": (0b10000, 128),
    "w2": (0b00100, 128),
    "w3": (0b01000, 64),
    "w8": (0b100000, 64),
    "bf16": (0b1, 64),
    "w8, w4, w3, w2 (the served plan's)": (0b111100, 64),
}
BITS = {0: 16, 1: 1, 2: 2, 3: 3, 4: 4, 5: 8}
WARPS = 4
REGISTERS_AN_SM = 65536
SHARED_AN_SM = 228 << 10


def programs_an_sm(regs: int, most: int | None, shared: int = 0) -> int:
    """Programs of WARPS warps that an SM's registers hold (a warp's registers are taken 256 at a time), and its
    shared memory (``shared`` bytes a program: the H100's 228 KB an SM)."""
    fit = REGISTERS_AN_SM // (-(-regs // 8) * 8 * 32 * WARPS)
    if shared:
        fit = min(fit, SHARED_AN_SM // shared)
    return min(fit, most) if most else fit


def _mix(loop: list[str]) -> dict[str, int]:
    ops = Counter(op.split(".")[0] for op in opcodes("\n".join(loop)))
    return {"all": len(loop), "MMA": ops["HMMA"] + ops["HGMMA"], "LOP3 + SHF": ops["LOP3"] + ops["SHF"],
            "LDG": ops["LDG"]}


def look_ahead(loop: list[str]) -> str:
    """Instructions of a K loop after its last global load: how far ahead of their use (the next tile's
    products, at the loop's top) the next tile's loads are issued, at most ("-": a loop without loads)."""
    ops = opcodes("\n".join(loop))
    loads = [i for i, op in enumerate(ops) if op.startswith("LDG")]
    return str(len(ops) - 1 - loads[-1]) if loads else "-"


def table(maxnreg: int | None = None, place: bool = False, early: bool = False, bm: int = 8,
          staged: bool = False, wgmma: bool = False) -> str:
    """``wgmma`` (Tiles.wgmma): every code set at BN 64, the one its warpgroup MMAs take."""
    from mxkernels.moe import STREAM_K_MOST

    rows = ["| code set | GEMM | grid | BN | registers | stack | spills in K loops | programs an SM | K loop: "
            "instructions (HMMA or HGMMA, LOP3 + SHF, LDG) | after the last load | code bytes a warp's tile | "
            "instructions a byte |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]  # fmt: skip
    for name, (codes, bn) in CODE_SETS.items():
        bn = 64 if wgmma else bn
        for gate_up in (True, False):
            for stream_k in (True, False):
                compiled = compile_decode(gate_up, False, codes, bm, bn, stream_k, maxnreg=maxnreg, place=place,
                                          early=early, staged=staged, wgmma=wgmma)  # fmt: skip
                res = resources(compiled)
                sass = disassemble(compiled, "census")
                inner = loops(sass, innermost=True)
                spills = sum(op.split(".")[0] in ("LDL", "STL") for lp in inner for op in opcodes("\n".join(lp)))
                single = bin(codes).count("1") == 1
                cells = "; ".join(str(len(lp)) for lp in inner)
                ahead = "; ".join(look_ahead(lp) for lp in inner)
                per_byte = ""
                if single:  # one K loop: its mix, and the codes a warp loads a tile
                    loop = k_loop(sass, innermost=True)
                    mix = _mix(loop)
                    cells = f"{mix['all']} ({mix['MMA']}, {mix['LOP3 + SHF']}, {mix['LDG']})"
                    nbytes = bn // WARPS * 128 * BITS[codes.bit_length() - 1] // 8 * (2 if gate_up else 1)
                    per_byte = f"{nbytes} | {mix['all'] / nbytes:.3f}"
                else:
                    per_byte = " | "
                most = STREAM_K_MOST if stream_k else None
                grid = "stream-K" if stream_k else "unbalanced"
                fit = programs_an_sm(res["reg"], most, compiled.metadata.shared)
                rows.append(f"| {name} | {'gate/up' if gate_up else 'down'} | {grid} | {bn} | {res['reg']} | "
                            f"{res['stack']} | {spills} | {fit} | {cells} | {ahead} | {per_byte} |")  # fmt: skip
                print(rows[-1], flush=True)
    import triton

    head = (f"sm_90 code of the Gluon decode kernel ({bm} rows a block), Triton {triton.__version__}, compiled on a "
            f"CPU by `python3 benchmarks/sass_census.py {' '.join(sys.argv[1:])}`. Programs an SM: what the registers "
            "and shared memory allow (stream-K: at most "
            "moe.STREAM_K_MOST). Several codes: one K loop each, their lengths listed. Spills: LDL and STL in the K "
            "loops. After the last load: the K loop's instructions after its last global load (how far ahead of "
            "the next tile's products its loads go)." + (f" Every variant capped at {maxnreg} registers." if maxnreg
                                                           else "")
            + (" Options: " + ", ".join(o for o, on in (("place", place), ("early", early), ("staged", staged),
                                                         ("wgmma", wgmma)) if on)
               + "." if place or early or staged or wgmma else "")
            + f" ptxas {_ptxas_version()}.\n\n")  # fmt: skip
    return head + "\n".join(rows) + "\n"


# Marlin's template arguments in order (sglang's marlin_moe::Marlin): the weights' and the activations' ScalarType ids,
# then the block's shape; uint4 with zero points (the moe_layer.py baseline's) is sgl_kernel.scalar_type's
# scalar_types.uint4.id: 4 mantissa bits (<< 8) and IEEE_754 NaNs (1 << 50)
MARLIN_ARGS = ("b_type", "c_type", "threads", "m_blocks", "n_blocks", "k_blocks", "m_block_size_8", "stages",
               "group_blocks", "zp_float")  # fmt: skip
MARLIN_UINT4 = (1 << 50) | (4 << 8)


def marlin_args(mangled: str) -> dict[str, int] | None:
    """A Marlin kernel's template arguments from its mangled name (Ll<n>E, Li<n>E with n<k> for -k, Lb<0|1>E)."""
    if "marlin_moe6MarlinI" not in mangled:
        return None
    vals = [int(v.replace("n", "-")) for v in re.findall(r"L[lib](n?\d+)E", mangled.split("MarlinI", 1)[1])]
    return dict(zip(MARLIN_ARGS, vals)) if len(vals) >= len(MARLIN_ARGS) else None


def marlin_rows(sass: str, res_usage: str) -> list[dict]:
    """Per uint4 Marlin kernel of one row block (decode): registers, and its main loop: instructions, the mix, and
    the weights a thread takes an iteration (its stages of K x N tiles)."""
    regs = {m.group(1): int(m.group(2)) for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+)", res_usage)}
    rows = []
    for part in sass.split("Function : ")[1:]:
        name = part.split(None, 1)[0]
        a = marlin_args(name)
        if not a or a["b_type"] != MARLIN_UINT4 or a["m_blocks"] != 1:
            continue
        # the main loop: the most MMAs, and of the loops around it (the one over slices) the shortest
        best = max(loops(part), key=lambda lp: (sum(op.startswith("HMMA") for op in opcodes("\n".join(lp))), -len(lp)),
                   default=[])  # fmt: skip
        ops = Counter(op.split(".")[0] for op in opcodes("\n".join(best)))
        weights = a["k_blocks"] * 16 * a["n_blocks"] * 16 * a["stages"] // a["threads"]
        rows.append({**a, "registers": regs.get(name), "loop": len(best), "weights": weights,
                     **{op: ops[op] for op in ("HMMA", "LOP3", "SHF", "HADD2", "HMUL2", "PRMT", "LDGSTS", "LDS",
                                               "LDSM", "LDG")}})  # fmt: skip
    return rows


def marlin_table(module: str) -> str:
    """``marlin_rows`` of a built Marlin MoE module (its .so: the sm_90 cubin inside), as Markdown."""
    tool = _cuobjdump()
    sass = subprocess.run([tool, "-sass", module], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", module], capture_output=True, text=True, check=True).stdout
    rows = marlin_rows(sass, usage)
    if not rows:
        raise SystemExit(f"sass_census.py: no uint4 Marlin MoE kernel of one row block in {module}")
    cols = ("HMMA", "LOP3", "SHF", "HADD2", "HMUL2", "PRMT", "LDGSTS", "LDS", "LDSM", "LDG")
    out = [f"Main loops of SGLang's Marlin MoE, uint4 with zero points, one block of rows (decode), from "
           f"`python3 benchmarks/sass_census.py {' '.join(sys.argv[1:])}`. Weights: a thread's, an iteration "
           "(stages x K x N of the block over its threads).\n",
           "| threads | N x K a stage | rows 8 | stages | group blocks | registers | loop | weights | instructions a "
           "weight | " + " | ".join(cols) + " |",
           "|" + "---:|" * (9 + len(cols))]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["group_blocks"], r["threads"], r["m_block_size_8"])):
        rows8 = "yes" if r["m_block_size_8"] else "no"
        out.append(f"| {r['threads']} | {r['n_blocks'] * 16} x {r['k_blocks'] * 16} | {rows8} "
                   f"| {r['stages']} | {r['group_blocks']} | {r['registers']} | {r['loop']} | {r['weights']} | "
                   f"{r['loop'] / r['weights']:.2f} | " + " | ".join(str(r[c]) for c in cols) + " |")  # fmt: skip
    return "\n".join(out) + "\n"


def _ptxas_version() -> str:
    """The release of the ptxas that compiles sm_90 here: Triton 3.9 takes its ptxas-blackwell (13.x), 3.6 (the
    lent GPU's image) its ptxas (12.8). ``--ptxas`` points both at one binary."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).version


def _router_variants():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxkernels.router import fused_router_kernel

    params = fused_router_kernel.arg_names
    pointers = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*fp32", "count_ptr": "*i32",
                "topk_w_ptr": "*fp32", "topk_ids_ptr": "*i32", "valid_ptr": "*i64"}  # fmt: skip
    for bn, warps, bk in ((1, 1, 2048), (4, 4, 2048), (64, 16, 512)):  # 1 and 4 experts a program; all at once
        for pdl in (False, True):
            for valid in (False, True):
                for renorm in (False, True):
                    consts = {"TOPK": 4, "KP": 4, "NP": 64, "BN": bn, "BK": bk, "RENORMALIZE": renorm,
                              "HAS_VALID": valid, "ALONE": bn >= 64, "PDL": pdl}  # fmt: skip
                    sig = {p: pointers.get(p, "constexpr" if p in consts else "i32") for p in params}
                    aligned = set(pointers) | {"stride_x", "K"}
                    src = ASTSource(fused_router_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                                    {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in aligned})
                    opts = {"num_warps": warps, **({"launch_pdl": True} if pdl else {})}
                    yield f"router-{bn}-{pdl}-{valid}-{renorm}", triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                                                              options=opts)  # fmt: skip


def _gemm_variants():
    for gate_up in (True, False):
        for stream_k in (True, False):
            for codes, bn, bm in ((0b111101, 64, 16), (0b10100, 128, 8), (0b10000, 64, 8)):
                for pdl in (0, 1, 2):
                    yield f"gluon-{gate_up}-{stream_k}-{codes}-{bn}-{bm}-{pdl}", compile_decode(
                        gate_up, False, codes, bm, bn, stream_k, pdl)  # fmt: skip
            # the opt-in options (moe.Tiles.place, .early) on the layer benchmark's mixed code set
            for opt in ("place", "early"):
                yield f"gluon-{gate_up}-{stream_k}-20-128-8-0-{opt}", compile_decode(
                    gate_up, False, 0b10100, 8, 128, stream_k, **{opt: True})  # fmt: skip


def dump(path: str) -> None:
    out = {}
    for key, compiled in (*_gemm_variants(), *_router_variants()):
        out[key] = opcodes(disassemble(compiled, "dump"))
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"{len(out)} variants, {sum(map(len, out.values()))} instructions: {path}")


def diff(a: str, b: str) -> int:
    with open(a) as f:
        old = json.load(f)
    with open(b) as f:
        new = json.load(f)
    changed = [k for k in old if k in new and old[k] != new[k]]
    for k in changed:
        print(f"{k}: {len(old[k])} -> {len(new[k])} instructions")
    for k in sorted(set(old) ^ set(new)):
        print(f"{k}: only in {a if k in old else b}")
    print(f"{len(old.keys() & new.keys()) - len(changed)} of {len(old.keys() & new.keys())} variants the same")
    return 1 if changed or set(old) != set(new) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--out", help="also write the table (Markdown) here")
    t.add_argument("--maxnreg", type=int, help="cap every variant's registers (stream-K's own cap otherwise)")
    t.add_argument("--place", action="store_true", help="1 and 2-bit fields in place (moe.Tiles.place)")
    t.add_argument("--early", action="store_true", help="the next tile's loads before the products (Tiles.early)")
    t.add_argument("--bm", type=int, default=8, help="rows a block (the MMA's N: 8, 16; 32 staged)")
    t.add_argument("--staged", action="store_true", help="the activations through shared memory (Tiles.staged)")
    t.add_argument("--wgmma", action="store_true", help="the products as warpgroup MMAs, BN 64 (Tiles.wgmma)")
    ap.add_argument("--ptxas", help="compile with this ptxas (e.g. Triton 3.6's, which the lent GPU's image runs: "
                                    "pip download triton==3.6.0 --no-deps; unzip its triton/backends/nvidia/bin)")
    d = sub.add_parser("dump")
    d.add_argument("path")
    c = sub.add_parser("diff")
    c.add_argument("a")
    c.add_argument("b")
    m = sub.add_parser("marlin")
    m.add_argument("module", help="the Marlin MoE module's .so (tvmcache/sgl_kernel_jit_moe_wna16_marlin_*/)")
    m.add_argument("--out", help="also write the table (Markdown) here")
    a = ap.parse_args()
    if a.ptxas:  # Triton 3.9 compiles sm_90 with its ptxas-blackwell, 3.6 with ptxas
        os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = os.path.abspath(a.ptxas)
    if a.what == "table":
        text = table(a.maxnreg, a.place, a.early, a.bm, a.staged, a.wgmma)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return 0
    if a.what == "dump":
        dump(a.path)
        return 0
    if a.what == "marlin":
        text = marlin_table(a.module)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return 0
    return diff(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
