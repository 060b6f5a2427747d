"""What a cubin says, read with the cuobjdump that Triton bundles: resource usage, and the SASS
split into prologue, hot loop and epilogue.

The loop is found by its backward branch (``BRA`` to a lower address); the final ``BRA`` to
itself that pads every kernel is not a loop. Counts are static: each instruction once, whatever
branch skips it at run time (e.g. the cls-only tail of a kernel), so the model built on them is
an estimate of issued instructions, not a trace.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[0-9T]\s+")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FUNCTION = re.compile(r"Function (\S+?):?$")

# FLOPs of one MMA instruction, and the number of warps that issue it together (wgmma is
# issued by the 4 warps of a warpgroup for one product; mma.sync by each warp for its own).
_HGMMA_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"HMMA\.(16)(8)(\d+)")  # 16816: m16 n8 k16; 1688: m16 n8 k8


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    text: str  # operands


@dataclasses.dataclass(frozen=True)
class Resources:
    regs: int
    stack: int  # bytes per thread of stack frame (spill slots live here)
    shared_static: int  # bytes per block, besides Triton's dynamic shared memory
    local: int  # bytes per thread of local memory


def run_tool(path: str, *args: str) -> str:
    """stdout of a bundled CUDA tool; its warnings (nvdisasm's ELF format notice) are dropped."""
    done = subprocess.run([path, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def resources(cuobjdump: str, cubin_path: str) -> dict[str, Resources]:
    """``cuobjdump --dump-resource-usage`` per function name."""
    out, name = {}, None
    for line in run_tool(cuobjdump, "--dump-resource-usage", cubin_path).splitlines():
        if m := _FUNCTION.search(line.strip()):
            name = m.group(1)
        elif (m := _RESOURCE.search(line)) and name is not None:
            out[name] = Resources(*map(int, m.groups()))
    return out


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump --dump-sass`` text (one function), without the padding."""
    instrs = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        body = _PRED.sub("", m.group(2))
        opcode, _, operands = body.partition(" ")
        ins = Instr(int(m.group(1), 16), opcode, operands.strip())
        if opcode != "NOP" and _branch_target(ins) != ins.addr:  # the padding BRA-to-self
            instrs.append(ins)
    return instrs


def _branch_target(ins: Instr) -> int | None:
    if ins.opcode.split(".")[0] != "BRA":
        return None
    m = re.search(r"(?:^|[\s,`(])0x([0-9a-f]+)", ins.text)
    return int(m.group(1), 16) if m else None


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop: a branch back to a lower address.
    Outermost loops only, in address order (a nested loop lies inside its parent)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    spans = []
    for i, ins in enumerate(instrs):
        target = _branch_target(ins)
        if target is not None and target < ins.addr and target in index:
            spans.append((index[target], i))
    spans.sort(key=lambda s: (s[0], -s[1]))
    outer = []
    for first, last in spans:
        if outer and first <= outer[-1][1]:
            outer[-1] = (outer[-1][0], max(outer[-1][1], last))
        else:
            outer.append((first, last))
    return outer


@dataclasses.dataclass(frozen=True)
class Split:
    """The instructions (each executed per warp) of a kernel around its hot loop."""

    prologue: list[Instr]
    body: list[Instr]
    epilogue: list[Instr]
    n_loops: int  # outermost loops found; the body is the largest, others count as straight code


def split(instrs: list[Instr]) -> Split:
    """Prologue / hot loop / epilogue. No loop: everything is prologue."""
    found = loops(instrs)
    if not found:
        return Split(instrs, [], [], 0)
    first, last = max(found, key=lambda s: s[1] - s[0])
    return Split(instrs[:first], instrs[first:last + 1], instrs[last + 1:], len(found))


def mma_flops(ins: Instr) -> int:
    """FLOPs one warp's execution of this instruction contributes (0 if not an MMA)."""
    if m := _HGMMA_SHAPE.match(ins.opcode):
        m_, n, k = map(int, m.groups())
        return 2 * m_ * n * k // 4  # one warpgroup (4 warps) computes the m x n x k product
    if m := _HMMA_SHAPE.match(ins.opcode):
        m_, n, k = map(int, m.groups())
        return 2 * m_ * n * k
    return 0


def mma_kind(instrs: list[Instr]) -> str:
    kinds = {"HGMMA": "wgmma", "HMMA": "mma.sync"}
    found = sorted({kinds[i.opcode.split(".")[0]] for i in instrs if i.opcode.split(".")[0] in kinds})
    return "+".join(found) or "none"


def is_tf32(ins: Instr) -> bool:
    return mma_flops(ins) > 0 and "TF32" in ins.opcode


def access_bytes(ins: Instr) -> int:
    """Bytes per thread of a global load / cp.async, from the opcode's width modifier."""
    mods = ins.opcode.split(".")[1:]
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in mods:
            return size
    return 4


def memory_ops(instrs: list[Instr]) -> dict[str, dict[int, int]]:
    """{'ldg': {bytes: count}, 'ldgsts': ..., 'stg': ..., 'tma': {0: count}} of these instructions."""
    out: dict[str, dict[int, int]] = {"ldg": {}, "ldgsts": {}, "stg": {}, "tma": {}}
    for ins in instrs:
        op = ins.opcode.split(".")[0]
        kind = {"LDG": "ldg", "LDGSTS": "ldgsts", "STG": "stg", "UTMALDG": "tma", "UBLKCP": "tma"}.get(op)
        if kind:
            size = 0 if kind == "tma" else access_bytes(ins)
            out[kind][size] = out[kind].get(size, 0) + 1
    return out


def count(instrs: list[Instr], prefix: str) -> int:
    return sum(1 for i in instrs if i.opcode.startswith(prefix))
