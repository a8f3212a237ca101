"""An independent PyTorch reference for guided backpropagation, deconvnet and the vanilla gradient, and the
harness that holds onnx-gbp's maps against it.

The reference overrides every ReLU, however it is spelled: a torch function mode sees each call of `nn.ReLU`
(which calls `F.relu`), `F.relu`, `torch.relu`, `Tensor.relu`, the in-place `relu_` variants,
`nn.ReLU6` / `F.relu6` / `F.hardtanh` with min 0, `clamp` / `clip` / `clamp_min` with min 0 (in-place too)
and `F.threshold(x, 0, 0)`, and routes it through one autograd function whose backward applies the method's
rule. Module hooks alone miss the functional spellings (the known Captum limitation), which is why Captum is
only a second witness here.

    vanilla    dx = dy * [x > 0]
    deconvnet  dx = dy * [dy > 0]
    guided     dx = dy * [x > 0] * [dy > 0]

A bounded ReLU min(ReLU(x), u) keeps the true derivative [x < u] of its min part, and the method's rule
applies to the ReLU part.

The float32 envelope. onnx-gbp runs in float32 on ONNX Runtime; the reference runs in float64. A ReLU input
within float32 rounding of 0 may take the other sign in ONNX Runtime, and then the gate [x > 0] differs and the
map moves locally by much more than rounding. So the harness reads ONNX Runtime's own ReLU inputs, matches
each to the reference's ReLU call by value, checks that they agree to float32 rounding, and evaluates the
reference a second time with the gates ONNX Runtime actually took. Everything else in the reference (every
other operator, the method's rule, the dy sign test) stays its own. It reports how many units sat within
rounding of their kink and how many gates flipped; where none flipped, the gated and plain references are the
same computation.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.overrides import TorchFunctionMode

METHODS = ("guided", "deconvnet", "vanilla")

#: Tolerances of the parity claim: max|ours - ref| / max|ref| and cosine similarity, in float32.
REL_TOL = 1e-4
COS_TOL = 0.9999


# ---------------------------------------------------------------------------------------------------------
# The reference: one autograd function for every ReLU
# ---------------------------------------------------------------------------------------------------------

class Rule:
    """The method (and optionally the gates) a backward pass applies at every ReLU. Read at backward time, so one
    recorded forward pass serves every method: the forward pass does not depend on the method."""

    def __init__(self, method: str = "vanilla", gate: Gate | None = None):
        self.method, self.gate = method, gate


class MethodReLU(torch.autograd.Function):
    """y = min(max(x, 0), upper); the backward pass applies the current method's ReLU rule. The gates [x > 0]
    and [x < upper] are the call's own, or those `rule.gate` supplies for call `index` (the gates another
    implementation's forward pass took)."""

    @staticmethod
    def forward(ctx, x, rule, index, upper):
        y = x.clamp(min=0) if upper is None else x.clamp(min=0, max=upper)
        ctx.rule, ctx.index, ctx.upper = rule, index, upper
        ctx.save_for_backward(x > 0, x < upper if upper is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        positive, below = ctx.saved_tensors
        given = ctx.rule.gate(ctx.index, ctx.upper) if ctx.rule.gate else None
        if given is not None:
            positive, below = given
        if below is not None:  # the min part keeps its true derivative
            dy = dy * below
        method = ctx.rule.method
        if method == "vanilla":
            dx = dy * positive
        elif method == "deconvnet":
            dx = dy.clamp(min=0)
        elif method == "guided":
            dx = dy.clamp(min=0) * positive
        else:
            raise ValueError(method)
        return dx, None, None, None


def _arg(args, kwargs, i: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _number(v) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    return None


def relu_call(func, args, kwargs) -> tuple[torch.Tensor, float | None, bool] | None:
    """(input, upper bound, in place) when this torch call is a ReLU or a ReLU capped above, else None."""
    name = getattr(func, "__name__", "")
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if name in ("relu", "relu_"):  # torch.relu, Tensor.relu, F.relu(inplace=...), relu_ variants
        return x, None, name == "relu_" or bool(_arg(args, kwargs, 1, "inplace", False))
    if name in ("relu6", "relu6_"):
        return x, 6.0, name == "relu6_" or bool(_arg(args, kwargs, 1, "inplace", False))
    if name in ("hardtanh", "hardtanh_"):
        lo, hi = _number(_arg(args, kwargs, 1, "min_val", -1.0)), _number(_arg(args, kwargs, 2, "max_val", 1.0))
        if lo == 0.0:
            return x, hi, name == "hardtanh_" or bool(_arg(args, kwargs, 3, "inplace", False))
        return None
    if name in ("clamp", "clamp_", "clip", "clip_"):
        lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
        if _number(lo) == 0.0 and (hi is None or _number(hi) is not None):
            return x, _number(hi), name.endswith("_")
        return None
    if name in ("clamp_min", "clamp_min_"):
        if _number(_arg(args, kwargs, 1, "min")) == 0.0:
            return x, None, name.endswith("_")
        return None
    if name in ("threshold", "threshold_", "_threshold"):
        if _number(_arg(args, kwargs, 1, "threshold")) == 0.0 and _number(_arg(args, kwargs, 2, "value")) == 0.0:
            return x, None, name == "threshold_" or bool(_arg(args, kwargs, 3, "inplace", False))
    return None


@dataclass
class ReluRecord:
    """One ReLU call seen by the reference."""

    x: torch.Tensor  # its input (detached copy, before any in-place write)
    y: torch.Tensor  # its output, on the autograd graph
    upper: float | None
    pre: torch.Tensor  # its input on the autograd graph (a clone that no in-place write reaches)


#: gate(call index, upper) -> (positive, below) masks to use instead of the call's own, or None to keep them
Gate = Callable[[int, "float | None"], "tuple[torch.Tensor, torch.Tensor | None] | None"]


class ReluOverride(TorchFunctionMode):
    """Inside this mode every ReLU-family call goes through MethodReLU under `rule`."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule
        self.calls: list[ReluRecord] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = relu_call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        x, upper, inplace = call
        pre = x.clone()  # the input stays reachable as a target after an in-place write to x
        y = MethodReLU.apply(pre, self.rule, len(self.calls), upper)
        if inplace:  # write back so that aliases see the result; autograd routes through the copy
            x.copy_(y)
            y = x
        self.calls.append(ReluRecord(pre.detach(), y, upper, pre))
        return y


class Reference:
    """One recorded float64 forward pass of `model64` on `x` with every ReLU overridden; `gradient` then runs a
    backward pass for any method, objective and gates."""

    def __init__(self, model64: torch.nn.Module, x: np.ndarray):
        self.rule = Rule()
        self.x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        with ReluOverride(self.rule) as mode:
            self.out = model64(self.x)
        self.calls = mode.calls

    @property
    def logits(self) -> np.ndarray:
        return self.out.detach().numpy()

    def gradient(self, objective: Callable, method: str, gate: Gate | None = None) -> np.ndarray:
        if method not in METHODS:
            raise ValueError(method)
        self.rule.method, self.rule.gate = method, gate
        (grad,) = torch.autograd.grad(objective(self.out, self.calls), self.x, retain_graph=True)
        return grad.numpy()


def class_objective(targets: np.ndarray) -> Callable:
    """The sum over samples of each sample's target logit."""
    def objective(out: torch.Tensor, calls: list[ReluRecord]) -> torch.Tensor:
        return out.reshape(len(out), -1)[torch.arange(len(out)), torch.as_tensor(targets)].sum()
    return objective


def neuron_objective(call: int, neurons: np.ndarray, pre: bool = False) -> Callable:
    """The sum over samples of one neuron (flat index per sample) of the output of ReLU call `call` (of its
    input if `pre`)."""
    def objective(out: torch.Tensor, calls: list[ReluRecord]) -> torch.Tensor:
        y = calls[call].pre if pre else calls[call].y
        return y.reshape(len(y), -1)[torch.arange(len(y)), torch.as_tensor(neurons)].sum()
    return objective


def autograd_map(model64: torch.nn.Module, x: np.ndarray, objective: Callable) -> np.ndarray:
    """Plain torch autograd in float64, no override: the true gradient."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    objective(model64(xt), []).backward()
    return xt.grad.numpy()


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double().eval()


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------

def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|ours - ref| / max|ref|"""
    scale = float(np.abs(ref).max())
    return float(np.abs(ours.astype(np.float64) - ref).max() / scale) if scale else float(np.abs(ours).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def agrees(ours: np.ndarray, ref: np.ndarray) -> bool:
    return rel_err(ours, ref) <= REL_TOL and cosine(ours, ref) >= COS_TOL


# ---------------------------------------------------------------------------------------------------------
# Our side: onnx-gbp's maps, and the ReLU inputs its ONNX Runtime forward pass computed
# ---------------------------------------------------------------------------------------------------------

RELU_FAMILY = ("Relu", "Clip", "Max")


def relu_input_names(model: onnx.ModelProto) -> dict[str, str]:
    """Candidate ReLU inputs of an exported model (first input of every Relu, Clip and Max node): input
    tensor -> the node's output tensor (the layer a neuron target names)."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type in RELU_FAMILY:
            for name in node.input[: 1 if node.op_type != "Max" else len(node.input)]:
                if name and name not in inits and name not in consts:
                    found.setdefault(name, node.output[0])
    return found


@dataclass
class Ours:
    maps: dict[str, np.ndarray]
    targets: np.ndarray
    logits: np.ndarray
    relu_inputs: dict[str, np.ndarray]  # ONNX Runtime's value of each candidate ReLU input
    relu_outputs: dict[str, str]  # ReLU input tensor -> ReLU output tensor
    relu_nodes: list[str]  # the nodes onnx-gbp says it treated as ReLU
    nodes_forward: int
    nodes_total: int
    seconds: float
    alone: dict[str, np.ndarray]  # the first sample's maps from a batch of one (the batch axis is dynamic)


def run_ours(onnx_path: str | Path, x: np.ndarray, layer: str | None = None, neuron="max") -> Ours:
    """onnx-gbp's maps for every method from one Explainer, plus a probe of the same augmented graph on the
    same session options that also returns every ReLU input."""
    import onnx_gbp
    from onnx_gbp.runtime import make_session

    source = onnx.load(str(onnx_path))
    start = time.perf_counter()
    explainer = onnx_gbp.Explainer(str(onnx_path), methods=METHODS, layer=layer,
                                   neuron=neuron if layer else None, providers="cpu")
    result = explainer.explain(x)
    seconds = time.perf_counter() - start
    alone = explainer.explain(x[:1]).maps
    meta = onnx_gbp.read_metadata(explainer.model)

    names = relu_input_names(source)
    probe = copy.deepcopy(explainer.model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)
    session = make_session(probe, "cpu")
    feeds = {meta["input"]["name"]: x}
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for m in METHODS:  # the probe is the same computation: extra outputs must not change the maps
        assert np.array_equal(outs[meta["outputs"][m]], result.maps[m]), f"probe changed the {m} map"
    logits = result.outputs[source.graph.output[0].name]
    return Ours(result.maps, result.targets, logits, {n: outs[n] for n in names}, names,
                list(meta["relu_nodes"]), len(source.graph.node), len(explainer.model.graph.node), seconds, alone)


# ---------------------------------------------------------------------------------------------------------
# Matching ONNX Runtime's ReLU inputs to the reference's ReLU calls, and the gates it took
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Match:
    call: int
    tensor: str | None  # the ONNX tensor holding this call's input, None if no tensor matches
    forward_err: float  # max|x_ort - x_ref| / max|x_ref|
    near_kink: int  # units with |x_ref| within the tensor's measured rounding error of the kink(s)
    flipped: int  # units whose gate ONNX Runtime took the other way


#: A ReLU input computed by ONNX Runtime in float32 must equal the float64 reference's to this relative error.
FORWARD_TOL = 1e-4


def match_calls(calls: list[ReluRecord], relu_inputs: dict[str, np.ndarray]) -> list[Match]:
    """For each reference ReLU call, the ONNX tensor with the same shape and the closest values."""
    matches, used = [], set()
    for k, call in enumerate(calls):
        ref = call.x.numpy()
        scale = max(float(np.abs(ref).max()), 1e-30)
        best, best_err = None, np.inf
        for name, value in relu_inputs.items():
            if name in used or value.shape != ref.shape:
                continue
            err = float(np.abs(value.astype(np.float64) - ref).max()) / scale
            if err < best_err:
                best, best_err = name, err
        if best is None or best_err > 1e-2:
            matches.append(Match(k, None, np.inf, 0, 0))
            continue
        used.add(best)
        ort = relu_inputs[best].astype(np.float64)
        envelope = float(np.abs(ort - ref).max())
        near = int((np.abs(ref) <= envelope).sum())
        flipped = int(((ort > 0) != (ref > 0)).sum())
        if call.upper is not None and np.isfinite(call.upper):
            near += int((np.abs(ref - call.upper) <= envelope).sum())
            flipped += int(((ort < call.upper) != (ref < call.upper)).sum())
        matches.append(Match(k, best, best_err, near, flipped))
    return matches


def ort_gate(matches: list[Match], relu_inputs: dict[str, np.ndarray]) -> Gate:
    """The gates ONNX Runtime's forward pass took, for the reference's ReLU calls that have a matching tensor."""
    def gate(k: int, upper: float | None):
        if k >= len(matches) or matches[k].tensor is None:
            return None
        ort = torch.from_numpy(relu_inputs[matches[k].tensor])
        return ort > 0, (ort < upper if upper is not None else None)
    return gate


# ---------------------------------------------------------------------------------------------------------
# One comparison: a model, an exported ONNX file, a batch, a target
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Parity:
    """Everything measured for one exported model and target."""

    ours: Ours
    matches: list[Match]
    reference: dict[str, np.ndarray]  # float64, gates from ONNX Runtime
    plain: dict[str, np.ndarray]  # float64, the reference's own gates
    autograd: np.ndarray | None = None  # float64 plain torch autograd (class targets)
    captum: dict[str, np.ndarray] = field(default_factory=dict)  # float64 Captum guided / deconvnet
    calls: int = 0  # ReLU calls the reference overrode
    choice_gap: float = 0.0  # reference's (max - value at the target we chose) / max|value|, worst sample

    @property
    def flipped(self) -> int:
        return sum(m.flipped for m in self.matches)

    @property
    def near_kink(self) -> int:
        return sum(m.near_kink for m in self.matches)

    @property
    def forward_err(self) -> float:
        return max([m.forward_err for m in self.matches if m.tensor is not None], default=0.0)

    @property
    def unmatched(self) -> list[int]:
        return [m.call for m in self.matches if m.tensor is None]

    def row(self, method: str) -> dict:
        ours, ref = self.ours.maps[method], self.reference[method]
        row = {"rel": rel_err(ours, ref), "cos": cosine(ours, ref), "rel_plain": rel_err(ours, self.plain[method])}
        if method == "vanilla" and self.autograd is not None:
            row["rel_autograd"] = rel_err(ours, self.autograd)
        if method in self.captum:
            row["rel_captum"] = rel_err(ours, self.captum[method])
        return row


def measure(reference: Reference, ours: Ours, objective: Callable, target_values: np.ndarray) -> Parity:
    """Hold `ours` against the reference for one objective: with the reference's own gates and with the gates
    ONNX Runtime took. `target_values` (N, K): the values our target choice was made among (logits, or the
    neuron layer), to check that choice against the reference's."""
    matches = match_calls(reference.calls, ours.relu_inputs)
    gate = ort_gate(matches, ours.relu_inputs)
    plain = {m: reference.gradient(objective, m) for m in METHODS}
    # With no gate flipped the gated pass is the same computation as the plain one.
    flipped = any(m.flipped for m in matches)
    gated = {m: reference.gradient(objective, m, gate) for m in METHODS} if flipped else plain
    chosen = target_values[np.arange(len(target_values)), ours.targets]
    gap = float(((target_values.max(axis=1) - chosen) / np.abs(target_values).max(axis=1)).max())
    return Parity(ours, matches, gated, plain, calls=len(reference.calls), choice_gap=gap)


class Case:
    """One PyTorch model and image batch, held against onnx-gbp on each of its ONNX exports. Everything is
    computed once and cached: the float64 reference pass is shared by every exporter, method and target."""

    def __init__(self, name: str, model: torch.nn.Module, x: np.ndarray, export: Callable, workdir: Path,
                 captum: bool = False, neuron_call: int | None = None, neuron_pre: bool = False):
        self.name, self.model, self.x, self._export = name, model, x, export
        self.workdir, self.captum, self.neuron_call, self.neuron_pre = Path(workdir), captum, neuron_call, neuron_pre
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def model64(self) -> torch.nn.Module:
        return self._cached("model64", lambda: float64_copy(self.model))

    @property
    def reference(self) -> Reference:
        return self._cached("reference", lambda: Reference(self.model64, self.x))

    def onnx_path(self, exporter: str) -> Path:
        def make():
            path = self.workdir / f"{self.name}.{exporter}.onnx"
            start = time.perf_counter()
            self._export(self.model, path, torch.from_numpy(self.x), exporter)
            self._cache[("export_seconds", exporter)] = time.perf_counter() - start
            return path
        return self._cached(("onnx", exporter), make)

    def class_parity(self, exporter: str) -> Parity:
        def make():
            ours = run_ours(self.onnx_path(exporter), self.x)
            objective = class_objective(ours.targets)
            parity = measure(self.reference, ours, objective, self.reference.logits.reshape(len(self.x), -1))
            key = tuple(int(t) for t in ours.targets)
            parity.autograd = self._cached(("autograd", key), lambda: autograd_map(self.model64, self.x, objective))
            if self.captum:
                parity.captum = self._cached(("captum", key), lambda: captum_maps(self.model64, self.x, ours.targets))
            return parity
        return self._cached(("class", exporter), make)

    def neuron_layer(self, exporter: str) -> str:
        """The ONNX tensor holding the output (the input if `neuron_pre`) of the reference's ReLU call
        `neuron_call`."""
        parity = self.class_parity(exporter)
        match = parity.matches[self.neuron_call]
        assert match.tensor is not None, f"no ONNX tensor matches ReLU call {self.neuron_call} of {self.name}"
        return match.tensor if self.neuron_pre else parity.ours.relu_outputs[match.tensor]

    def neuron_parity(self, exporter: str) -> Parity:
        def make():
            ours = run_ours(self.onnx_path(exporter), self.x, layer=self.neuron_layer(exporter))
            k = self.neuron_call
            call = self.reference.calls[k]
            values = (call.x if self.neuron_pre else call.y.detach()).reshape(len(self.x), -1).numpy()
            return measure(self.reference, ours, neuron_objective(k, ours.targets, self.neuron_pre), values)
        return self._cached(("neuron", exporter), make)


def captum_maps(model64: torch.nn.Module, x: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Captum's GuidedBackprop and Deconvolution (module hooks on nn.ReLU, in-place and reused ones included),
    in float64."""
    import warnings

    from captum.attr import Deconvolution, GuidedBackprop

    model = copy.deepcopy(model64)
    xt = torch.tensor(x, dtype=torch.float64)
    target = [int(t) for t in targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"guided": GuidedBackprop(model).attribute(xt, target=target).detach().numpy(),
                "deconvnet": Deconvolution(model).attribute(xt, target=target).detach().numpy()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """For the test modules that import it: torch's float64 kernels stall for seconds with two threads on a loaded two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
