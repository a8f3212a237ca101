"""Run exported saliency models on ONNX Runtime: the `Explainer` keeps one session per input shape and reuses it."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import InputError, ProviderError, SymbolicShapeError
from .export import TARGET_USED, build, read_metadata, saliency_name
from .methods import check_methods
from .model import ModelLike, dims_of, load_model, normalise, pick_image_input
from .targets import Neuron, TargetSpec

#: ONNX Runtime's optimisation levels by name.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
#: Graph rewrites that change results: Pad_Fusion folds a zero Pad into the next MaxPool, whose implicit
#: padding is -inf, and changed a Keras ResNet50V2 export's logits by 3.4e-3.
UNSAFE_OPTIMIZERS = ["Pad_Fusion"]


@dataclass
class Explanation:
    """Everything one run computes: a map per method, the targets used, and the model's own outputs."""

    maps: dict[str, np.ndarray]
    targets: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def session_options(threads: int | None = None, optimization: str = "all"):
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, not {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    # Idle pool threads sleep instead of spinning. A backward graph runs hundreds of small elementwise ops between
    # its convolutions, and on a shared CPU the spinning threads took cores from the thread doing the work: guided
    # maps of MobileNetV2, EfficientNet-Lite0 and ResNet-50 ran 16-38% faster without it, plain inference as fast
    # (docs/benchmarks.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """'auto' (CUDA when onnxruntime-gpu sees a GPU, else CPU), 'cpu', 'cuda', or ONNX Runtime provider names."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
        if key == "cpu":
            return ["CPUExecutionProvider"]
        if key == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ProviderError("CUDA was requested, but this ONNX Runtime has no CUDA provider: install "
                                    "onnx-gbp[gpu] (onnxruntime-gpu) in place of onnxruntime.")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [providers]
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ProviderError(f"Execution provider(s) {unknown} are not available; this ONNX Runtime has {available}.")
    return list(providers)


def make_session(model: onnx.ModelProto, providers: str | Sequence[str] = "auto", threads: int | None = None,
                 optimization: str = "all"):
    """An ONNX Runtime session for `model`. A CUDA provider that fails to load falls back to CPU with one warning
    when the choice was 'auto', and raises ProviderError when CUDA was asked for explicitly."""
    import onnxruntime as ort

    wanted = resolve_providers(providers)
    with _quiet_native_stderr():
        session = ort.InferenceSession(model.SerializeToString(), session_options(threads, optimization),
                                       providers=wanted, disabled_optimizers=UNSAFE_OPTIMIZERS)
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in session.get_providers():
        if isinstance(providers, str) and providers.lower() == "auto":
            warnings.warn("The CUDA provider could not be loaded (CUDA or cuDNN libraries missing?); running on CPU.")
        else:
            raise ProviderError("The CUDA provider could not be loaded (CUDA or cuDNN libraries missing?); "
                                "use providers='cpu' or 'auto' to run on the CPU.")
    return session


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the runtime's native loader messages; our own error says what matters."""
    import os
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


class Explainer:
    """Saliency maps for an ONNX model, computed by ONNX Runtime from an augmented copy of the graph.

    >>> explainer = Explainer("model.onnx", method="guided")
    >>> maps = explainer.attribute(images)            # float32, same shape as images
    >>> result = explainer.explain(images, target=[281, 282])   # every method, targets used, model outputs

    model: a path or an `onnx.ModelProto` (never modified).
    method / methods: "guided", "deconvnet" or "vanilla"; several share one forward pass.
    layer, neuron: explain one neuron of an intermediate layer instead of a class (see `TargetSpec`).
    output, probability: which output holds the class scores, and whether to explain the probability rather
        than the logit feeding a final softmax.
    providers: "auto", "cpu", "cuda", or ONNX Runtime provider names.
    input_name, input_shape: which graph input is the image, and its full shape where the model leaves
        dimensions symbolic (otherwise taken from the first batch).
    batch_size: larger inputs run in chunks of this many samples (with a progress bar if `progress`).
    """

    def __init__(self, model: ModelLike, method: str = "guided", methods: Sequence[str] | None = None,
                 layer: str | None = None, neuron: Neuron = None, output: str | None = None,
                 probability: bool = False, providers: str | Sequence[str] = "auto", input_name: str | None = None,
                 input_shape: Sequence[int] | None = None, batch_size: int = 32, threads: int | None = None,
                 optimization: str = "all", progress: bool = False):
        self.methods = check_methods(methods or (method,))
        self.target = TargetSpec(output=output, probability=probability, layer=layer, neuron=neuron)
        self.providers, self.threads, self.optimization = providers, threads, optimization
        self.batch_size, self.progress = int(batch_size), progress
        self._source = load_model(model)
        self._input_name = input_name
        dims = dims_of(pick_image_input(self._source, input_name)) or ()
        self._symbolic_spatial = any(d is None for d in dims[1:])
        self._built: dict[tuple | None, _Built] = {}
        self._build(tuple(input_shape) if input_shape is not None else None)

    # -- building ---------------------------------------------------------------------------------------
    def _build(self, shape: tuple | None) -> "_Built | None":
        key = None if shape is None else tuple(shape[1:])
        if key in self._built:
            return self._built[key]
        try:
            fwd = normalise(self._source, self._input_name, shape)
        except SymbolicShapeError:
            if shape is None:  # wait for the first batch to fix the spatial sizes
                return None
            raise
        outputs = [o.name for o in fwd.graph.output]
        model = build(fwd, self.methods, self.target)
        meta = read_metadata(model)
        scores = meta["target"]["tensor"]
        built = _Built(make_session(model, self.providers, self.threads, self.optimization), model, fwd.input_name,
                       fwd.input_shape, fwd.layout, fwd.fixed_batch,
                       onnx.helper.tensor_dtype_to_np_dtype(fwd.dtypes[fwd.input_name]), outputs,
                       meta["target"]["target_input"], int(np.prod(fwd.shapes[scores][1:])))
        self._built[tuple(fwd.input_shape[1:])] = built
        self._built.setdefault(None, built)
        if not self._symbolic_spatial:  # no other input size will come: drop the source's copy of the weights
            self._source = None
        return built

    @property
    def model(self) -> onnx.ModelProto:
        """The augmented model (for the first input shape built)."""
        return self._first().model

    @property
    def input_shape(self) -> tuple:
        return self._first().input_shape

    @property
    def layout(self) -> str:
        return self._first().layout

    @property
    def num_classes(self) -> int:
        """Number of classes (class targets) or of neurons in the target layer (neuron targets)."""
        return self._first().num_classes

    @property
    def target_choice(self) -> str:
        """What is explained, in words: e.g. the logits feeding a final Softmax rather than its probabilities."""
        return read_metadata(self._first().model)["target"]["choice"]

    @property
    def provider(self) -> str:
        return self._first().session.get_providers()[0]

    def _first(self) -> "_Built":
        if None not in self._built:
            raise InputError("The model's input has symbolic dimensions: give input_shape, or call explain() "
                             "once so the first batch fixes them.")
        return self._built[None]

    # -- running ----------------------------------------------------------------------------------------
    def attribute(self, x: np.ndarray, target: int | Sequence[int] | None = None,
                  inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The first method's map for each sample: float32, the shape and layout of `x`."""
        return self.explain(x, target, inputs).maps[self.methods[0]]

    def explain(self, x: np.ndarray, target: int | Sequence[int] | None = None,
                inputs: dict[str, np.ndarray] | None = None) -> Explanation:
        """Every method's maps, the targets used (class or flat neuron index per sample) and the model's
        outputs. `target`: None = each sample's predicted class, an int for all samples, or one per sample.
        `inputs`: values for the model's other inputs, if it has any (split into chunks with `x` when their
        first axis is the batch)."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise InputError(f"Input must be a float array (preprocessed image batch), got dtype {x.dtype}.")
        built = self._built.get(tuple(x.shape[1:])) if x.ndim else None
        if built is None:  # a model with symbolic spatial sizes gets one graph per input size
            built = self._build(x.shape) if self._symbolic_spatial and x.ndim else self._first()
        built.check_shape(x)
        targets = self._targets(target, len(x), built)
        x = x.astype(built.dtype, copy=False)
        names = [saliency_name(m) for m in self.methods] + [TARGET_USED] + built.outputs
        chunk = built.fixed_batch or max(1, self.batch_size)
        starts = range(0, len(x), chunk)
        results: list[list[np.ndarray]] = []
        with _progress(starts, self.progress and len(starts) > 1, "explaining") as bar:
            for start in bar:
                feeds = {built.input_name: x[start:start + chunk]}
                for name, value in (inputs or {}).items():
                    value = np.asarray(value)
                    feeds[name] = value[start:start + chunk] if value.ndim and len(value) == len(x) else value
                if built.target_input:
                    feeds[built.target_input] = targets[start:start + chunk]
                results.append(built.session.run(names, feeds))
        columns = [np.concatenate(parts) for parts in zip(*results)]
        maps = {m: columns[i] for i, m in enumerate(self.methods)}
        outputs = {name: columns[len(self.methods) + 1 + i] for i, name in enumerate(names[len(self.methods) + 1:])}
        return Explanation(maps, columns[len(self.methods)], outputs)

    def _targets(self, target, n: int, built: "_Built") -> np.ndarray:
        if target is None:
            return np.full(n, -1, np.int64)
        if not built.target_input:
            raise InputError("This explainer targets a neuron of a layer; class targets do not apply.")
        targets = np.asarray(target, dtype=np.int64).reshape(-1)
        if targets.size == 1:
            targets = np.full(n, targets[0], np.int64)
        if targets.size != n:
            raise InputError(f"Got {targets.size} targets for a batch of {n} samples: give one, or one per sample.")
        bad = [int(t) for t in targets if t != -1 and not 0 <= t < built.num_classes]
        if bad:
            raise InputError(f"Target(s) {bad} out of range: the model has {built.num_classes} classes "
                             f"(0..{built.num_classes - 1}; -1 means the predicted class).")
        return targets


@dataclass
class _Built:
    """One exported model and its session, for one input shape."""

    session: object
    model: onnx.ModelProto
    input_name: str
    input_shape: tuple
    layout: str
    fixed_batch: int | None
    dtype: np.dtype
    outputs: list[str]  # the original model's outputs
    target_input: str | None
    num_classes: int

    def check_shape(self, x: np.ndarray) -> None:
        want = self.input_shape
        if x.ndim != len(want) or tuple(x.shape[1:]) != tuple(want[1:]):
            hint = ""
            if x.ndim == 4 and len(want) == 4 and tuple(x.shape[1:]) == (want[2], want[3], want[1]):
                hint = " The array looks channels-last (NHWC); this model takes NCHW: transpose it with (0, 3, 1, 2)."
            elif x.ndim == 4 and len(want) == 4 and tuple(x.shape[1:]) == (want[3], want[1], want[2]):
                hint = " The array looks channels-first (NCHW); this model takes NHWC: transpose it with (0, 2, 3, 1)."
            elif x.ndim == len(want) - 1:
                hint = " Add a batch axis (x[None])."
            raise InputError(f"Input shape {tuple(x.shape)} does not fit the model's input "
                             f"{tuple('N' if d is None else d for d in want)} ({self.layout}).{hint}")
        if len(x) == 0:
            raise InputError("The input batch is empty.")


@contextlib.contextmanager
def _progress(items, show: bool, label: str):
    if not show:
        yield items
        return
    import click

    with click.progressbar(items, label=label, file=None) as bar:
        yield bar
