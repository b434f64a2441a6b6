"""Compiles mygpt's Triton kernels for an H100 (sm_90) on any machine, no GPU needed (Triton's own
ptxas), and reports what their machine code does: registers, spill stack, and the instructions of the
main loop. For kernels/nf4.py, each tile of gpu_check's sweep (NF4_TILES) and the defaults (TILES), in
bfloat16 as the engine runs them, with the K loop's instructions per weight; for kernels/lora.py, the
shrink and expand kernels at the 8B shape's ranks.

    PYTHONPATH=server python3 scripts/kernel_sass.py [--check]   # a table; --check: exit 1 on a bad one
    tests/unit/test_nf4_kernel.py runs the check: every kernel compiles, none spills

The GPU machine's Triton may be another version than this one (run 4: 3.6.0), so its code can differ.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# the shared-memory table's K loop, instructions per weight, at most (6.8-9.3 when written; the table
# broadcast in registers, run 4's "gather", compiled to ~37, reshaping the nibbles to [BLOCK_N, BLOCK_K]
# to 9.8-12.5)
MAX_PER_WEIGHT = 10
# the table of byte pairs (session 17): 3.8-6.4 when written (one shared load, one address and one byte
# extraction a byte; the scale once a step and row, which at 64 rows is one FFMA a weight)
MAX_PER_WEIGHT_BYTES = 7


@dataclass
class Sass:
    kind: str
    tile: tuple
    block_m: int
    registers: int
    stack: int  # bytes of local memory a thread spills to: 0 wanted
    loop: dict[str, int]  # the K loop's body (its longest backward branch): opcode -> count
    weights: int  # weights a thread dequantizes per K step (block_n x block_k / threads)

    @property
    def per_weight(self) -> float:
        """Instructions of the K loop per weight a thread dequantizes."""
        return sum(self.loop.values()) / self.weights


def compile_tile(kind: str, tile: tuple, block_m: int, dtype: str = "bf16", split: bool = False) -> Sass:
    """One tile of TILES[kind] ((block_n, block_k, warps, stages, programs, lut)) compiled for sm_90 as a
    launch with these block_m rows would be, pointers and sizes divisible by 16 (Triton's launch-time
    specialization for the engine's shapes)."""
    import triton

    from mygpt.kernels import nf4

    block_n, block_k, warps, stages, _programs, lut = tile
    kernel = nf4._nf4_bytes_kernel if lut == "bytes" else nf4._nf4_kernel
    if lut == "bytes":  # as nf4._config: one tl.dot a K step, at least 16 rows and 16 columns of K
        block_m, block_k = max(block_m, 16), max(block_k, 16)
    elif kind == "dot":  # a plane's K (block_k / 8) is at least 16
        block_k = max(block_k, 128)
    names = triton.jit(kernel).arg_names
    ints = ("M", "N", "k_split", "stride_xm", "stride_wn", "stride_bn", "stride_sn", "stride_om", "stride_os")
    pointers = {"x_ptr": dtype, "w_ptr": "i32", "b_ptr": "u8", "s_ptr": "fp32", "code_ptr": "fp32"}
    pointers["out_ptr"] = "fp32" if split else dtype
    signature = {
        n: f"*{pointers[n]}" if n in pointers else ("i32" if n in ints else "constexpr") for n in names
    }
    constants = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "QBLOCK": 64,
        "PRECISION": "ieee" if dtype == "fp32" else "tf32", "STAGES": stages,
    }  # fmt: skip
    if lut != "bytes":
        constants |= {"LUT": nf4.LUTS[lut], "DOT": kind == "dot"}
    registers, stack, sass = _compile(kernel, signature, constants, warps, stages)
    return Sass(kind, tile, block_m, registers, stack, loop_body(sass), block_n * block_k // (32 * warps))


def loop_body(sass: str) -> dict[str, int]:
    """Opcode counts (without modifiers: LDG.E.128 counts as LDG) between the target of the code's
    longest backward branch and that branch: the K loop."""
    code = []  # (address, opcode, branch target or None)
    for line in sass.splitlines():
        found = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if found:
            target = re.search(r"0x([0-9a-f]+)", found[3]) if found[2].startswith("BRA") else None
            code.append((int(found[1], 16), found[2].split(".")[0], int(target[1], 16) if target else None))
    best = (0, -1)
    for i, (address, _, target) in enumerate(code):
        if target is not None and target < address:
            start = next(j for j, c in enumerate(code) if c[0] >= target)
            if i - start > best[1] - best[0]:
                best = (start, i)
    counts: dict[str, int] = {}
    for _, op, _ in code[best[0] : best[1] + 1]:
        counts[op] = counts.get(op, 0) + 1
    return counts


def _compile(
    fn, signature: dict, constants: dict, warps: int, stages: int, unaligned=("M",)
) -> tuple[int, int, str]:
    """(registers, spill stack bytes, SASS text) of one kernel compiled for sm_90; pointers and integer
    arguments other than `unaligned` specialized as divisible by 16, as launches with such sizes are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = triton.jit(fn)
    names = jit.arg_names
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n, kind in signature.items()
        if kind != "constexpr" and n not in unaligned
    }
    compiled = triton.compile(
        ASTSource(jit, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )  # fmt: skip
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True
        )
        sass = subprocess.run(
            [tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True
        )
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage.stdout)
    assert found, usage.stdout
    return int(found[1]), int(found[2]), sass.stdout


def lora_kernels() -> list[tuple[str, int, int, dict[str, int]]]:
    """(name, registers, spill bytes, main loop opcodes) of kernels/lora.py's shrink and expand, bf16,
    int64 slots (the static decoder's buffer): the shrink for q/k/v (3 parts) at ranks 16 and 64, the
    expand at 8 and 28 K splits (K 4,096 and 14,336)."""
    import triton

    from mygpt.kernels import lora

    out = []
    shrink = {
        "x_ptr": "*bf16", "a_ptr": "*bf16", "slot_ptr": "*i64", "h_ptr": "*fp32", "K": "i32", "R_ALL": "i32",
        "stride_xm": "i32", "stride_as": "i32", "stride_hs": "i32",
        "K_SPLIT": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr",
    }  # fmt: skip
    for rank in (16, 64):
        block_r = triton.next_power_of_2(3 * rank)
        block_k = max(16, min(128, lora.SHRINK_TILE // block_r))  # as add_lora chooses
        consts = {"K_SPLIT": lora.SHRINK_K, "BLOCK_K": block_k, "BLOCK_R": block_r}
        regs, stack, sass = _compile(lora._shrink_kernel, shrink, consts, 4, 3, unaligned=())
        out.append((f"lora shrink, q/k/v at rank {rank}", regs, stack, loop_body(sass)))
    expand = {
        "h_ptr": "*fp32", "b_ptr": "*bf16", "slot_ptr": "*i64", "y_ptr": "*bf16", "o_ptr": "*bf16",
        "N_OUT": "i32", "R": "i32", "R_ALL": "i32", "r_off": "i32", "OFF1": "i32", "OFF2": "i32",
        "stride_hs": "i32", "stride_bs": "i32", "stride_br": "i32", "stride_ym": "i32", "stride_om": "i32",
        "SPLIT": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "PARTS": "constexpr",
        "COPY": "constexpr",
    }  # fmt: skip
    # in place (eager) or into new outputs (compiled); one part, or q/k/v's three side by side
    for split, parts, copy in ((8, 1, False), (28, 1, False), (8, 1, True), (8, 3, False), (28, 3, True)):
        consts = {"SPLIT": split, "BLOCK_N": lora.EXPAND_N, "BLOCK_R": 16, "PARTS": parts, "COPY": copy}
        unaligned = ("R_ALL", "r_off", "OFF1", "OFF2")
        regs, stack, sass = _compile(lora._expand_kernel, expand, consts, 4, 3, unaligned=unaligned)
        into = ", into new outputs" if copy else ""
        out.append((f"lora expand, {parts} part(s), {split} K splits{into}", regs, stack, loop_body(sass)))
    return out


def all_tiles() -> list[tuple[str, tuple, int]]:
    """(kind, tile, block_m) for the defaults and gpu_check's sweep: gemv at one row, dot at 8 and 32
    rows (block_m 16 and 32), and the bytes tiles' full row block too (every step past 32 rows)."""
    import gpu_check

    from mygpt.kernels import nf4

    keys = ("block_n", "block_k", "num_warps", "num_stages", "programs", "lut")
    out = []
    for kind in ("gemv", "dot"):
        tiles = [tuple(nf4.TILES[kind][k] for k in keys)] + list(gpu_check.NF4_TILES[kind])
        for tile in dict.fromkeys(tiles):
            rows = (16, 32, nf4.BYTES_BLOCK_M) if tile[-1] == "bytes" else (16, 32)  # (a bytes gemv: 16)
            for block_m in (1,) if kind == "gemv" else rows:
                out.append((kind, tile, block_m))
    return out


def main() -> None:
    """The table; with --check, exit 1 where a tile spills or a shared-table tile takes more than
    MAX_PER_WEIGHT instructions of its K loop per weight (tests/unit/test_nf4_kernel.py)."""
    check = "--check" in sys.argv[1:]
    os.environ.pop("TRITON_INTERPRET", None)  # compiled: Triton reads it when it is imported
    print(f"{'kind':5} {'tile (n, k, warps, stages, programs, lut)':42} {'m':>3} {'regs':>4} {'spill':>5} "
          f"{'per weight':>10} {'barriers':>8}  the K loop's most frequent instructions")  # fmt: skip
    bad = []
    for kind, tile, block_m in all_tiles():
        s = compile_tile(kind, tile, block_m)
        top = ", ".join(f"{op} {n}" for op, n in sorted(s.loop.items(), key=lambda x: -x[1])[:9])
        print(
            f"{kind:5} {str(tile):42} {block_m:>3} {s.registers:>4} {s.stack:>5} {s.per_weight:>10.1f} "
            f"{s.loop.get('BAR', 0):>8}  {top}"
        )
        most = MAX_PER_WEIGHT_BYTES if tile[-1] == "bytes" else MAX_PER_WEIGHT
        if s.stack or not s.loop or (tile[-1] in ("shared", "shared8", "bytes") and s.per_weight > most):
            bad.append((kind, tile, block_m))
    from mygpt.kernels import nf4

    sums = {
        "partial_ptr": "*fp32",
        "out_ptr": "*bf16",
        "size": "i32",
        "SPLIT": "constexpr",
        "BLOCK": "constexpr",
    }
    regs, stack, _ = _compile(nf4._sum_splits_kernel, sums, {"SPLIT": 8, "BLOCK": nf4.SUM_BLOCK}, 4, 1)
    others = [("nf4 split-K sum, 8 splits", regs, stack, {})]
    for name, regs, stack, loop in others + lora_kernels():
        top = ", ".join(f"{op} {n}" for op, n in sorted(loop.items(), key=lambda x: -x[1])[:9])
        print(f"{name:48} {'':>3} {regs:>4} {stack:>5} {'':>10} {'':>8}  {top}")
        if stack:
            bad.append((name, regs, stack))
    if check and bad:
        print(
            "spills, no K loop found, or over",
            MAX_PER_WEIGHT,
            f"({MAX_PER_WEIGHT_BYTES} for bytes) instructions a weight:",
            bad,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
