"""A web page to try MambaOut weights on a photo: the authors' Gradio demo, on this project's models.

  python -m mambaout_jax.demo                        # the default main job's run, runs/digits, if present
  python -m mambaout_jax.demo --weights runs/digits  # any train.py run or weight file predict.py reads
  python -m mambaout_jax.demo --weights mambaout_femto.pth --port 8080
  python -m mambaout_jax.demo --pretrained mambaout_femto.in1k  # published weights, from the Hugging Face cache

Drop, paste or upload an image (or click an example) and see the top-5 classes with probabilities,
the model and the time the prediction took. The page is served on 127.0.0.1 only, with Gradio's
analytics off and no share link unless ``--share`` is given; everything it shows (fonts included)
comes from this machine, so it works with no network. Needs the ``demo`` extra:
``pip install "mambaout-jax[demo]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

# Gradio reads these when it is imported or builds an app: no usage reports and no version check
# (a request to api.gradio.app), no Hugging Face telemetry. setdefault: a user's own choice stands.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

try:
    import gradio as gr
except ImportError as e:  # the demo is an optional extra
    raise SystemExit(f"the demo needs Gradio ({e}): pip install 'mambaout-jax[demo]'") from None

import jax
import jax.numpy as jnp

from mambaout_jax.convert import CheckpointError
from mambaout_jax.convert.cli import add_weight_set_flags
from mambaout_jax.data.digits import write_digits_folder
from mambaout_jax.predict import ClassScore, Predictor, load_predictor

# What `python train.py --workdir runs/digits` (the README's main job) writes.
DEFAULT_RUN = Path("runs/digits")
TOP_K = 5
# Small inputs (the 32 px digits) are shown enlarged, pixels kept sharp.
CSS = "#image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
# scikit-image's own photos (shipped in its wheel; none needs a download): cat, coffee, astronaut, rocket.
EXAMPLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


def example_images(predictor: Predictor) -> list[str]:
    """scikit-image's photos; for a run trained on the built-in digits, a few held-out digits first."""
    examples = []
    if predictor.dataset == "digits":
        val = write_digits_folder(image_size=predictor.preprocessing.image_size) / "val"
        examples += [str(sorted((val / str(d)).iterdir())[0]) for d in (3, 7, 8)]
    try:
        import skimage.data
    except ImportError:
        return examples
    data_dir = Path(skimage.data.__file__).parent
    return examples + [str(data_dir / name) for name in EXAMPLE_PHOTOS if (data_dir / name).exists()]


def top_classes(predictor: Predictor, image_path: str | None) -> tuple[dict[str, float] | None, str]:
    """What the page shows for one image: ``{label: probability}`` of the top 5, and the timing line."""
    if not image_path:
        return None, ""
    start = time.perf_counter()
    x = predictor.preprocessing.transform(image_path)
    preprocessed = time.perf_counter()
    probs = predictor.probabilities(x[None])[0]  # waits for the device
    done = time.perf_counter()
    shown = label_values(predictor.top_k(probs, TOP_K), predictor.classes.ids)
    timing = (
        f"**{(done - start) * 1e3:.1f} ms** (preprocessing {(preprocessed - start) * 1e3:.1f} ms, "
        f"model {(done - preprocessed) * 1e3:.1f} ms on {jax.default_backend()})"
    )
    return shown, timing


def label_values(top: Sequence[ClassScore], ids: Sequence[str]) -> dict[str, float]:
    """``{label: prob}`` for gr.Label, whose keys must be unique: ImageNet has two classes named
    'crane' (the bird and the machine), told apart by their ids when both are shown."""
    labels = [s.label for s in top]
    return {(s.label if labels.count(s.label) == 1 else f"{s.label} ({ids[s.index]})"): s.prob for s in top}


def build_demo(predictor: Predictor, examples: Sequence[str] = ()) -> gr.Blocks:
    p = predictor.preprocessing
    about = (
        f"**{predictor.model}**, {predictor.num_classes} classes ({predictor.classes.source}); "
        f"weights: `{predictor.weights_source}`; eval preprocessing: {p.image_size} px, crop_pct {p.crop_pct}, "
        f"{p.crop_mode} crop, {p.interpolation}"
    )
    with gr.Blocks(title=f"MambaOut: {predictor.model}", analytics_enabled=False) as demo:
        gr.Markdown(f"# MambaOut image classification\n{about}", elem_id="about")
        with gr.Row():
            with gr.Column():
                # filepath and no image_mode: the handler gets the uploaded file itself, not a re-encoding
                # (Gradio would otherwise save it again as WebP), so the page predicts what predict.py does.
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="image", height=320)
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=image, label="Examples")
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K}", elem_id="top")
                latency = gr.Markdown(elem_id="latency")
        image.change(lambda path: top_classes(predictor, path), inputs=image, outputs=[label, latency])
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--weights", help=f"a train.py run or any weight file predict.py reads; default: {DEFAULT_RUN} if present")
    which.add_argument("--pretrained", metavar="TAG", help="published weights by name, e.g. mambaout_femto.in1k (Hugging Face cache)")
    add_weight_set_flags(p)
    p.add_argument("--model", help="variant, optionally with timm's pretrained tag (its eval settings); default: from the weights")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line in index order (as predict.py)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default: it needs the internet)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    weights = args.weights
    if weights is None and args.pretrained is None:
        if not DEFAULT_RUN.is_dir():
            print(
                f"error: no --weights given and no {DEFAULT_RUN} here (the default main job's run: "
                f"python train.py --workdir {DEFAULT_RUN}); pass --weights PATH",
                file=sys.stderr,
            )
            return 2
        weights = DEFAULT_RUN
    try:
        predictor = load_predictor(
            weights, pretrained=args.pretrained, pretrained_source=args.pretrained_source, ema=args.ema,
            model=args.model, class_names_file=args.classes, batch_size=1,
            dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype],
        )  # fmt: skip
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"weights: {predictor.loaded.describe()}", flush=True)
    print(f"{predictor.model}: compiled in {predictor.warm_up():.1f} s", flush=True)  # not at the first request
    examples = example_images(predictor)
    demo = build_demo(predictor, examples)
    demo.launch(
        server_name="127.0.0.1", server_port=args.port, share=args.share, ssr_mode=False, pwa=False,
        mcp_server=False, enable_monitoring=False, css=CSS, allowed_paths=sorted({str(Path(e).parent) for e in examples}),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
