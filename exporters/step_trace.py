"""A traced function -> one ONNX graph: make_fx on fake tensors (`step_fx`), the dynamo ONNX
exporter's translation and onnxscript's optimizer, each a phase of the export profile.

The frozen weights are the function's leading inputs while tracing and buffers `frozen_<i>` after,
so the graph's weights are the initializers `graph_template` strips and fills.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings

import onnx
import torch

from fedclip.exporters.graph_template import FROZEN
from fedclip.exporters.phases import phase
from fedclip.exporters.step_batch import (
    BatchNotSubstituted,
    batch_dims,
    check_constants,
    dynamic_batch,
    static_inputs,
    trace_batch_size,
)
from fedclip.exporters.step_fx import as_program, fake_inputs, functional
from fedclip.exporters.step_registry import OPSET as OPSET  # the step graphs' opset (tests read it here)
from fedclip.exporters.step_registry import decompositions, registry_for
from fedclip.sdk.errors import ExportError

log = logging.getLogger(__name__)

# IR 8 is the oldest IR that carries opset 18; older ONNX Runtime builds (JetPack's) refuse IR 10.
IR_VERSION = 8


def trace(fn, frozen, args, n_data: int, input_names, output_names, file: str) -> onnx.ModelProto:
    """`fn(*frozen, *args)` as an ONNX graph named `file` in errors; dim 0 of the first `n_data` args
    is the dynamic batch."""
    try:
        return _trace_unchecked(fn, frozen, args, n_data, input_names, output_names, file)
    except ExportError:
        raise
    except Exception as e:  # torch's tracers and exporters raise many classes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{file}: cannot export the training step: {type(e).__name__}: {first}") from e


@contextlib.contextmanager
def _quiet(logger: str):
    """`logger`'s warnings dropped meanwhile: ones the export expects, by the thousand, on stderr."""
    log = logging.getLogger(logger)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def _optimize(onnx_program) -> None:
    """onnxscript's graph optimizer with the frozen weights held as graph inputs meanwhile.

    It folds no node that reads a graph input, so no initializer is computed from a weight: the
    graph stays a template that other weights can fill in (`graph_template`), and no weight is
    stored twice (it would fold a Transpose of a linear weight into W^T next to the inference
    graph's W in the shared weights file).
    """
    graph = onnx_program.model.graph
    weights = [v for name, v in graph.initializers.items() if FROZEN.match(name)]
    graph.inputs.extend(weights)
    # onnx_ir logs a WARNING per weight it may not deduplicate because it is a graph input.
    try:
        with _quiet("onnx_ir.passes.common.initializer_deduplication"):
            _optimize_ir(onnx_program.model)
    finally:
        for v in weights:
            graph.inputs.remove(v)
    for v in weights:  # weights the optimized graph no longer reads
        if not v.uses() and not v.is_graph_output():
            graph.initializers.pop(v.name, None)


# Rewrite rules left out: SlicesSplit (Slices of one tensor -> Split) took ~45% of the rewriter's
# time on fedclip-tiny's step graph and never fired there; a step graph's Slices are few and small.
_SKIP_RULES = frozenset({"SlicesSplit"})


class _Rooted:
    """A rewrite rule tried only on nodes of its pattern's root op type.

    The rewriter tries every rule on every node (~45 rules x ~5,700 nodes per pass on fedclip-tiny's
    step graph), and each try costs a few microseconds of matcher set-up before the root node's op
    type fails to match: that was ~70% of the optimizer. The op type is the matcher's first check, so
    skipping those tries changes nothing the rewriter does (the optimized graph is byte-identical).
    """

    def __init__(self, rule, op_type: str):
        self._rule, self._op_type = rule, op_type

    def __getattr__(self, name: str):
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if node.op_type != self._op_type:
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _rooted(rule):
    """`rule` behind `_Rooted` where its pattern has one output node of one fixed op type, else as is."""
    from onnxscript.rewriter._pattern_ir import StringConstantPattern

    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or not pattern.has_single_output_node:
        return rule
    op = pattern.output_node.op
    return _Rooted(rule, op.value()) if isinstance(op, StringConstantPattern) else rule


def _optimize_ir(model) -> None:
    """onnxscript's `optimize_ir` (what `ONNXProgram.optimize` runs) with fewer rewrite rules.

    Measured on fedclip-tiny's step graph: constant folding, the rules that fire (materializing
    Reshape shapes, Transpose and Reshape pairs, 1-d Squeeze) and CSE take the graph from ~3,800 to
    ~1,500 nodes, which halves ONNX Runtime's session creation; step run time was the same without
    any optimizer. The onnx fusions that `optimize` adds target opsets above 18 and found nothing.
    """
    from onnx_ir.passes import PassManager, Sequential, common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [
        _rooted(r) for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in _SKIP_RULES
    ]
    loop = PassManager(
        [
            _constant_folding.FoldConstantsPass(
                # The exporter already typed and shaped every value (from make_fx's fake tensors).
                # ONNX shape inference per node was a third of the optimizer's time (0.3-0.4 s on
                # fedclip-tiny) and saved 4 nodes of 953 (two Reshape shapes it could materialize).
                shape_inference=False,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    Sequential(
        common.InlinePass(),
        loop,
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


@contextlib.contextmanager
def _op_signatures_memoized():
    """While translating, `OpSignature.from_op_schema` answers each ONNX op schema once.

    The exporter's graph builder derives the signature again for every ONNX node it emits (~3,700 on
    fedclip-tiny's step graph), which was ~40% of the translation; a signature depends only on the
    schema (domain, name, version) and is only read, so one per schema gives the same graph.
    """
    from onnx_ir import schemas

    derive = schemas.OpSignature.from_op_schema
    memo: dict[tuple[str, str, int], schemas.OpSignature] = {}

    def memoized(op_schema):
        key = (op_schema.domain, op_schema.name, op_schema.since_version)
        if (sig := memo.get(key)) is None:
            sig = memo[key] = derive(op_schema)
        return sig

    schemas.OpSignature.from_op_schema = memoized  # type: ignore[method-assign]  # for this phase only
    try:
        yield
    finally:
        schemas.OpSignature.from_op_schema = derive  # type: ignore[method-assign]  # restored


def _trace_unchecked(
    fn,
    frozen: list[torch.Tensor],
    args: list[torch.Tensor],
    n_data: int,
    input_names,
    output_names,
    file: str,
) -> onnx.ModelProto:
    with _collector_spared():
        return _trace_spared(fn, frozen, args, n_data, input_names, output_names, file)


@contextlib.contextmanager
def _collector_spared():
    """The objects alive before the trace out of the cyclic collector's sight meanwhile.

    Tracing makes objects by the million, so the collector runs its full collections, and each one
    walked every object torch, open_clip and onnxscript had loaded (~20% of the trace's time on
    fedclip-tiny). They are handed back to it after.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _trace_spared(fn, frozen, args, n_data: int, input_names, output_names, file: str) -> onnx.ModelProto:
    with phase(f"{file}: torchlib op tables"):  # once per process
        decomp = decompositions()
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    # torch.onnx prints its progress to stdout, which would tear the export's progress bar.
    # Lazy graph modules: each FX pass ends in `recompile`, which writes the graph out as Python
    # source (~0.1 s per pass at fedclip-tiny's 2,000 nodes); the export never runs that code.
    with (
        torch.enable_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        _use_lazy_graph_module(True),
    ):
        warnings.simplefilter("ignore")
        names = (list(input_names), list(output_names))
        try:
            onnx_program = _static_batch(fn, frozen, args, n_data, names, decomp, file)
        except BatchNotSubstituted as e:
            log.info("%s: traced symbolically: %s", file, e)
            onnx_program = _symbolic_batch(fn, frozen, args, n_data, names, decomp, file)
        with phase(f"{file}: onnxscript optimizer"):
            _optimize(onnx_program)
    model = onnx_program.model_proto
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(f"{file}: exported graph io {got_in[:3]}... differs from the requested names")
    model.ir_version = IR_VERSION
    _drop_debug_info(model)
    return model


def _static_batch(fn, frozen, args, n_data: int, names, decomp, file: str):
    """The step traced at a static prime batch (`step_batch`), its batch axis made dynamic again."""
    with phase(f"{file}: tracing (make_fx)"):
        batch = trace_batch_size([*frozen, *args])
        gm = _fx(fn, static_inputs(frozen, args, n_data, batch), decomp)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        dynamic_batch(gm, placeholders[len(frozen)] if n_data else None, batch)
    with phase(f"{file}: ONNX translation"):
        onnx_program = _translate(gm, frozen, names)
        check_constants(onnx_program.model, batch)
        batch_dims(onnx_program.model, batch)
    return onnx_program


def _symbolic_batch(fn, frozen, args, n_data: int, names, decomp, file: str):
    """The step traced with a symbolic batch: exact for any step, slower (`step_batch` says why)."""
    from torch.onnx._internal.exporter import _ir_passes

    with phase(f"{file}: tracing (make_fx)"):
        fake, batch = fake_inputs(frozen, args, n_data)
        gm = _fx(fn, fake, decomp)
    with phase(f"{file}: ONNX translation"):
        onnx_program = _translate(gm, frozen, names)
        _ir_passes.rename_axis(onnx_program.model, dict.fromkeys(batch, "batch"))
    return onnx_program


def _fx(fn, fake, decomp) -> torch.fx.GraphModule:
    """`fn` traced on the fake tensors `fake`, decomposed with `decomp`, without in-place ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return functional(make_fx(fn, tracing_mode="fake", decomposition_table=decomp)(*fake), fake)


def _translate(gm, frozen, names):
    """`gm` as an ONNX program, its graph inputs and outputs named `names` (inputs, outputs)."""
    from torch.onnx._internal.exporter import _core, _ir_passes

    # The exporter warns once per node that it has no nn_module_stack (the program is built by
    # hand, `as_program`): ~2,600 stderr lines per fedclip-tiny step graph, about metadata the
    # export drops anyway (`_drop_debug_info`).
    with _op_signatures_memoized(), _quiet("torch.onnx._internal.exporter._core"):
        exported = as_program(gm, frozen)
        registry = registry_for(exported.graph_module)
        program = _core._exported_program_to_onnx_program(exported, registry=registry)
    _ir_passes.rename_inputs(program.model, names[0])
    _ir_passes.rename_outputs(program.model, names[1])
    return program


def _drop_debug_info(model: onnx.ModelProto) -> None:
    """The exporter's per-node debug notes (stack traces, FX node text) are most of the file, and name
    the checkout's path and a per-process counter, so the same export would give other bytes."""
    g = model.graph
    for item in (*g.node, *g.input, *g.output, *g.value_info, *g.initializer):
        del item.metadata_props[:]
