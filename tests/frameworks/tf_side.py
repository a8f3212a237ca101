"""The TensorFlow/Keras side of the parity tests. Runs in its own environment (.venv-tf, see
tools/framework_envs.sh), never imports onnx-gbp, and talks to the main test process through files only.

    python tf_side.py export DIR      build every model (fixed seeds), export it with tf2onnx, and compute
                                      Keras's own guided / deconvnet / vanilla maps with TensorFlow's gates
    python tf_side.py reference DIR   recompute those maps with the ReLU gates that ONNX Runtime's forward pass
                                      took (DIR/<model>/gates_<target>.npz, written by the main process)

The reference: every ReLU of the model goes through one function made with `tf.custom_gradient` that applies the
method's rule (guided dy*[x>0]*[dy>0], deconvnet dy*[dy>0], vanilla dy*[x>0]; ReLU6 also keeps [x<6]).
It is installed by patching `tf.nn.relu` and `tf.nn.relu6`, which every Keras ReLU form reaches at call time:
`activation="relu"`, `layers.ReLU()`, `layers.ReLU(6.)` (MobileNetV2), `layers.Activation("relu")` and a raw
`tf.nn.relu` inside a layer. Each forward pass counts the calls, and the count must equal the number of ReLU ops
in the traced graph. Gradients come from `tf.GradientTape`. Class targets are the logit feeding the softmax.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402
from side_common import METHODS, TARGETS, main, write_gated_references  # noqa: E402

SEED = 1234
BATCH = 2

#: name -> (builder, input size, opset, Keras layer whose output holds the intermediate-neuron target)
MODELS = {
    "custom_cnn": ("custom", 32, 17, "mix_relu"),
    "resnet50": ("ResNet50", 64, 18, "conv3_block2_out"),
    "mobilenet_v2": ("MobileNetV2", 64, 18, "block_6_expand_relu"),
    "vgg16": ("VGG16", 64, 18, "block3_conv3"),
    "efficientnet_b0": ("EfficientNetB0", 64, 18, "block4a_expand_activation"),
}


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

class TfRelu(layers.Layer):
    """A raw `tf.nn.relu` inside the graph (Keras 3 does not let tf ops touch symbolic tensors directly)."""

    def call(self, x):
        return tf.nn.relu(x)


def custom_cnn(size: int) -> keras.Model:
    """A small functional CNN that uses ReLU all four ways Keras allows, and applies two ReLUs to one tensor
    (the case tf2onnx's merge_duplication optimiser folds into one node)."""
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_act")(inp)         # activation="relu"
    x = layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = layers.ReLU(name="relu_layer")(x)                                                       # layers.ReLU
    x = layers.MaxPooling2D(pool_size=2, name="max_pool")(x)
    y = layers.Conv2D(24, 3, padding="same", name="conv3")(x)
    y = layers.BatchNormalization(name="bn3")(y)
    y = layers.Activation("relu", name="act_relu")(y)                                           # Activation
    t = layers.Conv2D(24, 1, name="conv_skip")(x)
    t = TfRelu(name="tf_relu")(t)                                                               # tf.nn.relu
    u = layers.Conv2D(24, 3, padding="same", name="conv_twin")(x)
    u1 = layers.Conv2D(24, 3, padding="same", name="twin_a")(layers.ReLU(name="twin_relu_a")(u))
    u2 = layers.Conv2D(24, 1, name="twin_b")(TfRelu(name="twin_relu_b")(u))                    # same input: twins
    v = layers.Add(name="mix")([y, t, u1, u2])
    v = layers.Activation("relu", name="mix_relu")(v)
    v = layers.AveragePooling2D(pool_size=2, name="avg_pool")(v)
    v = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv_down")(v)
    v = layers.GlobalAveragePooling2D(name="gap")(v)
    v = layers.Dense(32, activation="relu", name="fc")(v)
    v = layers.Dense(10, name="logits")(v)
    out = layers.Softmax(name="probs")(v)
    return keras.Model(inp, out, name="custom_cnn")


def build(name: str) -> keras.Model:
    kind, size = MODELS[name][:2]
    keras.utils.set_random_seed(SEED)
    if kind == "custom":
        model = custom_cnn(size)
    else:
        model = getattr(keras.applications, kind)(weights=None, input_shape=(size, size, 3), classes=10)
    _randomise_statistics(model)
    return model


def _randomise_statistics(model: keras.Model) -> None:
    """Fresh BatchNormalization layers are the identity in inference and fresh biases are zero (tf2onnx drops
    them): give them real values."""
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        bias = getattr(layer, "bias", None)
        if bias is not None and not isinstance(layer, layers.BatchNormalization):
            bias.assign(rng.normal(0.0, 0.1, bias.shape).astype(np.float32))
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.6, 1.4, c).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.2, c).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))


def sample_input(name: str) -> np.ndarray:
    size = MODELS[name][1]
    return np.random.default_rng(SEED + 1).normal(size=(BATCH, size, size, 3)).astype(np.float32)


def logits_model(model: keras.Model, layer: str) -> tuple[keras.Model, object]:
    """(sub-model giving the target layer's output and the features feeding the classifier, the classifier
    as a function of those features without its softmax)."""
    if "logits" in [l.name for l in model.layers]:
        head = model.get_layer("logits")
        sub = keras.Model(model.input, [model.get_layer(layer).output, head.output])
        return sub, lambda h: h
    dense = model.get_layer("predictions")  # Keras applications: Dense(classes, activation="softmax")
    sub = keras.Model(model.input, [model.get_layer(layer).output, dense.input])
    return sub, lambda h: tf.matmul(h, dense.kernel) + dense.bias


# ---------------------------------------------------------------------------------------------------------
# The reference ReLU
# ---------------------------------------------------------------------------------------------------------

class ReluPatch:
    """Replaces tf.nn.relu / tf.nn.relu6 with the method's rule. `gates`, when given, is the list of ReLU inputs
    (in call order) whose signs the rule uses instead of TensorFlow's own forward values."""

    def __init__(self, method: str, gates: list[np.ndarray] | None = None, record: bool = False):
        self.method, self.gates, self.record = method, gates, record
        self.calls = 0
        self.inputs: list[np.ndarray] = []
        self.kinds: list[str] = []

    def _make(self, original, cap: float | None):
        @tf.custom_gradient
        def relu(x):
            i = self.calls
            self.calls += 1
            self.kinds.append("relu6" if cap else "relu")
            if self.record:
                self.inputs.append(x.numpy())
            g = x if self.gates is None else tf.constant(self.gates[i])
            if self.gates is not None and tuple(g.shape) != tuple(x.shape):
                raise RuntimeError(f"gate {i} has shape {g.shape}, the ReLU input {x.shape}")
            y = original(x)

            def grad(dy):
                if cap is not None:
                    dy = tf.where(g < cap, dy, tf.zeros_like(dy))
                if self.method == "vanilla":
                    return tf.where(g > 0, dy, tf.zeros_like(dy))
                if self.method == "deconvnet":
                    return tf.maximum(dy, 0.0)
                return tf.where(g > 0, tf.maximum(dy, 0.0), tf.zeros_like(dy))
            return y, grad
        return relu

    @contextlib.contextmanager
    def installed(self):
        relu, relu6 = tf.nn.relu, tf.nn.relu6
        tf.nn.relu, tf.nn.relu6 = self._make(relu, None), self._make(relu6, 6.0)
        try:
            yield self
        finally:
            tf.nn.relu, tf.nn.relu6 = relu, relu6


def count_relu_ops(model: keras.Model, x: np.ndarray) -> int:
    """ReLU-family ops in the traced inference graph of the unpatched model."""
    fn = tf.function(lambda t: model(t, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((None, *x.shape[1:]), tf.float32)).graph
    kinds = {"Relu", "Relu6"}
    count = sum(op.type in kinds for op in graph.get_operations())
    for f in graph.as_graph_def().library.function:  # ops inside nested functions, if any
        count += sum(n.op in kinds for n in f.node_def)
    return count


def reference_maps(model: keras.Model, layer: str, x: np.ndarray, method: str, target: str,
                   gates: list[np.ndarray] | None = None, record: bool = False, channel: int = 0):
    """The method's map of the class logit (per sample, the predicted class), of the most activated neuron of
    `layer` ("neuron"), or of the sum of its channel `channel` ("channel"), and what was chosen.
    Returns (map, chosen, patch)."""
    sub, head = logits_model(model, layer)
    xt = tf.constant(x)
    patch = ReluPatch(method, gates, record)
    with patch.installed(), tf.GradientTape() as tape:
        tape.watch(xt)
        act, feat = sub(xt, training=False)
        if target == "class":
            scores = tf.reshape(head(feat), (len(x), -1))
        elif target == "neuron":
            scores = tf.reshape(act, (len(x), -1))
        else:  # NHWC: one channel's map, summed
            scores = tf.reduce_sum(act, axis=list(range(1, len(act.shape) - 1)))
        chosen = tf.argmax(scores, axis=1) if target != "channel" else tf.fill([len(x)], tf.cast(channel, tf.int64))
        picked = tf.reduce_sum(scores * tf.one_hot(chosen, scores.shape[1], dtype=scores.dtype))
    grad = tape.gradient(picked, xt)
    return grad.numpy(), chosen.numpy(), patch


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------

def export_onnx(model: keras.Model, size: int, opset: int, path: Path, merge_duplicates: bool = False) -> dict:
    import onnx
    import tf2onnx.convert
    import tf2onnx.optimizer

    optimizers = tf2onnx.optimizer._get_optimizers()  # noqa: SLF001 (the converter's own list)
    if not merge_duplicates:  # merging identical ReLU nodes changes guided/deconvnet maps (DESIGN.md)
        optimizers = type(optimizers)((k, v) for k, v in optimizers.items() if k != "merge_duplication")
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, optimizers=optimizers)
    onnx.save(proto, str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"exporter": f"tf2onnx {tf2onnx.__version__}", "opset": opset, "ops": ops}


def onnx_layer_tensor(path: Path, layer: str, keras_shape: tuple) -> str:
    """The ONNX tensor that holds Keras layer `layer`'s output (NHWC or, where tf2onnx moved the transposes past
    it, NCHW)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    nhwc = tuple(keras_shape[1:])
    nchw = (nhwc[-1], *nhwc[:-1]) if len(nhwc) == 3 else nhwc
    found = []
    for node in proto.graph.node:
        if f"/{layer}_1/" in node.name or f"/{layer}/" in node.name:
            for out in node.output:
                dims = shapes.get(out, ())[1:]
                if dims == nhwc or dims == nchw:
                    found.append(out)
    if not found:
        raise RuntimeError(f"No ONNX tensor found for Keras layer {layer!r}")
    return found[-1]  # the layer's last op is its output


def cmd_export(out: Path, names: list[str]) -> None:
    import tf2onnx

    manifest = {"framework": "tensorflow", "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                                                        "tf2onnx": tf2onnx.__version__}, "models": {}}
    for name in names:
        kind, size, opset, layer = MODELS[name]
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model = build(name)
        model.save_weights(str(d / "model.weights.h5"))
        x = sample_input(name)
        info = export_onnx(model, size, opset, d / "model.onnx")
        layer_shape = tuple(model.get_layer(layer).output.shape)
        tensor = onnx_layer_tensor(d / "model.onnx", layer, layer_shape)
        info.update(layer=layer, onnx_layer=tensor, layer_shape=layer_shape[1:],
                    relu_ops=count_relu_ops(model, x))
        if name == "custom_cnn":  # the trap: tf2onnx's default optimisers merge the twin ReLUs
            info["merged"] = export_onnx(model, size, opset, d / "model_merged.onnx", merge_duplicates=True)
        sub, head = logits_model(model, layer)
        act, feat = sub(x, training=False)
        arrays = {"x": x, "logits": head(feat).numpy()}
        # the channel target: the channel of the layer with the largest summed activation on the first image
        info["channel"] = int(np.argmax(np.sum(act.numpy()[0], axis=(0, 1))))
        for target in TARGETS:
            for method in METHODS:
                grad, chosen, patch = reference_maps(model, layer, x, method, target, record=method == "vanilla",
                                                     channel=info["channel"])
                arrays[f"native_{target}_{method}"] = grad
                arrays[f"chosen_{target}"] = chosen
                info[f"relu_calls_{target}"] = patch.calls
                if patch.record:
                    for i, a in enumerate(patch.inputs):
                        arrays[f"relu_in_{target}_{i}"] = a
                    info[f"relu_kinds_{target}"] = patch.kinds
        np.savez(d / "reference.npz", **arrays)
        manifest["models"][name] = info
        print(f"[tf] {name}: exported, {info['relu_ops']} ReLU ops, {info['relu_calls_class']} patched calls",
              flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def cmd_reference(out: Path) -> None:
    def load(name: str, d: Path) -> keras.Model:
        model = build(name)
        model.load_weights(str(d / "model.weights.h5"))
        return model

    def run(model, info, saved, method, target, gates):
        grad, chosen, patch = reference_maps(model, info["layer"], saved["x"], method, target, gates,
                                             channel=info["channel"])
        return grad, chosen, patch.calls

    write_gated_references(out, "tf", load, run)

if __name__ == "__main__":
    main(__doc__, cmd_export, cmd_reference, list(MODELS))
