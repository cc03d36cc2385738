"""The portable step graph against PyTorch: gradients, AdamW loss curves, plain onnxruntime, weights.

Real exports of a tiny random-init CLIP, run by real ONNX Runtime; PyTorch autograd and
torch.optim.AdamW are the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedclip.exporters import tasks
from fedclip.exporters.bundle import build_adapted_model, tokenize
from fedclip.exporters.step_graph import (
    AdamW,
    export_step_eval_graph,
    export_step_graph,
    step_io,
)
from fedclip.exporters.step_trace import OPSET
from fedclip.exporters.step_weights import share_weights
from fedclip.sdk.errors import ExportError
from fedclip.sdk.manifest import AdapterSpec

REPO = Path(__file__).resolve().parents[1]
DEVICE_PY = REPO / ".venv-device" / "bin" / "python"
OPT = AdamW(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, mode="torch")
LABELS = ("cat", "dog", "bird", "fish", "frog", "horse")
# Smaller than fedclip-tiny (one block a tower) so each export takes seconds, not a minute.
MICRO = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

CASES = [
    pytest.param(("lora", "classify", ("vision", "text")), id="lora-classify-both"),
    pytest.param(("lora", "classify", ("text",)), id="lora-classify-text", marks=pytest.mark.slow),
    pytest.param(
        ("lora", "contrastive", ("vision", "text")), id="lora-contrastive-both", marks=pytest.mark.slow
    ),
    pytest.param(("lora", "contrastive", ("text",)), id="lora-contrastive-text", marks=pytest.mark.slow),
    pytest.param(
        ("tri-lora", "classify", ("vision", "text")), id="trilora-classify-both", marks=pytest.mark.slow
    ),
    pytest.param(("tri-lora", "classify", ("text",)), id="trilora-classify-text", marks=pytest.mark.slow),
    pytest.param(
        ("tri-lora", "contrastive", ("vision", "text")), id="trilora-contrastive-both", marks=pytest.mark.slow
    ),
    pytest.param(
        ("tri-lora", "contrastive", ("text",)), id="trilora-contrastive-text", marks=pytest.mark.slow
    ),
]


class Case:
    """One adapted micro CLIP, its task module, data batches and the exported step graph."""

    def __init__(self, root: Path, kind: str, task: str, towers: tuple[str, ...]) -> None:
        cfg = root / "micro.json"
        cfg.write_text(json.dumps(MICRO))
        spec = AdapterSpec(kind=kind, rank=2, alpha=4.0, targets=("q", "v"), towers=towers)
        self.adapted = build_adapted_model(str(cfg), spec)
        self.names = self.adapted.trainable
        self._randomize()
        self.from_embeds = towers == ("text",)
        clip = self.adapted.model
        ctx = self.adapted.base.context_length
        if task == "classify":
            self.module = tasks.ClassifyGraph(
                clip, tokenize(list(LABELS), ctx), self.from_embeds, "text" in towers
            )
            self.input_names, self.eval_outputs = (self.x_name, "labels"), ("loss", "logits")
        else:
            self.module = tasks.ContrastiveGraph(clip, self.from_embeds)
            self.input_names, self.eval_outputs = (self.x_name, "text"), ("loss",)
        self.task = task
        self.batches = [self.batch(n, seed) for seed, n in enumerate((4, 6, 3))]
        self.dir = root
        self.spec = export_step_graph(
            self.module, self.names, self.batches[0], self.input_names, root, adamw=OPT
        )
        self.path = root / self.spec.file

    @property
    def x_name(self) -> str:
        return "image_embeds" if self.from_embeds else "image"

    @torch.no_grad()
    def _randomize(self) -> None:
        # B starts at zero, which makes every gradient but B's zero: parity needs all of them live.
        g = torch.Generator().manual_seed(7)
        params = dict(self.adapted.model.named_parameters())
        for n in self.names:
            params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.2)

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + seed)
        base = self.adapted.base
        if self.from_embeds:
            x = torch.randn(n, base.embed_dim, generator=g)
        else:
            size = base.preprocess.image_size
            x = torch.randn(n, 3, size, size, generator=g)
        if self.task == "classify":
            return x, torch.randint(0, len(LABELS), (n,), generator=g)
        words = ["red", "small", "fast", "old", "wet", "loud", "blue"]
        caps = [f"a {words[(i + seed) % 7]} {words[(2 * i + seed) % 7]} {LABELS[i % 6]}" for i in range(n)]
        return x, tokenize(caps, base.context_length)

    def initial(self) -> dict[str, np.ndarray]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().numpy().copy() for n in self.names}

    def feeds(self, batch, step: int, lr: float, tensors, exp_avg, exp_avg_sq) -> dict[str, np.ndarray]:
        feeds = {name: t.numpy() for name, t in zip(self.input_names, batch, strict=False)}
        feeds["step"] = np.array([step], dtype=np.int64)
        feeds["lr"] = np.array([lr], dtype=np.float32)
        for n in self.names:
            feeds[n] = tensors[n]
            feeds[n + ".exp_avg"] = exp_avg[n]
            feeds[n + ".exp_avg_sq"] = exp_avg_sq[n]
            feeds[n + ".anchor"] = tensors[n]  # the proximal term is off (prox_mu 0)
        feeds["prox_mu"] = np.zeros(1, dtype=np.float32)
        return feeds


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_steps(case: Case, sess, steps: int, lr: float) -> tuple[list[float], dict[str, np.ndarray]]:
    tensors = case.initial()
    m = {n: np.zeros_like(a) for n, a in tensors.items()}
    v = {n: np.zeros_like(a) for n, a in tensors.items()}
    losses = []
    for i in range(steps):
        out = dict(
            zip(
                case.spec.outputs,
                sess.run(None, case.feeds(case.batches[i % 3], i, lr, tensors, m, v)),
                strict=True,
            )
        )
        assert int(out["step_out"][0]) == i + 1
        losses.append(float(out["loss"]))
        tensors = {n: out[n + ".new"] for n in case.names}
        m = {n: out[n + ".exp_avg.new"] for n in case.names}
        v = {n: out[n + ".exp_avg_sq.new"] for n in case.names}
    return losses, tensors


def torch_steps(case: Case, steps: int, lr: float) -> tuple[list[float], dict[str, np.ndarray]]:
    params = [torch.tensor(a, requires_grad=True) for a in case.initial().values()]
    opt = torch.optim.AdamW(params, lr=lr, betas=OPT.betas, eps=OPT.eps, weight_decay=OPT.weight_decay)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        named = dict(zip(case.names, params, strict=True))
        out = torch.func.functional_call(case.module, named, case.batches[i % 3])
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().numpy() for n, p in zip(case.names, params, strict=False)}


_cases: dict[str, Case] = {}


@pytest.fixture
def case(request, tmp_path_factory) -> Case:
    kind, task, towers = request.param
    key = f"{kind}-{task}-{'+'.join(towers)}"
    if key not in _cases:
        _cases[key] = Case(tmp_path_factory.mktemp(key), kind, task, towers)
    return _cases[key]


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_gradients_match_autograd(case: Case):
    """At step 0 with zero moments, exp_avg.new = (1 - beta1) * grad exactly: read the graph's gradient."""
    sess = _session(case.path)
    tensors = case.initial()
    zeros = {n: np.zeros_like(a) for n, a in tensors.items()}
    out = dict(
        zip(
            case.spec.outputs,
            sess.run(None, case.feeds(case.batches[0], 0, 1e-3, tensors, zeros, zeros)),
            strict=True,
        )
    )
    params = [torch.tensor(a, requires_grad=True) for a in tensors.values()]
    named = dict(zip(case.names, params, strict=True))
    res = torch.func.functional_call(case.module, named, case.batches[0])
    loss = res[0] if isinstance(res, tuple) else res
    grads = torch.autograd.grad(loss, params)
    assert abs(float(out["loss"]) - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    for name, g in zip(case.names, grads, strict=False):
        ref = g.numpy()
        got = out[name + ".exp_avg.new"] / (1 - OPT.betas[0])
        assert np.linalg.norm(ref) > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, f"{name}: gradient relative error {rel:.2e}"


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_loss_curve_matches_torch_adamw(case: Case):
    """30 AdamW steps over batches of 4, 6 and 3 (none the traced size): same losses as torch."""
    ours, ours_tensors = run_steps(case, _session(case.path), 30, 3e-3)
    ref, ref_tensors = torch_steps(case, 30, 3e-3)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    assert ours[27] < ours[0], "the loss on batch 0 should fall over 27 steps"
    for n in case.names:
        np.testing.assert_allclose(ours_tensors[n], ref_tensors[n], rtol=1e-3, atol=1e-4, err_msg=n)


@pytest.mark.parametrize("case", [CASES[0]], indirect=True)
def test_graph_is_plain_onnx(case: Case):
    model = onnx.load(str(case.path), load_external_data=False)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [OPSET]
    inputs, outputs = step_io(case.input_names, case.names)
    assert [i.name for i in model.graph.input] == list(inputs)
    assert [o.name for o in model.graph.output] == list(outputs)
    onnx.checker.check_model(str(case.path))


@pytest.mark.parametrize("case", [CASES[0]], indirect=True)
def test_step_runs_in_plain_onnxruntime(case: Case, tmp_path: Path):
    """The device venv has plain onnxruntime (no training API, no torch): it trains the same."""
    if not DEVICE_PY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DEVICE_PY} is missing in CI (scripts/device_venv.sh creates it)")
        pytest.skip(f"{DEVICE_PY} not found: run `bash scripts/device_venv.sh` to create the device venv")
    tensors = case.initial()
    zeros = {n: np.zeros_like(a) for n, a in tensors.items()}
    np.savez(tmp_path / "feeds.npz", **case.feeds(case.batches[0], 0, 3e-3, tensors, zeros, zeros))
    script = tmp_path / "run.py"
    script.write_text(
        f"""
import json, sys, numpy as np, onnxruntime as ort
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
assert not hasattr(ort, "training") or ort.training is None
sess = ort.InferenceSession({str(case.path)!r}, providers=["CPUExecutionProvider"])
feeds = dict(np.load({str(tmp_path / "feeds.npz")!r}))
outs = [o.name for o in sess.get_outputs()]
losses = []
for _ in range(5):
    res = dict(zip(outs, sess.run(None, feeds)))
    losses.append(float(res["loss"]))
    for name in list(feeds):
        if name + ".new" in res:
            feeds[name] = res[name + ".new"]
    feeds["step"] = res["step_out"]
print(json.dumps({{"losses": losses, "ort": ort.__version__}}))
"""
    )
    proc = subprocess.run([str(DEVICE_PY), str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    sess = _session(case.path)
    feeds = dict(np.load(tmp_path / "feeds.npz"))
    ref = []
    for _ in range(5):
        res = dict(zip(case.spec.outputs, sess.run(None, feeds), strict=False))
        ref.append(float(res["loss"]))
        feeds.update({k[: -len(".new")]: v for k, v in res.items() if k.endswith(".new")})
        feeds["step"] = res["step_out"]
    np.testing.assert_allclose(got["losses"], ref, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0]], indirect=True)
def test_eval_graph_and_shared_weights(case: Case, tmp_path: Path):
    """Inference and step graphs keep one copy of the frozen weights; ORT loads both from it."""
    import onnxruntime as ort

    from fedclip.exporters import onnx_export

    with torch.no_grad():
        inf = tasks.ClassifyInference(case.adapted.model, tokenize(list(LABELS), 12), text_adapted=True)
        proto = onnx_export.export_onnx(inf, (case.batches[0][0],), ("image",), ("logits", "image_embeds"))
    onnx_export.save(proto, tmp_path / "inference_model.onnx")
    weights = tmp_path / "weights.bin"
    share_weights(tmp_path / "inference_model.onnx", tmp_path / "inference_model.onnx", weights)
    after_inference = weights.stat().st_size
    export_step_graph(
        case.module, case.names, case.batches[0], case.input_names, tmp_path, weights_file=weights.name
    )
    spec = export_step_eval_graph(
        case.module,
        case.names,
        case.batches[0],
        case.input_names,
        case.eval_outputs,
        tmp_path,
        weights_file=weights.name,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "inference_model.onnx",
        "step_eval_model.onnx",
        "step_model.onnx",
        "weights.bin",
    ]
    # The frozen tower weights are stored once: the step graphs add only what inference lacks.
    assert weights.stat().st_size < 1.25 * after_inference
    x, y = case.batches[1]
    logits = ort.InferenceSession(str(tmp_path / "inference_model.onnx")).run(None, {"image": x.numpy()})[0]
    feeds = {"image": x.numpy(), "labels": y.numpy(), **case.initial()}
    loss, eval_logits = ort.InferenceSession(str(tmp_path / spec.file)).run(None, feeds)
    np.testing.assert_allclose(eval_logits, logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref_loss, _ = case.module(x, y)
    assert abs(float(loss) - float(ref_loss)) < 1e-4


@pytest.mark.parametrize("case", CASES[:1], indirect=True)
def test_step_graphs_cut_the_eval_graph_from_one_trace_and_cache_it(case: Case, tmp_path: Path):
    """export_step_graphs traces once: step_eval is the step graph's forward part, and both graphs
    come from the export cache the second time, byte for byte."""
    import onnx

    from fedclip.exporters.export_cache import ExportCache
    from fedclip.exporters.step_graph import export_step_graphs

    cache, key = ExportCache(tmp_path / "cache"), {"case": "micro lora classify"}
    out = {}
    for name in ("first", "second"):
        out[name] = tmp_path / name
        out[name].mkdir()
        specs = export_step_graphs(
            case.module,
            case.names,
            case.batches[0],
            case.input_names,
            case.eval_outputs,
            out[name],
            adamw=OPT,
            cache=cache,
            cache_key=key,
        )
    assert (cache.misses, cache.hits) == (2, 2)
    step_out = step_io(case.input_names, case.names)[1]
    assert specs["step"].outputs == step_out  # the logits the cut needed are no output of the step graph
    model = onnx.load(str(out["first"] / specs["step"].file), load_external_data=False)
    assert [o.name for o in model.graph.output] == list(step_out)
    first, second = (sorted(d.iterdir()) for d in (out["first"], out["second"]))
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))

    x, y = case.batches[1]
    feeds = {"image": x.numpy(), "labels": y.numpy(), **case.initial()}
    loss, logits = _session(out["first"] / specs["step_eval"].file).run(None, feeds)
    with torch.no_grad():
        ref_loss, ref_logits = case.module(x, y)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-4)
    assert abs(float(loss) - float(ref_loss)) < 1e-4
    # The step graph still trains: its first loss is the task module's.
    zeros = {n: np.zeros_like(a) for n, a in case.initial().items()}
    feeds = case.feeds(case.batches[1], 0, 1e-2, case.initial(), zeros, zeros)
    assert (
        abs(float(_session(out["first"] / specs["step"].file).run(["loss"], feeds)[0]) - float(ref_loss))
        < 1e-4
    )


def test_unknown_trainable_name_is_an_export_error(tmp_path: Path):
    module = torch.nn.Linear(3, 2)
    with pytest.raises(ExportError, match="not a parameter"):
        export_step_graph(module, ["nope"], (torch.zeros(2, 3),), ("image",), tmp_path)


def _matmul_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """y = x @ W1 @ W2 ... with the given initializers (a stand-in for an exported graph)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, name], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(a, name) for a, name in zip(weights.values(), weights, strict=True)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_share_weights_stores_equal_tensors_once(tmp_path: Path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal((32, 32)).astype(np.float32) for k in ("a", "b", "c")}
    const = np.full((32, 32), 1e-3, dtype=np.float32)
    onnx.save(_matmul_model({"w1": w["a"], "w2": w["b"]}), str(tmp_path / "first.onnx"))
    # The second graph names the same weights differently (as the dynamo exporter does) and adds one.
    onnx.save(_matmul_model({"p0": w["b"], "p1": w["c"], "p2": const}), str(tmp_path / "second.onnx"))
    x = rng.standard_normal((3, 32)).astype(np.float32)
    before = [
        ort.InferenceSession(str(tmp_path / f)).run(None, {"x": x})[0] for f in ("first.onnx", "second.onnx")
    ]
    weights = tmp_path / "weights.bin"
    first = share_weights(tmp_path / "first.onnx", tmp_path / "first.onnx", weights)
    assert first == {"shared": 0, "added": 2 * 4096}
    second = share_weights(tmp_path / "second.onnx", tmp_path / "second.onnx", weights)
    assert second == {"shared": 4096, "added": 2 * 4096}
    assert weights.stat().st_size < 5 * 4096  # four distinct tensors (plus alignment), not five
    for f, ref in zip(("first.onnx", "second.onnx"), before, strict=True):
        model = onnx.load(str(tmp_path / f), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert (tmp_path / f).stat().st_size < 1024
        np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / f)).run(None, {"x": x})[0], ref)
    # Idempotent: sharing again adds nothing and the graph still loads.
    assert share_weights(tmp_path / "second.onnx", tmp_path / "second.onnx", weights)["added"] == 0
    ort.InferenceSession(str(tmp_path / "second.onnx"))


def test_fill_shared_writes_what_saving_and_sharing_wrote(tmp_path: Path, monkeypatch):
    """The step graphs' weights go straight into the shared file (`fill_shared`): the same graph and
    the same weights file as filling the template, saving it and `share_weights` on it (the route
    before), for two graphs in a row sharing weights with a graph written earlier; each weight is
    hashed once."""
    import shutil

    from fedclip.exporters import step_weights
    from fedclip.exporters.graph_template import fill_shared, fill_weights, strip_weights
    from fedclip.exporters.step_files import save_external
    from fedclip.exporters.step_weights import WeightsFile, save_graph

    rng = np.random.default_rng(1)
    frozen = [torch.from_numpy(rng.standard_normal((32, 32)).astype(np.float32)) for _ in range(3)]
    small = np.ones((2, 2), np.float32)  # under MIN_BYTES: stays in the graph (the graphs never run)
    const = np.full((32, 32), 3.0, np.float32)  # a constant of the graph, not a weight: shared too
    weights = {"frozen_0": frozen[0].numpy(), "k": small, "c": const, "frozen_2": frozen[2].numpy()}
    template = strip_weights(_matmul_model(weights))
    earlier = _matmul_model({"w": frozen[2].numpy(), "c": np.full((32, 32), 2.0, np.float32)})
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
        onnx.save(earlier, str(d / "earlier.onnx"))
        share_weights(d / "earlier.onnx", d / "earlier.onnx", d / "weights.bin")
    for name in ("a.onnx", "b.onnx"):
        (old / "tmp").mkdir()
        save_external(fill_weights(template, frozen), old / "tmp" / name)
        share_weights(old / "tmp" / name, old / name, old / "weights.bin")
        shutil.rmtree(old / "tmp")
    digest, hashed = step_weights._digest, []
    monkeypatch.setattr(step_weights, "_digest", lambda data: hashed.append(len(data)) or digest(data))
    with WeightsFile(new / "weights.bin") as shared:
        hashed.clear()  # the index of the earlier graph, read once
        for name in ("a.onnx", "b.onnx"):
            model = fill_shared(template, frozen, shared)
            shared.sync()
            save_graph(model, new / name)
    assert (new / "weights.bin").read_bytes() == (old / "weights.bin").read_bytes()
    for name in ("a.onnx", "b.onnx"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    # frozen_0 and frozen_2 once for both graphs, the constant once per graph
    assert len(hashed) == 4
