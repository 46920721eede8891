"""Per-device FLOPs, HBM traffic and collectives of a compiled XLA program, read from its HLO text
(`compiled.as_text()`), with every computation weighted by how many times it runs.

XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count; our model scans its layers and the
training step scans micro-batches, so its figures miss most of a step. Here every computation gets an execution
count: the entry runs once, a while body runs its caller's count times the trip count (the condition once more),
fused, called, branch and async computations run as often as their caller. A trip count is XLA's
`known_trip_count` when printed, else read from the loop condition (`counter < N`, with the counter's initial value
and step, the form `lax.scan` and `fori_loop` compile to); a loop whose count cannot be read is counted once and
listed in `HloStats.unknown_trip_loops`.

FLOPs are those of dots, convolutions (the TPU compiler writes most dots as convolutions) and ragged dots (which it
compiles to Mosaic kernels, custom calls whose shapes still give the work); other custom kernels are listed in
`HloStats.opaque_kernels`, their work uncounted.

Upper bounds and estimates: every branch of a conditional is counted at the caller's count; HBM traffic assumes
each instruction outside fusions reads its operands and writes its result once, except that buffers in on-chip
memory (a layout with memory space `S(n)`, n != 0) cost nothing, an operand that is only sliced reads the slices,
and an in-place dynamic-update-slice writes only the update; a ragged-all-to-all is charged its whole output
buffer, which is sized for the worst case.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Union

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                    "collective-permute")

# Instructions that move no data themselves: aliases, control flow (what it calls is counted), async wrappers.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-start",
               "async-update", "async-done"}
_SLICING = {"slice", "dynamic-slice", "gather"}
_VALUE_PRESERVING = ("bitcast", "copy", "convert", "reshape")  # looked through when tracing a loop counter


# --------------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Array:
    """One array shape: element type, dimensions, and the memory space its layout names (0: HBM)."""

    dtype: str
    dims: tuple[int, ...]
    memory_space: int = 0

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> float:
        """pred: 1 byte per element; token and opaque: 0; every other type names its bit width (bf16, s4, c64)."""
        width = 8 if self.dtype == "pred" else int(re.search(r"\d+|$", self.dtype).group() or 0)
        return self.elements * width / 8


Shape = Union[Array, tuple]  # a tuple holds Shapes


def parse_shape(text: str) -> Shape:
    """`f32[8,128]{1,0:T(8,128)S(1)}`, `s32[]`, `(bf16[2], (f32[], u32[]))`."""
    text = text.strip()
    if text.startswith("("):
        return tuple(parse_shape(part) for part in _split_top(text[1:_closing(text, 0)]) if part.strip())
    match = re.match(r"([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?", text)
    if not match:
        raise ValueError(f"not an HLO shape: {text!r}")
    dims = tuple(int(d.strip().lstrip("<=")) for d in match.group(2).split(",") if d.strip())
    space = re.search(r"(?<![A-Za-z])S\((\d+)\)", match.group(3) or "")
    return Array(match.group(1), dims, int(space.group(1)) if space else 0)


def _arrays(shape: Shape | None):
    if isinstance(shape, Array):
        yield shape
    elif shape is not None:
        for element in shape:
            yield from _arrays(element)


def _bytes(shape: Shape | None) -> float:
    return sum(array.bytes for array in _arrays(shape))


def _hbm_bytes(shape: Shape | None) -> float:
    return sum(array.bytes for array in _arrays(shape) if array.memory_space == 0)


def _in_hbm(shape: Shape | None) -> bool:
    return any(array.memory_space == 0 for array in _arrays(shape))


# --------------------------------------------------------------------------------------------------- text scanning

_TOKEN = re.compile(r'\\.|["()\[\]{},]')  # what the scanners act on (an escaped character is skipped whole)


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`, past nested brackets and double-quoted strings."""
    depth, quoted = 0, False
    for token in _TOKEN.finditer(text, start):
        char = token.group()
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "([{":
            depth += 1
        elif not quoted and char in ")]}":
            depth -= 1
            if depth == 0:
                return token.start()
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets and strings (metadata and backend_config hold both)."""
    parts, depth, quoted, last = [], 0, False, 0
    for token in _TOKEN.finditer(text):
        char = token.group()
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[last:token.start()])
            last = token.end()
    parts.append(text[last:])
    return parts


def _ints(text: str | None) -> list[int]:
    return [int(value) for value in re.findall(r"-?\d+", text or "")]


# --------------------------------------------------------------------------------------------------- parsed HLO


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: Shape
    opcode: str
    operands: tuple[str, ...]
    operand_shapes: tuple[Shape | None, ...]  # when printed beside the operand names (older printers)
    literal: str  # the text between the parentheses: a constant's value, a parameter's number
    attributes: dict[str, str]
    is_root: bool

    def callee(self, key: str) -> str:
        return self.attributes.get(key, "").strip().lstrip("%")


@dataclasses.dataclass(frozen=True)
class _Computation:
    name: str
    instructions: tuple[_Instruction, ...]
    by_name: dict[str, _Instruction]
    root: _Instruction | None

    def operand_shape(self, instruction: _Instruction, index: int) -> Shape | None:
        if instruction.operand_shapes[index] is not None:
            return instruction.operand_shapes[index]
        source = self.by_name.get(instruction.operands[index])
        return source.shape if source else None

    def producer(self, name: str, through=("bitcast",)) -> _Instruction | None:
        """The instruction behind `name`, looking through the given value-preserving ops."""
        instruction = self.by_name.get(name)
        while instruction is not None and instruction.opcode in through and instruction.operands:
            instruction = self.by_name.get(instruction.operands[0])
        return instruction

    def parameter(self, number: int) -> _Instruction | None:
        return next((i for i in self.instructions if i.opcode == "parameter" and i.literal.strip() == str(number)),
                    None)


@dataclasses.dataclass(frozen=True)
class _Module:
    computations: dict[str, _Computation]
    entry: str
    num_devices: int


_COMPUTATION_HEADER = re.compile(r"(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION_HEAD = re.compile(r"\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_COMMENT = re.compile(r"/\*.*?\*/")


def _parse_instruction(line: str) -> _Instruction | None:
    """`[ROOT] %name = shape opcode(operands), key=value, ...`."""
    head = _INSTRUCTION_HEAD.match(line)
    if not head:
        return None
    rest = line[head.end():]
    shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else re.match(r"\S*", rest).end()
    opcode = _OPCODE.match(rest, shape_end)
    if not opcode:
        return None
    close = _closing(rest, opcode.end() - 1)
    literal = rest[opcode.end():close]
    operands, operand_shapes = [], []
    if opcode.group(1) not in ("constant", "parameter") and literal.strip():
        for operand in _split_top(literal):
            shape_text, _, name = operand.strip().rpartition(" ")
            operands.append(name.lstrip("%"))
            operand_shapes.append(parse_shape(shape_text) if shape_text.strip() else None)
    attributes = {}
    for part in _split_top(rest[close + 1:]):
        key, equals, value = part.partition("=")
        if equals:
            attributes[key.strip()] = value.strip()
    return _Instruction(head.group(2), parse_shape(rest[:shape_end]), opcode.group(1), tuple(operands),
                        tuple(operand_shapes), literal, attributes, bool(head.group(1)))


def _parse_module(text: str) -> _Module:
    computations, entry, current, body = {}, None, None, []
    header = re.search(r"^HloModule\b.*$", text, re.M)
    header = header.group() if header else ""
    partitions, replicas = (re.search(rf"\b{key}=(\d+)", header) for key in ("num_partitions", "replica_count"))
    num_devices = (int(partitions.group(1)) if partitions else 1) * (int(replicas.group(1)) if replicas else 1)
    for line in text.splitlines():
        if current is None:
            if match := _COMPUTATION_HEADER.match(line):
                current, body = match.group(2), []
                entry = current if match.group(1) else entry
        elif line.strip() == "}":
            root = next((i for i in body if i.is_root), body[-1] if body else None)
            computations[current] = _Computation(current, tuple(body), {i.name: i for i in body}, root)
            current = None
        elif instruction := _parse_instruction(_COMMENT.sub("", line)):
            body.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return _Module(computations, entry, num_devices)


# --------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction (a fused or async-wrapped one included). `bytes`: what it produces per device and
    execution (a ragged-all-to-all: its whole output buffer, sized for the worst case, so its `wire_bytes` are an
    upper bound); `group_size`: devices per group; `executions`: per program call; `loop_trips`: the trip counts
    of the loops around it, outermost first."""

    name: str
    kind: str
    bytes: float
    group_size: int
    executions: int
    loop_trips: tuple[int, ...]

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends over the interconnect per execution (ring algorithms)."""
        n = self.group_size
        if self.kind == "collective-permute":
            return self.bytes
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2 * self.bytes * (n - 1) / n
        if self.kind == "reduce-scatter":
            return self.bytes * (n - 1)  # its input is n times its output
        return self.bytes * (n - 1) / n  # all-gather, all-to-all, ragged-all-to-all


@dataclasses.dataclass(frozen=True)
class Loop:
    """A while loop that starts `executions` times per program call and runs `trips` iterations each time (1 when
    the count could not be read: `trip_count_known` False)."""

    name: str
    body: str
    trips: int
    executions: int
    trip_count_known: bool


@dataclasses.dataclass(frozen=True)
class HloStats:
    """Per device and program call: `flops` (2 x the multiply-adds of every dot, ragged dot and convolution),
    `hbm_bytes` (estimated HBM reads + writes), the collectives, the while loops, the names of the loops whose
    trip count could not be read (counted once), and of the custom kernels (Pallas, Mosaic) whose FLOPs the HLO does
    not show (their operands and results count as traffic; what they compute is missing from `flops`)."""

    flops: float
    hbm_bytes: float
    collectives: tuple[Collective, ...]
    loops: tuple[Loop, ...]
    unknown_trip_loops: tuple[str, ...]
    opaque_kernels: tuple[str, ...]
    # The part of `flops` in ragged dots (MoE expert matmuls): counted over every row of their buffers, which the
    # expert-parallel dispatch sizes for the worst case, while the kernels stop at the rows routed at run time: an
    # upper bound on their work.
    ragged_flops: float = 0.0
    # The HBM bytes of those kernels' row operands and results (not their expert weights), also over whole buffers.
    ragged_row_bytes: float = 0.0

    def collective_bytes_by_kind(self) -> dict[str, float]:
        """Bytes each device sends per program call, by collective kind."""
        totals: dict[str, float] = {}
        for collective in self.collectives:
            totals[collective.kind] = totals.get(collective.kind, 0.0) + collective.wire_bytes * collective.executions
        return totals

    @property
    def total_collective_bytes(self) -> float:
        return sum(self.collective_bytes_by_kind().values())


# --------------------------------------------------------------------------------------------------- analysis


def analyze(hlo_text: str) -> HloStats:
    """The counts of one compiled program from its HLO text (`compiled.as_text()`; SPMD programs are per device)."""
    module = _parse_module(hlo_text)
    local: dict[str, tuple[float, float, list, float, float]] = {}  # per computation and run: flops, HBM bytes,
    flops = hbm_bytes = ragged_flops = ragged_rows = 0.0        # collectives, ragged-dot flops and row bytes
    collectives: list[Collective] = []
    loops: list[Loop] = []
    pending = [(module.entry, 1, (), False)]  # computation, executions, enclosing trip counts, inside a fusion
    while pending:
        name, executions, trips, fused = pending.pop()
        computation = module.computations.get(name)
        if computation is None:
            continue
        if name not in local:
            local[name] = (sum(_flops(computation, i) for i in computation.instructions),
                           0.0 if fused else sum(_traffic(module, computation, i) for i in computation.instructions),
                           _collectives(computation, fused, module.num_devices),
                           sum(_flops(computation, i) for i in computation.instructions if _is_ragged(i)),
                           0.0 if fused else sum(_ragged_row_bytes(computation, i) for i in computation.instructions))
        computation_flops, computation_bytes, computation_collectives, computation_ragged, rows = local[name]
        flops += executions * computation_flops
        ragged_flops += executions * computation_ragged
        ragged_rows += executions * rows
        hbm_bytes += executions * computation_bytes
        collectives.extend(Collective(*found, executions=executions, loop_trips=trips)
                           for found in computation_collectives)
        for instruction in computation.instructions:
            opcode, inner = instruction.opcode, (executions, trips, fused)
            if opcode == "while":
                count = _trip_count(module, computation, instruction)
                loops.append(Loop(instruction.name, instruction.callee("body"), count or 1, executions,
                                  count is not None))
                count = count or 1
                pending.append((instruction.callee("body"), executions * count, trips + (count,), fused))
                pending.append((instruction.callee("condition"), executions * (count + 1), trips + (count,), fused))
            elif opcode == "fusion":
                pending.append((instruction.callee("calls"), executions, trips, True))
            elif opcode == "call":
                pending.append((instruction.callee("to_apply"), *inner))
            elif opcode == "async-start":
                pending.append((instruction.callee("calls"), *inner))
            elif opcode == "conditional":
                branches = instruction.attributes.get("branch_computations", "").strip("{}").split(",")
                branches += [instruction.callee("true_computation"), instruction.callee("false_computation")]
                pending.extend((branch.strip().lstrip("%"), *inner) for branch in branches if branch.strip())
    unknown = tuple(loop.name for loop in loops if not loop.trip_count_known)
    opaque = tuple(i.name for name in local for i in module.computations[name].instructions if _is_opaque_kernel(i))
    return HloStats(flops, hbm_bytes, tuple(collectives), tuple(loops), unknown, opaque, ragged_flops, ragged_rows)


def _ragged_row_bytes(computation: _Computation, instruction: _Instruction) -> float:
    """A ragged-dot kernel's row operand (lhs [M, K]) and result [M, N], in HBM."""
    if not _is_ragged_dot_kernel(instruction) or len(instruction.operands) < 2:
        return 0.0
    lhs = computation.operand_shape(instruction, len(instruction.operands) - 2)
    return _hbm_bytes(lhs) + _hbm_bytes(instruction.shape)


def _is_ragged(instruction: _Instruction) -> bool:
    return instruction.opcode == "ragged-dot" or _is_ragged_dot_kernel(instruction)


# ----- FLOPs


def _flops(computation: _Computation, instruction: _Instruction) -> float:
    if instruction.opcode in ("dot", "ragged-dot"):
        lhs = computation.operand_shape(instruction, 0)
        if not isinstance(lhs, Array) or not isinstance(instruction.shape, Array):
            return 0.0
        contracting = _ints(instruction.attributes.get("lhs_contracting_dims"))
        flops = 2.0 * instruction.shape.elements * math.prod(lhs.dims[d] for d in contracting)
        if instruction.opcode == "ragged-dot" and set(_ints(instruction.attributes.get("lhs_ragged_dims"))) & set(
                contracting):  # ragged contraction: each row meets one group of the [G, ...] result
            group_sizes = computation.operand_shape(instruction, 2)
            flops /= group_sizes.dims[-1] if isinstance(group_sizes, Array) and group_sizes.dims else 1
        return flops
    if instruction.opcode == "convolution":
        return _convolution_flops(computation, instruction)
    if _is_ragged_dot_kernel(instruction) and len(instruction.operands) >= 2:
        # The TPU compiler turns ragged-dot into a Mosaic kernel: ..., lhs [M, K], rhs [G, K, N] -> [M, N].
        lhs = computation.operand_shape(instruction, len(instruction.operands) - 2)
        if isinstance(lhs, Array) and isinstance(instruction.shape, Array) and len(lhs.dims) == 2:
            return 2.0 * instruction.shape.elements * lhs.dims[1]
    return 0.0


def _is_ragged_dot_kernel(instruction: _Instruction) -> bool:
    return instruction.opcode == "custom-call" and "ragged_dot_tiling" in instruction.attributes.get(
        "frontend_attributes", "")


def _is_opaque_kernel(instruction: _Instruction) -> bool:
    """A Pallas/Mosaic kernel computing floating-point results whose work the HLO does not show (the ragged dots
    excepted: their shapes give it)."""
    return (instruction.opcode == "custom-call" and "tpu_custom_call" in instruction.attributes.get(
        "custom_call_target", "") and not _is_ragged_dot_kernel(instruction)
        and any(array.dtype.startswith(("f", "bf", "c")) for array in _arrays(instruction.shape)))


def _convolution_flops(computation: _Computation, instruction: _Instruction) -> float:
    """2 x output batch x output features x kernel input features x, per spatial dimension, the (output position,
    kernel position) pairs that land on an input element rather than on padding or a dilation hole. The TPU
    compiler writes dots as convolutions, a batched dot with window size = batch, stride = batch - 1 and
    lhs_dilate = batch: counting valid pairs gets it exactly, where `prod(kernel) / features` counts every batch
    against every other."""
    lhs, rhs, out = (computation.operand_shape(instruction, 0), computation.operand_shape(instruction, 1),
                     instruction.shape)
    labels = re.fullmatch(r"(\w+)_(\w+)->(\w+)", instruction.attributes.get("dim_labels", ""))
    if not (labels and all(isinstance(shape, Array) for shape in (lhs, rhs, out))):
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    window = dict(item.split("=", 1) for item in instruction.attributes.get("window", "").strip("{}").split()
                  if "=" in item)
    pairs = 1
    for index, label in enumerate(sorted(label for label in out_labels if label.isdigit())):
        fields = {key: value.split("x")[index] for key, value in window.items()}  # `3x3`: one per dimension
        pairs *= _valid_pairs(out.dims[out_labels.index(label)], lhs.dims[lhs_labels.index(label)],
                              rhs.dims[rhs_labels.index(label)], stride=int(fields.get("stride", 1)),
                              pad_low=int(fields.get("pad", "0_0").split("_")[0]),
                              lhs_dilate=int(fields.get("lhs_dilate", 1)), rhs_dilate=int(fields.get("rhs_dilate", 1)))
    batch, features = out.dims[out_labels.index("b")], out.dims[out_labels.index("f")]
    return 2.0 * batch * features * rhs.dims[rhs_labels.index("i")] * pairs


def _valid_pairs(out_size: int, in_size: int, kernel_size: int, *, stride: int, pad_low: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
    """Pairs (o, k) whose position o*stride - pad_low + k*rhs_dilate in the padded, dilated input is a real input
    element (a multiple of lhs_dilate within the input). For each o the valid k form an arithmetic progression."""
    divisor = math.gcd(rhs_dilate, lhs_dilate)
    period = lhs_dilate // divisor
    inverse = pow(rhs_dilate // divisor, -1, period) if period > 1 else 0
    last = (in_size - 1) * lhs_dilate
    total = 0
    for o in range(out_size):
        start = o * stride - pad_low
        if start % divisor:
            continue
        first = (-(start // divisor) * inverse) % period if period > 1 else 0  # k = first (mod period)
        low, high = max(0, -(start // rhs_dilate)), min(kernel_size - 1, (last - start) // rhs_dilate)
        if high >= low:
            total += (high - first) // period - (low - 1 - first) // period
    return total


# ----- HBM traffic


def _traffic(module: _Module, computation: _Computation, instruction: _Instruction) -> float:
    """HBM bytes one execution of an instruction outside fusions reads and writes. An async pair is counted once:
    the start reads the operands, the done writes the result."""
    opcode = instruction.opcode
    if opcode in _NO_TRAFFIC or opcode.endswith("-update") or (
            opcode == "custom-call" and "AllocateBuffer" in instruction.attributes.get("custom_call_target", "")):
        return 0.0
    operands = [computation.operand_shape(instruction, i) for i in range(len(instruction.operands))]
    if opcode.endswith("-done"):
        return _hbm_bytes(instruction.shape)
    read = sum(_hbm_bytes(shape) for shape in operands)
    if opcode.endswith("-start"):
        return read
    if opcode == "dynamic-update-slice":  # in place: reads and writes the update
        return read - _hbm_bytes(operands[0]) + (_bytes(operands[1]) if _in_hbm(instruction.shape) else 0.0)
    if opcode in _SLICING:
        read += (_bytes(instruction.shape) if _in_hbm(operands[0]) else 0.0) - _hbm_bytes(operands[0])
    if opcode == "fusion" and (fused := module.computations.get(instruction.callee("calls"))):
        read = sum(_fused_read(module, fused, number, shape) for number, shape in enumerate(operands))
        return read + _fused_write(fused, instruction.shape)
    return read + _hbm_bytes(instruction.shape)


def _fused_read(module: _Module, fused: _Computation, number: int, shape: Shape | None) -> float:
    """A fusion reads an operand whole, or only the slices its fused computation takes of it, or nothing where the
    operand is the buffer a dynamic-update-slice updates in place."""
    if not _in_hbm(shape):
        return 0.0
    sliced = _sliced_bytes(module, fused, number)
    return _hbm_bytes(shape) if sliced is None else min(sliced, _hbm_bytes(shape))


def _sliced_bytes(module: _Module, fused: _Computation, number: int) -> float | None:
    """Bytes of a fused parameter that its uses read when they only slice it or update it in place (nested fusions
    followed), None when some use reads it whole."""
    parameter = fused.parameter(number)
    names, total, seen_use = [parameter.name] if parameter else [], 0.0, False
    while names:
        name = names.pop()
        if fused.root is not None and name == fused.root.name:
            return None  # the fusion's result is (a bitcast of) the operand itself
        for user in fused.instructions:
            for index, operand in enumerate(user.operands):
                if operand != name:
                    continue
                seen_use = True
                if user.opcode == "bitcast":
                    names.append(user.name)
                elif user.opcode in _SLICING and index == 0:
                    total += _bytes(user.shape)
                elif user.opcode == "fusion" and (inner := module.computations.get(user.callee("calls"))):
                    part = _sliced_bytes(module, inner, index)
                    if part is None:
                        return None
                    total += part
                elif not (user.opcode == "dynamic-update-slice" and index == 0):
                    return None
    return total if seen_use else None


def _fused_write(fused: _Computation, shape: Shape) -> float:
    """A fusion writes its result, or only the update where the result is a dynamic-update-slice (in place)."""
    root = fused.producer(fused.root.name) if fused.root else None
    if root is not None and root.opcode == "tuple" and isinstance(shape, tuple) and len(shape) == len(root.operands):
        return sum(_written(fused, fused.producer(name), element) for name, element in zip(root.operands, shape))
    return _written(fused, root, shape)


def _written(fused: _Computation, producer: _Instruction | None, shape: Shape) -> float:
    if producer is not None and producer.opcode == "dynamic-update-slice":
        return _bytes(fused.operand_shape(producer, 1)) if _in_hbm(shape) else 0.0
    return _hbm_bytes(shape)


# ----- collectives


def _collectives(computation: _Computation, fused: bool, num_devices: int) -> list[tuple[str, str, float, int]]:
    """(name, kind, bytes, group size) of each collective instruction of a computation. A fused all-reduce that the
    fusion slices to this device's share (the TPU compiler's all-reduce-scatter fusion) is the reduce-scatter it
    implements, its bytes the fusion's result."""
    found = []
    root = computation.producer(computation.root.name) if computation.root else None
    for instruction in computation.instructions:
        kind = instruction.opcode.removesuffix("-start")
        if kind not in COLLECTIVE_KINDS:
            continue
        shape = instruction.shape
        if instruction.opcode.endswith("-start") and kind != "all-reduce" and isinstance(shape, tuple):
            shape = shape[1]  # (operands, results, context...)
        size = _bytes(shape)
        if fused and kind == "all-reduce" and root is not None and root.opcode == "dynamic-slice" and \
                computation.producer(root.operands[0]) is instruction:
            kind, size = "reduce-scatter", _bytes(root.shape)
        found.append((instruction.name, kind, size, _group_size(instruction.attributes, num_devices)))
    return found


def _group_size(attributes: dict[str, str], num_devices: int) -> int:
    """Devices per group, from any `replica_groups` form: explicit `{{0,1},{2,3}}`, iota `[groups,size]<=[...]`, or
    mesh `mesh['a'=2,'b'=4] {'b'}` (the product of the listed axes' sizes; a sub-axis `'a':(1)2` counts 2). A
    collective-permute: the devices its source-target pairs name. No groups: every device."""
    if "source_target_pairs" in attributes:
        return len(set(_ints(attributes["source_target_pairs"]))) or 1
    groups = attributes.get("replica_groups", "").strip()
    if groups.startswith(("mesh", "maximal_mesh")):
        if "{" not in groups:  # `mesh[...], device_ids=(...) {axes}`: the attribute split took the comma
            groups += " " + attributes.get("device_ids", "")
        sizes = dict(re.findall(r"'?([^',\[=\s]+)'?=(\d+)", groups[:groups.index("]")]))
        listed = groups[groups.rindex("{") + 1:groups.rindex("}")] if "{" in groups else ""
        size = 1
        for axis in filter(None, (token.strip() for token in listed.split(","))):
            sub_axis = re.search(r":\(\d+\)(\d+)$", axis)
            size *= int(sub_axis.group(1)) if sub_axis else int(sizes.get(axis.strip("'"), 1))
        return size
    if groups.startswith("["):
        return _ints(groups[:groups.index("]")])[-1]
    if first := re.match(r"\{\s*\{([^}]*)\}", groups):
        return len(_ints(first.group(1))) or num_devices
    return num_devices


# ----- loop trip counts


def _trip_count(module: _Module, caller: _Computation, loop: _Instruction) -> int | None:
    """A while loop's iterations: XLA's `known_trip_count`, else `counter OP N` at the condition's root (a compare,
    possibly fused) with the counter's initial value from the loop's operand tuple (0 unless a constant) and its
    step from the body (1 unless a constant is added or subtracted). None when the condition is of another form."""
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', loop.attributes.get("backend_config", ""))
    if known:
        return int(known.group(1))
    condition = module.computations.get(loop.callee("condition"))
    compare, outer = (condition.root, None) if condition else (None, None)
    if compare is not None and compare.opcode == "fusion":
        fused = module.computations.get(compare.callee("calls"))
        compare, outer, condition = (fused.root if fused else None), (condition, compare.operands), fused
    if compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    left, right = (_trace(condition, name, outer) for name in compare.operands)
    direction = compare.attributes.get("direction", "")
    if left and left[0] == "const":
        left, right = right, left
        direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)
    if not (left and left[0] == "counter" and right and right[0] == "const"):
        return None
    index, bound = left[1], right[1]
    start, step = _initial_value(caller, loop, index), _step(module, loop, index)
    if direction in ("LT", "LE") and step > 0:
        return max(0, -(-(bound - start + (direction == "LE")) // step))
    if direction in ("GT", "GE") and step < 0:
        return max(0, -(-(start - bound + (direction == "GE")) // -step))
    if direction == "NE" and step and (bound - start) % step == 0 and (bound - start) // step >= 0:
        return (bound - start) // step
    return None


def _trace(computation: _Computation, name: str, outer=None) -> tuple[str, int] | None:
    """('const', value), or ('counter', i) for element i of the loop state (a get-tuple-element of the parameter),
    looking through value-preserving ops and, with `outer` = (caller, operands), a fusion's parameters."""
    instruction = computation.producer(name, _VALUE_PRESERVING)
    if instruction is None:
        return None
    if instruction.opcode == "constant":
        return ("const", int(instruction.literal)) if re.fullmatch(r"\s*-?\d+\s*", instruction.literal) else None
    if instruction.opcode == "get-tuple-element":
        source = computation.by_name.get(instruction.operands[0])
        if source is not None and source.opcode == "parameter":
            return ("counter", int(instruction.attributes.get("index", "-1")))
    if instruction.opcode == "parameter" and outer is not None:
        caller, operands = outer
        number = int(instruction.literal)
        return _trace(caller, operands[number]) if number < len(operands) else None
    return None


def _initial_value(caller: _Computation, loop: _Instruction, index: int) -> int:
    state = caller.producer(loop.operands[0]) if loop.operands else None
    if state is not None and state.opcode == "tuple" and index < len(state.operands):
        traced = _trace(caller, state.operands[index])
        if traced and traced[0] == "const":
            return traced[1]
    return 0


def _step(module: _Module, loop: _Instruction, index: int) -> int:
    body = module.computations.get(loop.callee("body"))
    root = body.root if body else None
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return 1
    update = body.producer(root.operands[index], _VALUE_PRESERVING)
    if update is None or update.opcode not in ("add", "subtract") or len(update.operands) != 2:
        return 1
    first, second = (_trace(body, name) for name in update.operands)
    if update.opcode == "add" and second == ("counter", index):
        first, second = second, first
    if first == ("counter", index) and second and second[0] == "const":
        return second[1] if update.opcode == "add" else -second[1]
    return 1
