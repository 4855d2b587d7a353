"""The Gluon decode kernel (mxkernels/moe_gemm_gluon.py) compiled for sm_90 on a machine without a GPU.

The point of the kernel is in its machine code: the weights reach the MMA without shared memory, the K loop
carries whole registers, the loads come where its options say. Each test compiles it in a fresh process
(sass_tools.in_fresh_process) and reads the SASS. Its arithmetic: tests/test_gluon.py (the interpreter); its
results on the GPU: tests/test_kernels_gpu.py, test_gluon_*.
"""

import re

import pytest
from sass_tools import compile_decode, disassemble, in_fresh_process, k_loop, loops, resources

gluon = pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")


def _sass(gate_up: bool, skip_pad: bool = False, codes: int = 0b111101, bm: int = 16, bn: int = 64,
          stream_k: bool = False, pdl: int = 0, place: bool = False, early: bool = False,
          topk: int = 0) -> str:  # fmt: skip
    call = f"_compile_sass({gate_up}, {skip_pad}, {codes}, {bm}, {bn}, {stream_k}, {pdl}, {place}, {early}, {topk})"
    return in_fresh_process("test_gluon_sass", call)


def _compile_sass(gate_up: bool, skip_pad: bool = False, codes: int = 0b111101, bm: int = 16, bn: int = 64,
                  stream_k: bool = False, pdl: int = 0, place: bool = False, early: bool = False,
                  topk: int = 0) -> str:  # fmt: skip
    return disassemble(compile_decode(gate_up, skip_pad, codes, bm, bn, stream_k, pdl, place=place, early=early,
                                      topk=topk, n_routed=60 if topk else 0),
                       f"{int(gate_up)}{int(skip_pad)}{int(stream_k)}{pdl}{int(place)}{int(early)}{topk}")  # fmt: skip


@pytest.mark.parametrize("gate_up, skip_pad", [(True, False), (False, False), (True, True)])
def test_gluon_kernel_feeds_the_mma_from_registers(gate_up, skip_pad):
    sass = _sass(gate_up, skip_pad)
    assert re.search(r"\bHMMA\.16816\.F32\.BF16\b", sass), "no bf16 mma.sync in the kernel"
    # no shared-memory traffic at all: codes and activations are loaded into MMA fragments
    for op in ("LDS", "STS", "LDSM", "LDGSTS"):
        assert not re.search(rf"\b{op}\b", sass), op
    # a lane's 32 k of a row (codes) or of a token (activations) arrive 16 bytes at a time: no
    # load of one code word or one activation
    assert len(re.findall(r"\bLDG\.E\.128\b", sass)) >= 8
    assert not re.search(r"\bLDG\.E\.U16\b.*\bR\d+\.64\+0x", sass), "activations loaded one by one"


def _wgmma_census() -> str:
    """Tiles.wgmma's w4 + w2 gate/up kernel at 32 rows a block: its registers and stack bytes, then its K loop's
    warpgroup MMAs of 32 tokens, 4-byte copies into shared memory, legacy MMAs and global loads of 16 bytes."""
    compiled = compile_decode(True, codes=0b10100, bm=32, bn=64, wgmma=True)
    loop = k_loop(disassemble(compiled, "wgmma"), innermost=True)
    ops = [r"HGMMA\.64x32x16\.F32\.BF16", r"LDGSTS\.E\b", r"HMMA", r"LDG\.E\.128"]
    count = [sum(bool(re.search(rf"\b{op}", ln)) for ln in loop) for op in ops]
    return " ".join(str(v) for v in (*resources(compiled).values(), *count))


def test_gluon_kernel_warpgroup_mma_reads_activations_copied_once_a_program():
    # Tiles.wgmma: a K tile's products as warpgroup MMAs of all the block's tokens (8 k16 slices each of gate, up and
    # the activations' sum), their B operand the tile's activations copied 4 bytes at a time into shared memory (the
    # words change order to the A operand's K order: _stage_wg), one copy a word for the program, not one a warp
    regs, stack, wgmma, copies, hmma, wide = map(int, in_fresh_process("test_gluon_sass", "_wgmma_census()").split())
    assert stack == 0 and regs <= 255, (regs, stack)
    assert wgmma == 24 and hmma == 0, (wgmma, hmma)
    assert copies == 32 * 64 // 128, copies  # 32 tokens x 64 words over 128 threads
    assert wide >= 4, wide  # the codes still 16 bytes a lane (w4: gate and up, rows g and g + 8)


@pytest.mark.parametrize("codes", [0b1, 0b10000, 0b1000])
def test_gluon_kernel_loop_carries_whole_registers(codes):
    # the K loop carries the next tile's activations (and bf16 weights) as int32 words and the arena's
    # codes come in pairs (k, k + 1): no 16-bit repacking. Before, the loop of the w4 gate/up kernel at
    # 8 rows had 42 PRMT of 275 instructions (236 now); that of bf16 experts 129 of 200 (126 now)
    loop = k_loop(_sass(True, False, codes, 8))
    prmt = sum(bool(re.search(r"\bPRMT\b", ln)) for ln in loop)
    assert prmt <= 8, (prmt, len(loop))
    assert sum(bool(re.search(r"\bHMMA\.16816\.F32\.BF16\b", ln)) for ln in loop) >= 16


def test_gluon_kernel_joins_the_3_bit_planes_before_one_mma():
    # 3 bits: both planes' fields of a pair of codes in one register (two shifts and two LOP3, the magic's OR
    # inside one of them), then one MMA per weight tile as at 4 bits. Each plane had MMAs of its own before
    # (40 HMMA in the stream-K gate/up loop against 24, and an FFMA per accumulator to join them: 408
    # instructions a tile against w4's 230, for three quarters of w4's bytes)
    def count(loop, op):
        return sum(bool(re.search(rf"\b{op}\b", ln)) for ln in loop)

    w3, w4 = (k_loop(_sass(True, False, codes, 8, 64, True), innermost=True) for codes in (0b1000, 0b10000))
    assert count(w3, r"HMMA\.16816\.F32\.BF16") == count(w4, r"HMMA\.16816\.F32\.BF16")
    assert count(w3, "FFMA") == count(w4, "FFMA")
    assert count(w3, "LOP3") <= 2 * count(w4, "LOP3"), (count(w3, "LOP3"), count(w4, "LOP3"))


def _count(loop: list[str], op: str) -> int:
    return sum(bool(re.search(rf"\b{op}\b", ln)) for ln in loop)


def test_gluon_kernel_unpacks_2_bit_codes_three_fields_a_shift_in_place():
    # Tiles.place: of a word's 8 pairs of 2-bit codes, 3 share a shift, each left at its own place (128 + 4^j q),
    # and the activations are scaled by 4^-j to match (one packed bf16 multiply a word, HMUL2): the w2 gate/up
    # loop's shifts fall from 114 to 34 (sm_90 SASS), with as many MMAs (both sums from one of them)
    base, place = (k_loop(_sass(True, False, 0b100, 8, 128, True, place=p), innermost=True) for p in (False, True))
    assert _count(place, r"HMMA\.16816\.F32\.BF16") == _count(base, r"HMMA\.16816\.F32\.BF16")
    assert 2 * _count(place, r"SHF\.[\w.]+") < _count(base, r"SHF\.[\w.]+"), (_count(place, r"SHF\.[\w.]+"),
                                                                         _count(base, r"SHF\.[\w.]+"))  # fmt: skip
    assert _count(place, r"HMUL2\.BF16_V2") >= 8 and not _count(base, r"HMUL2\.BF16_V2")
    assert len(place) < len(base), (len(place), len(base))


def test_gluon_kernel_early_issues_the_next_tiles_loads_before_this_tiles_mmas():
    # Tiles.early: in the gate/up K loop every global load (the next tile's) comes before the first MMA, so the
    # loads have the whole tile's products to arrive in (ptxas otherwise sinks most of them past the MMAs)
    loop = k_loop(_sass(True, False, 0b10000, 8, 128, True, early=True), innermost=True)
    loads = [i for i, ln in enumerate(loop) if re.search(r"\bLDG\.E", ln)]
    mmas = [i for i, ln in enumerate(loop) if re.search(r"\bHMMA\b", ln)]
    assert len(loads) >= 8 and len(mmas) >= 16 and max(loads) < min(mmas), (loads, mmas)


def _staged_census() -> str:
    """Registers and stack of the w4 gate/up kernel at 32 rows a block and BN 64, activations held in registers a
    tile ahead, then staged; and the staged one's K loop: its copies into shared memory, 16-byte shared loads,
    spill instructions."""
    held, staged = (compile_decode(True, codes=0b10000, bm=32, bn=64, staged=s) for s in (False, True))
    loop = k_loop(disassemble(staged, "staged"), innermost=True)
    count = [sum(bool(re.search(p, ln)) for ln in loop) for p in (r"\bLDGSTS\b", r"\bLDS\.128\b", r"\b(STL|LDL)\b")]
    return " ".join(str(v) for v in (*resources(held).values(), *resources(staged).values(), *count))


def test_gluon_kernel_staged_activations_free_the_registers_of_32_row_blocks():
    # Tiles.staged: a K tile's activations copied 16 bytes a lane (LDGSTS) into shared memory and read back 16 bytes
    # a lane without bank conflicts (the kernel asserts gl.bank_conflicts == 0 as it compiles: _staged_words), no
    # longer held a tile ahead in registers. At 32 rows a block the kernel then needs fewer registers, and spills
    # nothing (Triton 3.6's ptxas: 206 against 254, benchmarks/README.md, thirty-second session)
    census = in_fresh_process("test_gluon_sass", "_staged_census()")
    regs_held, _, regs, stack, copies, loads, spills = map(int, census.split())
    assert copies >= 1 and loads >= 8 and spills == 0 and stack == 0, (copies, loads, spills, stack)
    assert regs < regs_held - 16, (regs, regs_held)


def _bank_conflicts_probe(swizzled: bool) -> str:
    """Compiles a kernel that loads [64, 32] words from shared memory in the staged activations' register layout
    (moe_gemm_gluon._staged_rows at 32 rows a block), from the kernel's swizzled layout or a plain one, and asserts
    as it compiles that the loads have bank conflicts exactly where the layout is the plain one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from mxkernels import moe_gemm_gluon as m

    @gluon.jit
    def probe(out_ptr, SWIZZLED: gl.constexpr):
        L: gl.constexpr = m._staged_rows(32)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        buf = gl.allocate_shared_memory(gl.int32, [64, 32], m._STAGED if SWIZZLED else plain)
        x = buf.load(L)
        gl.static_assert((gl.bank_conflicts(x.type, buf.type) == 0) == SWIZZLED)
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, L))[:, None]
        gl.store(out_ptr + r * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :], x)

    src = GluonASTSource(probe, {"out_ptr": "*i32", "SWIZZLED": "constexpr"}, {(1,): swizzled})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return "compiled"


@pytest.mark.parametrize("swizzled", [True, False])
def test_staged_activations_swizzle_is_what_spares_the_bank_conflicts(swizzled):
    # the 8 lanes of a quarter warp read tokens 2m and 2m + 1, 16 bytes of each quarter of a 256-byte row: plain,
    # 4 of them share a bank group; the rows' 16-byte vectors XORed with their low 3 bits spread them over all 8
    assert in_fresh_process("test_gluon_sass", f"_bank_conflicts_probe({swizzled})") == "compiled"


@pytest.mark.parametrize("gate_up", [True, False])
@pytest.mark.parametrize("codes, bn", [(0b10100, 128), (0b111101, 64)])
def test_gluon_kernel_stream_k_fits_its_register_cap_and_reduces_without_waiting(gate_up, codes, bn):
    # stream-K launches as moe.STREAM_K_REGISTERS caps them: no spill to local memory in any K loop (the gate/up
    # kernels keep a register or two in local memory from the prologue to the epilogue at 168); the sums go
    # out as reductions that return nothing (REDG), not atomics a warp waits on; the K loop is the same
    # whole-register one
    sass = _sass(gate_up, False, codes, 8, bn, True)
    assert len(re.findall(r"\b(STL|LDL)\b", sass)) <= (8 if gate_up else 0), "spills"
    for loop in loops(sass, innermost=True):
        assert not any(re.search(r"\b(STL|LDL)\b", ln) for ln in loop), "a spill in a K loop"
    assert re.search(r"\bREDG\.E\.ADD\.F32", sass) and not re.search(r"\bATOMG?\b", sass)
    inner = k_loop(sass, innermost=True)
    assert sum(bool(re.search(r"\bHMMA\b", ln)) for ln in inner) >= 8
    assert sum(bool(re.search(r"\bPRMT\b", ln)) for ln in inner) <= 8 * bn // 64, len(inner)


def test_gluon_kernel_takes_the_top_k_rows_with_fewer_loads_before_its_weights():
    # MXSERVE_TOPK_ROWS (one token, stream-K): each block's expert is read from the top-k, and the work dealt out
    # from the row count the launch passes, so no program loads the alignment's row count or sorted ids: fewer
    # global loads before its first weights (the 16-byte code loads), and no spill
    before = {}
    for topk in (0, 4):
        sass = _sass(False, True, 0b10000, 8, 128, True, topk=topk)
        lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", ln)]
        first = next(i for i, ln in enumerate(lines) if "LDG.E.128" in ln)
        before[topk] = sum(bool(re.search(r"\bLDG\b", ln)) for ln in lines[:first])
        assert not re.search(r"\b(STL|LDL)\b", sass), "spills"
    assert before[4] <= before[0] - 2, before  # the row count and the sorted ids


def _grid_topk_census(gate_up: bool, sp: int) -> str:
    """The grid's top-k rows kernel (w2, w3, w4 experts, 8-row blocks, top-4 of 8 slots a token, ``sp`` slots read):
    its registers and stack bytes, then its shared-memory loads and stores, barriers, spills and warp reductions."""
    compiled = compile_decode(gate_up, True, 0b11100, 8, 64, grid_topk=4, slots=8, sp=sp)
    sass = disassemble(compiled, f"grid_topk{int(gate_up)}{sp}")
    ops = ["LDS", "STS", "BAR", "STL|LDL", "REDUX"]
    return " ".join(str(v) for v in (*resources(compiled).values(),
                                      *(len(re.findall(rf"\b({op})\b", sass)) for op in ops)))  # fmt: skip


@pytest.mark.parametrize("gate_up, sp", [(True, 32), (False, 128)])
def test_gluon_kernel_finds_the_grids_blocks_in_the_top_k_with_warp_reductions(gate_up, sp):
    # MXSERVE_TOPK_GRID: each program reads every routed slot's expert and finds its block's slots with a warp's
    # reductions (redux.sync: one count, then BM - 1 minimums), no shared memory, barrier or spill
    regs, stack, lds, sts, bar, spills, redux = map(int, in_fresh_process(
        "test_gluon_sass", f"_grid_topk_census({gate_up}, {sp})").split())  # fmt: skip
    assert stack == 0 and spills == 0 and lds == sts == bar == 0, (stack, spills, lds, sts, bar)
    assert redux >= 8, redux


def _stream_k_topk_resources(gate_up: bool, codes: int, sp: int) -> str:
    """Registers, stack bytes and spill instructions of the stream-K kernel (``codes``' experts, 8-row blocks) aligned
    (``sp`` 0) and with ``sp`` routed slots taken straight from the top-k (top-4 of 5 slots a token, 60 routed)."""
    topk = {"grid_topk": 4, "slots": 5, "sp": sp, "n_routed": 60} if sp else {}
    compiled = compile_decode(gate_up, True, codes, 8, 64, stream_k=True, **topk)
    sass = disassemble(compiled, f"sk_topk{int(gate_up)}{codes}{sp}")
    return " ".join(str(v) for v in (*resources(compiled).values(), len(re.findall(r"\b(STL|LDL)\b", sass))))


def _per_sm(regs: int) -> int:
    """Programs of 4 warps an SM holds at ``regs`` registers a thread (64K registers, given 256 a warp at a time),
    at most moe.STREAM_K_MOST (as moe._stream_k_per_sm counts)."""
    from mxkernels.moe import STREAM_K_MOST

    return min(STREAM_K_MOST, 65536 // (-(-regs * 32 // 256) * 256 * 4))


def test_stream_k_finds_the_top_ks_blocks_without_spills():
    # MXSERVE_TOPK_GRID on stream-K: every program counts the routed slots pairwise (up to moe.TOPK_STREAM_K_SLOTS,
    # 64) to find the blocks it deals out. The gate/up kernel (the down one holds fewer registers): no spill at 32 or
    # 64 slots, and at least 2 programs an SM. This compiles with CI's Triton (3.9); the lent GPUs run 3.6, whose
    # registers differ: there (the 3.6.0 wheel's compiler on this machine, forty-seventh session) w2 to w4 hold 96
    # registers at 64 slots as aligned, and with bf16 and w8 beside them 168 as aligned; under 3.9 132 against 100
    # aligned, and 176 against 168 (a program an SM fewer). The leaders and their prefix kept as two arrays over the
    # K loops spilled under 3.6 (96 registers, 2 spill instructions)
    gate_up = True
    for codes, sps in ((0b11100, (64,)), (0b111101, (32, 64))):
        for sp in sps:
            regs, stack, spills = map(int, in_fresh_process(
                "test_gluon_sass", f"_stream_k_topk_resources({gate_up}, {codes}, {sp})").split())  # fmt: skip
            assert stack == 0 and spills == 0 and _per_sm(regs) >= 2, (codes, sp, regs, stack, spills)


@pytest.mark.parametrize("gate_up, pdl", [(True, 1), (False, 2), (False, 0)])
def test_gluon_kernel_waits_for_the_launch_before_where_its_pdl_mode_says(gate_up, pdl):
    # programmatic dependent launch (mxkernels/pdl.py): griddepcontrol.wait is ACQBULK in the sm_90 code and
    # launch_dependents PREEXIT, after it. Mode 1 (gate/up) waits before any load; mode 2 (down) loads the
    # first K tile's weights (16-byte loads) before its wait and the activations after it, before the MMA
    sass = _sass(gate_up, False, 0b10000, 8, 64, True, pdl)
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]

    def first(op: str) -> int:
        return next((i for i, ln in enumerate(lines) if re.search(rf"\b{op}\b", ln)), len(lines))

    wait, release, loads, mma = first("ACQBULK"), first("PREEXIT"), first(r"LDG\.E[.\w]*"), first("HMMA")
    if pdl == 0:
        assert wait == release == len(lines)
        return
    assert wait < release < mma
    # so the launches take the kernel's PDL modes with this Triton (pdl.gluon_has_it: on Triton 3.6, the lent GPUs',
    # it once said no where the wait compiled, and the Gluon GEMMs launched plainly under MXSERVE_PDL=1)
    from mxkernels.pdl import gluon_has_it

    assert gluon_has_it()
    if pdl == 1:
        assert wait < loads
        return
    wide = [i for i, ln in enumerate(lines[:mma]) if re.search(r"\bLDG\.E\.128\b", ln)]
    assert any(i < wait for i in wide) and any(wait < i for i in wide), (wait, wide)
