"""AdamW added to a step graph as ONNX nodes (`step_adamw`): its inputs and outputs are the step
graph's, and ONNX Runtime runs the update torch.optim.AdamW makes (mode "torch") and the one ORT's
AdamWOptimizer makes with adam_mode=1 (mode "hf"), weight decay on, over several steps, with and
without the proximal term toward an anchor. The traced part is a hand-made graph here: loss =
sum(w * x) over the batch, its gradient sum(x)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fedclip.exporters.step_adamw import AdamW, add_adamw
from fedclip.exporters.step_graph import step_io
from fedclip.sdk.errors import ExportError

SHAPES = {"a.lora_A": [2, 3], "a.lora_B": [3, 2]}
ANCHORS = {n: np.linspace(-1.0, 1.0, int(np.prod(s)), dtype=np.float32).reshape(s) for n, s in SHAPES.items()}


def _traced() -> onnx.ModelProto:
    """(x [batch, 3], the two tensors) -> (loss, each tensor's gradient): loss = sum(p * g) over the
    tensors, g their gradient (a constant of the data)."""
    nodes, outputs, losses = [], [], []
    for name, shape in SHAPES.items():
        # g = the batch's column sums, cut to the last dim and broadcast: a gradient moving with the data
        nodes += [
            helper.make_node("ReduceSum", ["x", "axis0"], [f"{name}/s"], keepdims=0),
            helper.make_node("Slice", [f"{name}/s", "start", f"{name}/end"], [f"{name}/c"]),
            helper.make_node("Expand", [f"{name}/c", f"{name}/shape"], [name + ".grad"]),
            helper.make_node("Mul", [name, name + ".grad"], [f"{name}/pg"]),
            helper.make_node("ReduceSum", [f"{name}/pg"], [f"{name}/l"], keepdims=0),
        ]
        losses.append(f"{name}/l")
        outputs.append(helper.make_tensor_value_info(name + ".grad", TensorProto.FLOAT, shape))
    nodes.append(helper.make_node("Sum", losses, ["loss"]))
    inits = [
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
    ]
    for name, shape in SHAPES.items():
        inits += [
            helper.make_tensor(f"{name}/end", TensorProto.INT64, [1], [shape[-1]]),
            helper.make_tensor(f"{name}/shape", TensorProto.INT64, [2], shape),
        ]
    graph = helper.make_graph(
        nodes,
        "traced",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in SHAPES.items()],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])] + outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _grad(name: str, x: np.ndarray) -> np.ndarray:
    shape = SHAPES[name]
    return np.broadcast_to(x.sum(0)[: shape[-1]], shape).astype(np.float32)


def _reference(opt: AdamW, steps: list[np.ndarray], lr: float, mu: float) -> dict[str, np.ndarray]:
    """torch.optim.AdamW for mode torch; ORT's adam_mode=1 update (decay after, eps before the bias
    correction) for mode hf; the loss plus (mu / 2) ||w - anchor||^2 (its gradient added to g)."""
    params = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    if opt.mode == "torch":
        ts = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
        optim = torch.optim.AdamW(
            list(ts.values()), lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
        for x in steps:
            for n, t in ts.items():
                prox = mu * (t.detach() - torch.from_numpy(ANCHORS[n]))
                t.grad = torch.from_numpy(_grad(n, x).copy()) + prox
            optim.step()
        return {n: t.detach().numpy() for n, t in ts.items()}
    b1, b2 = opt.betas
    m = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    v = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    p = {n: a.astype(np.float64) for n, a in params.items()}
    for t, x in enumerate(steps, start=1):
        for n in SHAPES:
            g = _grad(n, x).astype(np.float64) + mu * (p[n] - ANCHORS[n])
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            p[n] = p[n] - step_size * m[n] / (np.sqrt(v[n]) + opt.eps)
            p[n] = p[n] - lr * opt.weight_decay * p[n]
    return p


def _run(sess, outputs, batches, lr: float, mu: float, anchors: dict) -> dict[str, np.ndarray]:
    params = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    m = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    v = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    for step, x in enumerate(batches):
        feeds = {"x": x, "step": np.array([step], np.int64), "lr": np.array([lr], np.float32)}
        feeds["prox_mu"] = np.array([mu], np.float32)
        for n in SHAPES:
            feeds.update(
                {n: params[n], n + ".exp_avg": m[n], n + ".exp_avg_sq": v[n], n + ".anchor": anchors[n]}
            )
        out = dict(zip(outputs, sess.run(None, feeds), strict=True))
        assert int(out["step_out"][0]) == step + 1
        params = {n: out[n + ".new"] for n in SHAPES}
        m = {n: out[n + ".exp_avg.new"] for n in SHAPES}
        v = {n: out[n + ".exp_avg_sq.new"] for n in SHAPES}
    return params


@pytest.mark.parametrize("mu", [0.0, 0.7])
@pytest.mark.parametrize("mode", ["torch", "hf"])
def test_the_graph_runs_adamw_as_the_reference_does(mode, mu):
    import onnxruntime as ort

    opt = AdamW(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, mode=mode)
    model = _traced()
    add_adamw(model, 1, list(SHAPES), opt)
    onnx.checker.check_model(model, full_check=True)
    inputs, outputs = step_io(("x",), list(SHAPES))
    assert [i.name for i in model.graph.input] == list(inputs)
    assert [o.name for o in model.graph.output] == list(outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 1, 7, 2, 5)]
    lr = 0.05
    params = _run(sess, outputs, batches, lr, mu, ANCHORS)
    want = _reference(opt, batches, lr, mu)
    for n in SHAPES:
        assert not np.allclose(params[n], 0.5), "the step moved nothing: the comparison would be vacuous"
        np.testing.assert_allclose(params[n], want[n], rtol=2e-5, atol=1e-6, err_msg=n)
    if mu:  # the term pulls: the same steps without it end elsewhere
        assert not np.allclose(params[n], _reference(opt, batches, lr, 0.0)[n], atol=1e-3)
    else:  # at prox_mu 0 the anchors change no bit
        elsewhere = {n: a * 7.0 + 3.0 for n, a in ANCHORS.items()}
        again = _run(sess, outputs, batches, lr, 0.0, elsewhere)
        for n in SHAPES:
            np.testing.assert_array_equal(again[n], params[n])


def test_a_traced_graph_of_other_inputs_or_outputs_is_refused():
    model = _traced()
    with pytest.raises(ExportError, match="inputs"):
        add_adamw(model, 1, ["a.lora_B", "a.lora_A"], AdamW())
    model = _traced()
    model.graph.output[1].name = "a.lora_A.gradient"
    with pytest.raises(ExportError, match="outputs"):
        add_adamw(model, 1, list(SHAPES), AdamW())


def test_an_unknown_mode_is_refused():
    with pytest.raises(ExportError, match="adamw.mode"):
        AdamW(mode="sgd")  # type: ignore[arg-type]
