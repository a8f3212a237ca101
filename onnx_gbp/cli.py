"""The `onnx-gbp` command line: explain, export, layers, check, demo.

Each command maps its options onto the Python API and prints what a person needs; every GbpError (and OSError)
becomes one line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import click

from . import __version__, images, pipeline
from .errors import GbpError, InputError, suggest
from .methods import METHODS


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GbpError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:
            raise
        except OSError as exc:  # disk full, permission denied, ...: the OS's own words are the clearest
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="onnx-gbp")
def cli() -> None:
    """Guided backpropagation, deconvnet and vanilla-gradient saliency maps for any CNN in ONNX.

    \b
    Start here:
      onnx-gbp demo                                   the bundled EfficientNet-Lite0 on three photos
      onnx-gbp explain model.onnx photos/ -o maps     maps for your model and images
      onnx-gbp layers model.onnx                      the layers --layer can target
      onnx-gbp check model.onnx                       operator coverage and a gradient self-check
      onnx-gbp export model.onnx -o model.gbp.onnx    a model that outputs its own saliency maps
    """


def main() -> None:
    warnings.showwarning = lambda message, *_args, **_kw: click.echo(f"warning: {message}", err=True)
    try:
        cli(prog_name="onnx-gbp")
    except BrokenPipeError:  # `onnx-gbp layers model.onnx | head`: the reader left, which is no error
        import os
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


# -- option parsing -------------------------------------------------------------------------------------------
def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers ({what}).") from None


def _shape(ctx, param, text: str | None):
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    if parts and parts[0].upper() in ("N", "?", "-1"):  # the batch axis stays dynamic anyway
        parts[0] = "1"
    return _ints(",".join(parts), "e.g. 1,3,224,224")


def _floats(ctx, param, text: str | None):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers.") from None


def _neuron(ctx, param, text: str | None):
    if text is None or text == "max":
        return text
    values = _ints(text, "'max', a channel, or a position such as 3,5,7")
    return values[0] if len(values) == 1 else values


def _model_options(f):
    """What to explain and how: shared by explain and export."""
    options = [
        click.option("-m", "--method", "methods", multiple=True, type=click.Choice(METHODS),
                     help="Attribution method; repeat for several (they share one forward pass). [default: guided]"),
        click.option("--layer", help="Explain a neuron of this layer (tensor or node name, see `onnx-gbp layers`) "
                                     "instead of a class."),
        click.option("--neuron", callback=_neuron, metavar="max|C|C,Y,X",
                     help="With --layer: 'max' (most active, per image), a channel index (sum of its map), or a "
                          "position such as 3,5,7. [default: max]"),
        click.option("--output", help="The model output holding class scores. [default: the first]"),
        click.option("--probability", is_flag=True,
                     help="Explain the softmax probability instead of the logit feeding it."),
        click.option("--input-name", help="The graph input to explain. [default: the first float rank-4 input]"),
        click.option("--input-shape", callback=_shape, metavar="N,C,H,W",
                     help="Full input shape, for models whose input size is symbolic."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _methods(methods) -> tuple[str, ...]:
    return tuple(dict.fromkeys(methods)) or ("guided",)  # repeated -m guided counts once


def _provider_option(f):
    return click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu sees a GPU).")(f)


# -- explain --------------------------------------------------------------------------------------------------
@cli.command(short_help="Saliency maps for images, folders of them, or .npy tensors.")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("gbp-out"), show_default=True,
              help="Folder for the pictures, .npy maps and summary.json (created; files in it are replaced).")
@_model_options
@click.option("-t", "--target", help="Class to explain, as an index or a class name. [default: each image's "
                                     "predicted class]")
@click.option("--preset", type=click.Choice(list(images.PRESETS)),
              help="Image preprocessing: imagenet mean/std, tf [-1,1], unit [0,1], caffe (BGR, mean subtracted), "
                   "raw 0..255. [default: MODEL.json beside the model, else imagenet (unit for 1 channel)]")
@click.option("--mean", callback=_floats, metavar="M[,M,M]",
              help="Per-channel mean, in the preset's pixel scale (0..1; 0..255 for caffe and raw).")
@click.option("--std", callback=_floats, metavar="S[,S,S]",
              help="Per-channel std, in the preset's pixel scale (0..1; 0..255 for caffe and raw).")
@click.option("--bgr/--rgb", default=None, help="Channel order the model expects.")
@click.option("--resize", type=click.IntRange(1), metavar="PIXELS",
              help="Short side before the centre crop. [default: input size / 0.875, i.e. 256 for 224]")
@click.option("--fit", type=click.Choice(["crop", "stretch"]),
              help="crop: keep the aspect ratio and cut the centre; stretch: resize straight to the input size.")
@click.option("--interpolation", type=click.Choice(list(images.INTERPOLATIONS)))
@click.option("--labels", type=click.Path(path_type=Path),
              help="Class names: text (one per line) or JSON. [default: from MODEL.json]")
@click.option("--grey", is_flag=True, help="Draw guided/deconvnet maps as grey-scale magnitude, vanilla as grey.")
@click.option("--overlay/--no-overlay", default=True, show_default=True, help="Also write heat-map overlays.")
@click.option("--grid", is_flag=True, help="Also write grid.png, a contact sheet of the images and their maps.")
@click.option("--grid-picks", type=click.IntRange(1), default=25, show_default=True,
              help="At most this many images on the sheet, picked at random (with --seed) from all inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --grid-picks choice.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@_provider_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no per-image lines.")
def explain(model, inputs, out_dir, methods, target, layer, neuron, output, probability, input_name, input_shape,
            preset, mean, std, bgr, resize, fit, interpolation, labels, grey, overlay, grid, grid_picks, seed,
            batch_size, provider, quiet):
    """Saliency maps for images (PNG, JPEG, ...; folders of them) or preprocessed .npy tensors.

    \b
    Per input NAME it writes, into the -o folder:
      NAME.input.png            the image as the model saw it (resized, cropped)
      NAME.METHOD.png           the map: vanilla with zero as mid-grey; guided and deconvnet their positive part
      NAME.METHOD.overlay.png   a heat map over the photo
      NAME.METHOD.npy           the raw map, float32, in the model's layout
    and summary.json (predicted class, score, target, timing) and, with --grid, grid.png.

    \b
    Examples:
      onnx-gbp explain resnet50.onnx cat.jpg dog.png -o maps
      onnx-gbp explain resnet50.onnx photos/ -m guided -m vanilla --target "tabby" --grid
      onnx-gbp explain model.onnx x.npy --layer conv3 --neuron max
      onnx-gbp explain keras_vgg16.onnx photos/ --preset caffe
    """
    run_explain(model, inputs, out_dir, methods=_methods(methods), target=target, layer=layer, neuron=neuron,
                output=output, probability=probability, input_name=input_name, input_shape=input_shape,
                preprocess=dict(preset=preset, mean=mean, std=std, bgr=bgr, resize=resize, fit=fit,
                                interpolation=interpolation),
                labels=labels, render=pipeline.RenderOptions(grey, overlay, grid, grid_picks, seed),
                batch_size=batch_size, provider=provider, quiet=quiet)


def run_explain(model: Path, inputs, out_dir: Path, *, methods, target=None, layer=None, neuron=None, output=None,
                probability=False, input_name=None, input_shape=None, preprocess: dict | None = None, labels=None,
                render: pipeline.RenderOptions | None = None, batch_size=8, provider="auto", quiet=False) -> dict:
    from .runtime import Explainer

    card = pipeline.ModelCard.beside(model) if Path(model).is_file() else pipeline.ModelCard()
    names = pipeline.load_labels(labels) if labels else card.labels
    if target is not None and layer is not None:
        raise InputError("--target picks a class; with --layer, pick the neuron with --neuron.")
    if neuron is not None and layer is None:
        raise InputError("--neuron picks a neuron of a layer: give the layer with --layer.")
    t0 = time.perf_counter()
    explainer = Explainer(model, methods=methods, layer=layer, neuron=neuron, output=output, probability=probability,
                          providers=provider, input_name=input_name, input_shape=input_shape, batch_size=batch_size)
    build_s = time.perf_counter() - t0
    try:
        shape = explainer.input_shape
    except InputError:
        raise InputError("The model's input size is symbolic: give it with --input-shape, e.g. 1,3,224,224.") from None
    if explainer.layout not in ("NCHW", "NHWC"):
        raise InputError(f"The model's input has shape {tuple(shape)}, not an image batch (N, C, H, W) or "
                         f"(N, H, W, C): pass preprocessed .npy tensors with the model's own shape.")
    model_input = images.ModelInput(tuple(int(d) for d in shape[1:]), explainer.layout)
    pre = resolve_preprocess(card.preprocess, preprocess or {}, model_input.channels, quiet)
    sources = images.collect(inputs, model_input)
    if any(not s.npy for s in sources):
        pre.check(model_input.channels)
    class_target = resolve_target(target, names, explainer.num_classes) if layer is None else None
    render = render or pipeline.RenderOptions()
    planned = [f for stem in images.names(sources) for f in pipeline.output_files(stem, methods, render.overlay)]
    pipeline.check_destination(out_dir, inputs, planned + ["summary.json", "grid.png"])
    if render.grid and not render.title:
        render.title = f"{card.name or Path(model).name}  ·  {' / '.join(methods)}"
    info = {"model": str(model), "model_name": card.name, "build_s": round(build_s, 3)}
    summary = pipeline.explain_files(explainer, sources, model_input, pre, out_dir, target=class_target,
                                     labels=names, output=output, batch_size=batch_size, options=render,
                                     progress=not quiet, run_info=info)
    if not quiet:
        for record in summary["images"]:
            click.echo(_describe(record))
    extra = ", grid.png" if "grid" in summary else ""
    click.echo(f"wrote {len(planned)} files for {len(sources)} input(s) to {out_dir}/ (summary.json{extra}); "
               f"{summary['timing']['ms_per_image']:.0f} ms per image on {summary['provider']}")
    return summary


def resolve_preprocess(card: dict, given: dict, channels: int, quiet: bool = False) -> images.Preprocess:
    """Command-line options over the model card over the default. A --preset on the command line replaces the
    card's normalisation (mean, std, channel order) but keeps its geometry (resize, fit, interpolation)."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(card) - {"preset", "mean", "std", "bgr", "resize", "fit", "interpolation"}
    if unknown:
        raise InputError(f"Unknown preprocessing key(s) {sorted(unknown)} in the model card.")
    base = {k: v for k, v in card.items() if k in ("resize", "fit", "interpolation")} if "preset" in given else card
    settings = {**base, **given}
    name = settings.pop("preset", None)
    if name is None:
        name = "unit" if channels == 1 else "imagenet"
        if not quiet and not {"mean", "std"} & set(settings):
            click.echo(f"note: no preprocessing given for this model; using --preset {name} "
                       f"({'[0, 1]' if channels == 1 else 'ImageNet mean/std'}).", err=True)
    return images.preset(name, **settings)


def resolve_target(target: str | None, labels, num_classes: int) -> int | None:
    """A class index from an index or a class name (exact, then case-insensitive)."""
    if target is None:
        return None
    try:
        index = int(target)
    except ValueError:
        if not labels:
            raise InputError(f"--target {target!r} is a name, but the model has no class names: give an index, or "
                             f"--labels FILE.") from None
        lowered = [n.lower() for n in labels]
        if target in labels:
            index = labels.index(target)
        elif target.lower() in lowered:
            index = lowered.index(target.lower())
        else:
            close = suggest(target, labels)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            raise InputError(f"No class named {target!r}.{hint}") from None
    if not 0 <= index < num_classes:
        raise InputError(f"Target {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1}).")
    return index


def _describe(record: dict) -> str:
    line = record["input"]
    if "predicted" in record:
        name = record.get("predicted_name")
        line += f"  →  {record['predicted']}" + (f" {name}" if name else "") + f"  p={record['probability']:.3f}"
    if "target_neuron" in record:
        line += f"  (explained neuron {record['target_neuron']} of {record['target_layer']})"
    elif record.get("target") != record.get("predicted"):
        line += f"  (explained {record['target']} {record.get('target_name') or ''}".rstrip() + ")"
    return line


# -- demo -----------------------------------------------------------------------------------------------------
@cli.command(short_help="Run the bundled model on the bundled photos (no network).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("gbp-demo"), show_default=True)
@click.option("--model", "which", type=click.Choice(["efficientnet", "mnist"]), default="efficientnet",
              show_default=True, help="The bundled ImageNet model and photos, or the small MNIST CNN and digits.")
@click.option("--grey/--colour", default=True, show_default=True,
              help="Maps as grey-scale magnitude (easiest to read), or per colour channel.")
@_provider_option
@click.option("-q", "--quiet", is_flag=True)
def demo(out_dir, which, grey, provider, quiet):
    """Run a bundled model on the bundled pictures: all three methods, overlays and a grid. No network needed."""
    from .demo import demo_files

    model, inputs, title = demo_files(which)
    run_explain(model, [inputs], out_dir, methods=("guided", "vanilla", "deconvnet"),
                render=pipeline.RenderOptions(grey=grey, grid=True, title=f"{title}  ·  guided / vanilla / deconvnet"),
                provider=provider, quiet=quiet)
    click.echo(f"open {out_dir / 'grid.png'} for the overview")


# -- export ---------------------------------------------------------------------------------------------------
@cli.command("export", short_help="Write a model that also outputs its saliency maps.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="Where to write the model with saliency outputs (never over MODEL).")
@_model_options
def export_cmd(model, out_path, methods, layer, neuron, output, probability, input_name, input_shape):
    """Write a copy of MODEL that also outputs saliency maps, for any ONNX Runtime (Python, C++, C#, Java, JS).

    \b
    The exported model's contract:
      inputs   the model's own, plus `target` (int64 [N], default -1 = the predicted class) for class targets
      outputs  the model's own, `saliency_<method>` (shaped like the image input), `target_used` (int64 [N])
    """
    from .export import export, read_metadata

    if _same_file(model, out_path):
        raise InputError(f"Refusing to write over the input model {model}: choose another -o.")
    if neuron is not None and layer is None:
        raise InputError("--neuron picks a neuron of a layer: give the layer with --layer.")
    written = export(model, out_path, methods=_methods(methods), layer=layer, neuron=neuron, output=output,
                     probability=probability, input_name=input_name, input_shape=input_shape)
    meta = read_metadata(written)
    click.echo(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB)")
    for vi in written.graph.input:
        if vi.name not in {i.name for i in written.graph.initializer} or vi.name == meta["target"]["target_input"]:
            click.echo(f"  input   {vi.name} {_dims(vi)}")
    for vi in written.graph.output:
        click.echo(f"  output  {vi.name} {_dims(vi)}")
    click.echo(f"  target  {meta['target']['choice']}; {len(meta['relu_nodes'])} node(s) take the ReLU rule")


def _same_file(a: Path, b: Path) -> bool:
    """Same path, or another name (hard or symbolic link) for the same file."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return Path(b).exists() and Path(b).samefile(a)
    except OSError:
        return False


def _dims(vi) -> str:
    dims = vi.type.tensor_type.shape.dim
    return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + ")"


# -- layers ---------------------------------------------------------------------------------------------------
@cli.command(short_help="List the layers --layer can target, and which follow a ReLU.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--relu-only", is_flag=True, help="Only tensors that are (or carry) ReLU outputs.")
@click.option("--input-name")
@click.option("--input-shape", callback=_shape, metavar="N,C,H,W")
def layers(model, relu_only, input_name, input_shape):
    """The layers --layer can target: tensor name, node, op, shape, and whether it comes after a ReLU."""
    from .inspect import layers as list_layers

    rows = [r for r in list_layers(model, input_name, input_shape) if r.relu or not relu_only]
    scoped = any(r.scope for r in rows)
    table = [("tensor", "node", "op", "shape", "ReLU") + (("module",) if scoped else ())]
    for r in rows:
        shape = "(" + ", ".join("N" if d is None else str(d) for d in r.shape) + ")"
        table.append((r.tensor, r.node, r.op, shape, r.relu or "-") + ((r.scope,) if scoped else ()))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo(f"{len(rows)} tensors; pass a tensor or node name to --layer.", err=True)


# -- check ----------------------------------------------------------------------------------------------------
@cli.command(short_help="Operator coverage and a gradient self-check.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--directions", type=click.IntRange(1, 64), default=6, show_default=True,
              help="Random directions for the finite-difference check.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input and directions.")
@click.option("--output", help="The output whose class score is checked. [default: the first]")
@click.option("--input-name")
@click.option("--input-shape", callback=_shape, metavar="N,C,H,W")
@click.pass_context
def check(ctx, model, directions, seed, output, input_name, input_shape):
    """Operator coverage, and the vanilla gradient of a random input against finite differences.

    Exits with status 1 when an operator has no gradient rule or the self-check disagrees.
    """
    from .errors import UnsupportedModelError
    from .inspect import coverage, gradient_check

    cov = coverage(model, input_name, input_shape, [output] if output else None)
    fwd = cov.fwd
    shape = ", ".join("N" if d is None else str(d) for d in fwd.input_shape)
    click.echo(f"model     {model}")
    click.echo(f"input     {fwd.input_name!r} ({shape}) {fwd.layout}, opset {fwd.opset}")
    sinks = ", ".join(map(repr, cov.sinks))
    click.echo(f"path      {sum(cov.counts.values())} nodes from {fwd.input_name!r} to {sinks}: "
               f"{len(cov.counts)} operator types, {cov.relu_nodes} take the method's ReLU rule")
    width = max([len(op) for op in cov.counts] + [7])
    click.echo(f"  {'op type'.ljust(width)}  nodes  rule")
    for op, count in sorted(cov.counts.items()):
        click.echo(f"  {op.ljust(width)}  {count:5d}  {'missing' if op in cov.missing else 'yes'}")
    if cov.missing:
        click.echo(f"coverage  {len(cov.missing)} operator type(s) have no gradient rule:")
        for op, nodes in sorted(cov.missing.items()):
            click.echo(f"  {op} ({len(nodes)}): {', '.join(nodes)}")
        ctx.exit(1)
    click.echo("coverage  every operator on the path has a gradient rule")
    try:
        result = gradient_check(model, directions, seed, input_name, input_shape, output)
    except UnsupportedModelError as exc:  # an op variant the rule refuses (found while building)
        click.echo(f"coverage  {exc}")
        ctx.exit(1)
    click.echo(f"gradient  vanilla map (ONNX Runtime, float32) vs {result.precision} central differences: "
               f"entry {result.target} of {result.tensor!r}, random normal input, {directions} random directions")
    click.echo(f"  {'direction':>9}  {'map . v':>14}  {'finite diff.':>14}  {'step':>7}  |diff| / rms")
    for d, (a, n, e, err) in enumerate(zip(result.analytic, result.numeric, result.steps, result.errors), 1):
        click.echo(f"  {d:9d}  {a:14.7g}  {n:14.7g}  {e:7.0e}  {err:.1e}")
    verdict = "OK" if result.passed() else "FAILED"
    click.echo(f"  max |diff| / rms {result.errors.max():.1e}, cosine {result.cosine:.10f}: {verdict} "
               f"(tolerance {result.tolerance:.0e})")
    if not result.passed():
        ctx.exit(1)


if __name__ == "__main__":
    main()
