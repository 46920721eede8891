"""`aot.hlo_stats` on real TPU executables (compiled here for a v6e:2x4 slice, nothing runs) and on hand-written HLO
text for the forms these small programs do not produce."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_gemma.aot import hlo_stats

# conftest's persistent compilation cache stores these executables but cannot load them back (a compile-only client
# has no devices to load onto); jax then compiles again, so the warning is only noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning")


@pytest.fixture(scope="module")
def devices():
    return topologies.get_topology_desc(platform="tpu", topology_name="v6e:2x4").devices


@pytest.fixture(scope="module")
def mesh(devices):
    return jax.make_mesh((8,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def mesh_2x4(devices):
    return jax.make_mesh((2, 4), ("a", "b"), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _input(mesh, shape, *spec, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def _compile(fn, *inputs):
    return jax.jit(fn).lower(*inputs).compile()


def _xla(compiled, key):
    costs = compiled.cost_analysis()
    return (costs[0] if isinstance(costs, (list, tuple)) else costs)[key]


def _matmul_flops(m, k, n):
    return 2 * m * k * n


# --------------------------------------------------------------------------------------------------- FLOPs


def test_sharded_matmul_flops_are_per_device_and_match_xla(mesh):
    compiled = _compile(lambda a, b: a @ b, _input(mesh, (1024, 512), "x", None), _input(mesh, (512, 256)))
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.flops == _matmul_flops(1024, 512, 256) / 8
    assert stats.flops == pytest.approx(_xla(compiled, "flops"), rel=0.03)
    assert stats.loops == () and stats.collectives == ()


def test_batched_dot_written_as_a_convolution_is_counted_exactly(mesh):
    compiled = _compile(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), _input(mesh, (8, 64, 128)),
                        _input(mesh, (8, 128, 256)))
    assert "convolution" in compiled.as_text()
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.flops == 8 * _matmul_flops(64, 128, 256)
    assert stats.flops == pytest.approx(_xla(compiled, "flops"), rel=0.03)


def test_scan_counts_every_iteration_where_xla_counts_one(mesh):
    def scan(x, w):
        return jax.lax.scan(lambda h, w_i: (h @ w_i, None), x, w)[0]

    compiled = _compile(scan, _input(mesh, (128, 512)), _input(mesh, (5, 512, 512)))
    stats = hlo_stats.analyze(compiled.as_text())
    one = _matmul_flops(128, 512, 512)
    assert stats.flops == 5 * one
    assert _xla(compiled, "flops") < 1.5 * one  # why this module exists
    assert [(loop.trips, loop.executions, loop.trip_count_known) for loop in stats.loops] == [(5, 1, True)]


def test_nested_scans_multiply_their_trip_counts(mesh):
    def nested(x, w):
        def outer(h, w_outer):
            return jax.lax.scan(lambda g, w_i: (jnp.tanh(g @ w_i), None), h, w_outer)[0], None
        return jax.lax.scan(outer, x, w)[0]

    compiled = _compile(nested, _input(mesh, (128, 256)), _input(mesh, (3, 4, 256, 256)))
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.flops == 12 * _matmul_flops(128, 256, 256)
    assert sorted((loop.trips, loop.executions) for loop in stats.loops) == [(3, 1), (4, 3)]
    assert stats.unknown_trip_loops == ()


@pytest.mark.parametrize("start, step, condition, trips", [(1, 3, lambda i: i < 10, 3), (9, -2, lambda i: i >= 0, 5)])
def test_while_loop_trip_count_uses_the_counters_start_and_step(mesh, start, step, condition, trips):
    def loop(x, w):
        return jax.lax.while_loop(lambda c: condition(c[0]), lambda c: (c[0] + step, jnp.tanh(c[1] @ w)),
                                  (start, x))[1]

    stats = hlo_stats.analyze(_compile(loop, _input(mesh, (128, 256)), _input(mesh, (256, 256))).as_text())
    assert [(loop.trips, loop.trip_count_known) for loop in stats.loops] == [(trips, True)]
    assert stats.flops == trips * _matmul_flops(128, 256, 256)


def test_data_dependent_trip_count_is_counted_once_and_reported(mesh):
    def loop(x, w, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]

    compiled = _compile(loop, _input(mesh, (128, 256)), _input(mesh, (256, 256)), _input(mesh, (), dtype=jnp.int32))
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.flops == _matmul_flops(128, 256, 256)
    assert len(stats.loops) == 1 and stats.unknown_trip_loops == (stats.loops[0].name,)
    assert stats.loops[0].trips == 1 and not stats.loops[0].trip_count_known


def test_ragged_dot_kernel_flops(mesh):
    """The TPU compiler turns ragged_dot into a Mosaic kernel (a custom call): its FLOPs come from the shapes, the
    tokens each multiplied by their group's [K, N] matrix. Its weight gradient compiles to a dense batched dot over
    the groups, G times that work; both as XLA counts them."""
    tokens, k, n, groups = 512, 256, 128, 8
    inputs = (_input(mesh, (tokens, k)), _input(mesh, (groups, k, n)), _input(mesh, (groups,), dtype=jnp.int32))
    forward = _compile(jax.lax.ragged_dot, *inputs)
    stats = hlo_stats.analyze(forward.as_text())
    assert " ragged-dot(" not in forward.as_text()  # no HLO ragged-dot left, only the kernel
    assert stats.flops == _matmul_flops(tokens, k, n) == pytest.approx(_xla(forward, "flops"), rel=0.03)
    assert stats.opaque_kernels == ()

    def weight_gradient(x, w, group_sizes):
        return jax.grad(lambda w: (jax.lax.ragged_dot(x, w, group_sizes) ** 2).sum())(w)

    backward = _compile(weight_gradient, *inputs)
    stats = hlo_stats.analyze(backward.as_text())
    assert stats.flops == (1 + groups) * _matmul_flops(tokens, k, n)
    assert stats.flops == pytest.approx(_xla(backward, "flops"), rel=0.03)


def test_pallas_kernels_are_listed_as_opaque(mesh):
    from jax.experimental import pallas as pl

    def double(x_ref, out_ref):
        out_ref[...] = x_ref[...] * 2

    def kernel(x):
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    fn = jax.shard_map(kernel, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    stats = hlo_stats.analyze(_compile(fn, _input(mesh, (8 * 256, 256), "x")).as_text())
    assert len(stats.opaque_kernels) == 1 and stats.flops == 0
    assert stats.hbm_bytes == 2 * 256 * 256 * 4  # what it reads and writes is still seen


def test_fsdp_training_scan_weights_collectives_and_flops_by_both_loops(mesh):
    """Weights sharded over the 8 devices, a rematerialised layer scan (5) inside a micro-batch scan (3), gradients
    accumulated: the all-gathers (mesh replica-group form) and the gradient reduce-scatters (TPU's fused
    all-reduce + slice) run 15 times, and the FLOPs are 4 matmuls (forward, recomputed forward, two backward) per
    layer and micro-batch."""
    def loss(w, x):
        layer = jax.checkpoint(lambda h, w_i: (jnp.tanh(h @ w_i), None))
        return (jax.lax.scan(layer, x, w)[0] ** 2).mean()

    def train(w, batches):
        def micro_step(grads, x):
            return grads + jax.grad(loss)(w, x), None
        return w - 0.1 * jax.lax.scan(micro_step, jnp.zeros_like(w), batches)[0]

    compiled = _compile(train, _input(mesh, (5, 512, 512), None, "x", None), _input(mesh, (3, 64, 512), None, "x"))
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.flops == 15 * 4 * _matmul_flops(64 // 8, 512, 512)
    kinds = {collective.kind for collective in stats.collectives}
    assert kinds == {"all-gather", "reduce-scatter"}
    for collective in stats.collectives:
        assert (collective.group_size, collective.executions, collective.loop_trips) == (8, 15, (3, 5))
        if collective.kind == "reduce-scatter":  # this device's f32 share of one layer's gradient
            assert collective.bytes == 512 // 8 * 512 * 4
            assert collective.wire_bytes == collective.bytes * 7
    assert stats.collective_bytes_by_kind()["reduce-scatter"] == pytest.approx(
        sum(c.wire_bytes * 15 for c in stats.collectives if c.kind == "reduce-scatter"))


# --------------------------------------------------------------------------------------------------- collectives


def test_shard_map_collectives_kinds_bytes_and_groups(mesh):
    def collectives(x):  # x: this device's [128, 128] f32
        return (jax.lax.all_gather(x, "x", tiled=True), jax.lax.psum(x, "x"),
                jax.lax.psum_scatter(x, "x", tiled=True), jax.lax.all_to_all(x, "x", 0, 0, tiled=True))

    fn = jax.shard_map(collectives, mesh=mesh, in_specs=P("x"), out_specs=(P(), P(), P("x"), P("x")),
                       check_vma=False)
    stats = hlo_stats.analyze(_compile(fn, _input(mesh, (1024, 128), "x")).as_text())
    shard = 128 * 128 * 4
    by_kind = {collective.kind: collective for collective in stats.collectives}
    assert sorted(by_kind) == ["all-gather", "all-reduce", "all-to-all", "reduce-scatter"]
    assert len(stats.collectives) == 4
    assert {kind: (c.bytes, c.group_size, c.executions) for kind, c in by_kind.items()} == {
        "all-gather": (8 * shard, 8, 1), "all-reduce": (shard, 8, 1), "reduce-scatter": (shard / 8, 8, 1),
        "all-to-all": (shard, 8, 1)}
    assert {kind: c.wire_bytes for kind, c in by_kind.items()} == {
        "all-gather": 7 * shard, "all-reduce": 2 * shard * 7 / 8, "reduce-scatter": shard * 7 / 8,
        "all-to-all": shard * 7 / 8}
    assert stats.total_collective_bytes == sum(c.wire_bytes for c in stats.collectives)


@pytest.mark.parametrize("axis, group", [("b", 4), ("a", 2)])
def test_group_size_follows_the_mesh_axis(mesh_2x4, axis, group):
    fn = jax.shard_map(lambda x: jax.lax.psum(x, axis), mesh=mesh_2x4, in_specs=P("a", "b"), out_specs=P("a", "b"),
                       check_vma=False)
    stats = hlo_stats.analyze(_compile(fn, _input(mesh_2x4, (256, 512), "a", "b")).as_text())
    [collective] = stats.collectives
    assert (collective.kind, collective.group_size, collective.bytes) == ("all-reduce", group, 128 * 128 * 4)


def test_collective_inside_a_scan_runs_every_iteration(mesh):
    def body(x):
        return jax.lax.scan(lambda h, _: (jax.lax.psum(h * 2, "x"), None), x, None, length=7)[0]

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    stats = hlo_stats.analyze(_compile(fn, _input(mesh, (1024, 128), "x")).as_text())
    [collective] = stats.collectives
    assert (collective.kind, collective.executions, collective.loop_trips) == ("all-reduce", 7, (7,))
    assert stats.collective_bytes_by_kind() == {"all-reduce": 7 * collective.wire_bytes}


def test_ragged_all_to_all_compiles_for_tpu_and_is_found(mesh):
    """CPU has no ragged-all-to-all; the TPU compiler is the only place this program compiles."""
    def exchange(x, output, input_offsets, send_sizes, output_offsets, receive_sizes):
        return jax.lax.ragged_all_to_all(x, output, input_offsets, send_sizes, output_offsets, receive_sizes,
                                         axis_name="x")

    fn = jax.shard_map(exchange, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))
    sizes = [_input(mesh, (64,), "x", dtype=jnp.int32)] * 4
    stats = hlo_stats.analyze(_compile(fn, _input(mesh, (8 * 64, 128), "x"), _input(mesh, (8 * 96, 128), "x"),
                                       *sizes).as_text())
    [collective] = stats.collectives
    buffer = 96 * 128 * 4  # this device's output buffer: the worst case, hence an upper bound
    assert (collective.kind, collective.bytes, collective.group_size) == ("ragged-all-to-all", buffer, 8)
    assert collective.wire_bytes == buffer * 7 / 8


# --------------------------------------------------------------------------------------------------- HBM traffic


def test_elementwise_hbm_bytes_close_to_xla(mesh):
    compiled = _compile(lambda a, b: jnp.tanh(a) * b + 1, _input(mesh, (2048, 1024), "x"),
                        _input(mesh, (2048, 1024), "x"))
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.hbm_bytes >= 3 * 256 * 1024 * 4  # two operands read, one result written
    assert 0.5 < stats.hbm_bytes / _xla(compiled, "bytes accessed") < 2


def test_scan_hbm_bytes_grow_by_the_body_per_trip(mesh):
    """Each step reads its [2048, 4096] f32 slice of xs from HBM (the carry stays on chip); XLA counts it once."""
    def scan(h, xs):
        return jax.lax.scan(lambda carry, x: (jnp.tanh(carry + x), None), h, xs)[0]

    short, long = (_compile(scan, _input(mesh, (2048, 4096)), _input(mesh, (trips, 2048, 4096))) for trips in (2, 6))
    ours = [hlo_stats.analyze(compiled.as_text()).hbm_bytes for compiled in (short, long)]
    step_slice = 2048 * 4096 * 4
    assert ours[1] - ours[0] == pytest.approx(4 * step_slice, rel=0.01)
    assert abs(_xla(long, "bytes accessed") - _xla(short, "bytes accessed")) < step_slice


# --------------------------------------------------------------------------------------------------- HLO text forms

# (A backslash ends a line that continues on the next: HLO prints one instruction per line.)
_HANDWRITTEN = """\
HloModule handwritten, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%wrapped_reduce_scatter (p: f32[64,16]) -> f32[8,16] {
  %p = f32[64,16]{1,0} parameter(0)
  ROOT %rs = f32[8,16]{1,0} reduce-scatter(%p), replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
}

%fused_dot (x: f32[16,16], y: f32[16,16]) -> f32[16,16] {
  %x = f32[16,16]{1,0} parameter(0)
  %y = f32[16,16]{1,0} parameter(1)
  ROOT %dot = f32[16,16]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}, \
      metadata={op_name="a, b={c}(d) calls=%no \\"q\\"" source_line=3}
}

%known_body (state: (s32[], f32[16,16], /*index=2*/f32[16,16])) -> (s32[], f32[16,16], /*index=2*/f32[16,16]) {
  %state = (s32[], f32[16,16]{1,0}, /*index=2*/f32[16,16]{1,0:T(8,128)S(1)}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[16,16]{1,0} get-tuple-element(%state), index=1
  %fusion = f32[16,16]{1,0:T(8,128)S(1)} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %part = f32[2,16]{1,0} slice(%x), slice={[0:2], [0:16]}
  %ag-start = (f32[2,16]{1,0}, f32[16,16]{1,0}) all-gather-start(%part), \
      replica_groups=mesh['x'=2,'y'=4] {'y','x'}, dimensions={0}
  %ag-done = f32[16,16]{1,0} all-gather-done(%ag-start)
  %ar = f32[16,16]{1,0} all-reduce(%ag-done), replica_groups=[2,4]<=[8], to_apply=%add
  %sub = f32[16,16]{1,0} all-reduce(%ar), replica_groups=mesh['x'=2,'y'=4] {'y':(1)2}, to_apply=%add
  ROOT %out = (s32[], f32[16,16]{1,0}, /*index=2*/f32[16,16]{1,0:T(8,128)S(1)}) tuple(%i, %sub, %fusion)
}

%opaque_condition (state: (s32[], f32[16,16], f32[16,16])) -> pred[] {
  %state = (s32[], f32[16,16]{1,0}, f32[16,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %j = s32[] get-tuple-element(%state), index=0
  ROOT %lt = pred[] compare(%i, %j), direction=LT
}

%unknown_body (state: (s32[], f32[16,16], f32[16,16])) -> (s32[], f32[16,16], f32[16,16]) {
  %state = (s32[], f32[16,16]{1,0}, f32[16,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[16,16]{1,0} get-tuple-element(%state), index=1
  %dot = f32[16,16]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %permute = (f32[16,16]{1,0}, f32[16,16]{1,0}, u32[], u32[]) collective-permute-start(%dot), \
      source_target_pairs={{0,1},{1,0}}
  %permuted = f32[16,16]{1,0} collective-permute-done(%permute)
  ROOT %out = (s32[], f32[16,16]{1,0}, f32[16,16]{1,0}) tuple(%i, %permuted, %x)
}

%branch_a (p: f32[16,16]) -> f32[16,16] {
  %p = f32[16,16]{1,0} parameter(0)
  ROOT %dot = f32[16,16]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%branch_b (p: f32[16,16]) -> f32[16,16] {
  %p = f32[16,16]{1,0} parameter(0)
  ROOT %dot = f32[16,16]{1,0} dot(%p, %p), lhs_contracting_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main (p0: f32[16,16], p1: s32[], p2: f32[64,16]) -> f32[16,16] {
  %p0 = f32[16,16]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[64,16]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %on_chip = f32[16,16]{1,0:T(8,128)S(1)} copy(%p0)
  %init = (s32[], f32[16,16]{1,0}, /*index=2*/f32[16,16]{1,0:T(8,128)S(1)}) tuple(%zero, %p0, %on_chip)
  %known = (s32[], f32[16,16]{1,0}, /*index=2*/f32[16,16]{1,0:T(8,128)S(1)}) while(%init), \
      condition=%opaque_condition, body=%known_body, backend_config={"known_trip_count":{"n":"4"},"other":[1,2]}
  %unknown = (s32[], f32[16,16]{1,0}, f32[16,16]{1,0}) while(%init), condition=%opaque_condition, body=%unknown_body
  %x = f32[16,16]{1,0} get-tuple-element(%known), index=1
  %branch = f32[16,16]{1,0} conditional(%p1, %x, %x), branch_computations={%branch_a, %branch_b}
  %called = f32[16,16]{1,0} call(%x), to_apply=%branch_a
  %rs-start = ((f32[64,16]{1,0}), f32[8,16]{1,0}, u32[]) async-start(%p2), calls=%wrapped_reduce_scatter
  %rs-done = f32[8,16]{1,0} async-done(%rs-start)
  ROOT %result = f32[16,16]{1,0} add(%branch, %called)
}
"""


def test_handwritten_module_loops_calls_and_collective_forms():
    stats = hlo_stats.analyze(_HANDWRITTEN)
    dot = _matmul_flops(16, 16, 16)
    assert stats.flops == 4 * dot + 1 * dot + 2 * dot + dot  # known loop, unknown loop once, both branches, call
    assert [(loop.name, loop.trips, loop.executions, loop.trip_count_known) for loop in stats.loops] == [
        ("known", 4, 1, True), ("unknown", 1, 1, False)]
    assert stats.unknown_trip_loops == ("unknown",)
    found = {c.name: (c.kind, c.bytes, c.group_size, c.executions, c.loop_trips) for c in stats.collectives}
    shard = 16 * 16 * 4
    assert found == {
        "ag-start": ("all-gather", shard, 8, 4, (4,)),  # the result element of the start tuple; both mesh axes
        "ar": ("all-reduce", shard, 4, 4, (4,)),  # iota groups [2,4]: groups of 4
        "sub": ("all-reduce", shard, 2, 4, (4,)),  # a sub-axis of size 2
        "permute": ("collective-permute", shard, 2, 1, (1,)),
        "rs": ("reduce-scatter", 8 * 16 * 4, 8, 1, ()),  # inside an async wrapper, counted once
    }


def test_ragged_dot_instructions_count_each_row_against_one_group():
    """GPU keeps ragged-dot in the HLO: ragged rows (the forward) and a ragged contraction (the weight gradient,
    [G, K, N] from [M, K] and [M, N]) both cost 2 M K N."""
    text = """\
HloModule ragged, num_partitions=1

ENTRY %main (x: f32[6,4], w: f32[3,4,5], dy: f32[6,5], sizes: s64[3]) -> (f32[6,5], f32[3,4,5]) {
  %x = f32[6,4]{1,0} parameter(0)
  %w = f32[3,4,5]{2,1,0} parameter(1)
  %dy = f32[6,5]{1,0} parameter(2)
  %sizes = s64[3]{0} parameter(3)
  %y = f32[6,5]{1,0} ragged-dot(%x, %w, %sizes), lhs_contracting_dims={1}, rhs_contracting_dims={1}, \
      lhs_ragged_dims={0}, rhs_group_dims={0}
  %dw = f32[3,4,5]{2,1,0} ragged-dot(%x, %dy, %sizes), lhs_contracting_dims={0}, rhs_contracting_dims={0}, \
      lhs_ragged_dims={0}
  ROOT %out = (f32[6,5]{1,0}, f32[3,4,5]{2,1,0}) tuple(%y, %dw)
}
"""
    assert hlo_stats.analyze(text).flops == 2 * _matmul_flops(6, 4, 5)


def test_on_chip_buffers_cost_no_hbm_traffic():
    text = """\
HloModule memory_spaces, num_partitions=1

ENTRY %main (p: f32[256,128]) -> f32[256,128] {
  %p = f32[256,128]{1,0:T(8,128)} parameter(0)
  %to_chip = f32[256,128]{1,0:T(8,128)S(1)} copy(%p)
  %on_chip = f32[256,128]{1,0:T(8,128)S(1)} negate(%to_chip)
  %start = (f32[256,128]{1,0:T(8,128)}, f32[256,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%p)
  %done = f32[256,128]{1,0:T(8,128)S(1)} copy-done(%start)
  ROOT %back = f32[256,128]{1,0:T(8,128)} add(%on_chip, %done)
}
"""
    array = 256 * 128 * 4
    # copy reads p; copy-start reads p; the result is written; on-chip operands and results cost nothing.
    assert hlo_stats.analyze(text).hbm_bytes == 3 * array


def test_shapes_parse_tuples_layouts_and_sizes():
    shape = hlo_stats.parse_shape("(s32[]{:T(128)S(6)}, (bf16[4,8]{1,0:T(8,128)(2,1)S(1)}, s4[3]), token[], pred[2])")
    scalar, (tiled, packed), token, flags = shape
    assert scalar == hlo_stats.Array("s32", (), 6)
    assert (tiled.dims, tiled.memory_space, tiled.bytes) == ((4, 8), 1, 64)
    assert (packed.bytes, token.bytes, flags.bytes) == (1.5, 0, 2)
    assert hlo_stats.parse_shape("f8e4m3fn[10]{0}").bytes == 10
    assert hlo_stats.parse_shape("c64[2]").bytes == 16


def test_missing_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_stats.analyze("HloModule empty\n")
