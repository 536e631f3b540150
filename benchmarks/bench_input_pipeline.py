"""Training input pipeline throughput: ours (grain + TrainTransform) vs timm's in a torch DataLoader.

Both read the same ImageNet-sized JPEG files (an image folder written here from scikit-image's
photos and synthetic images, ~500x375, quality 90) and run the recipe's host-side train
augmentation: decode, RandomResizedCrop(224, random bilinear/bicubic), flip, RandAugment
rand-m9-mstd0.5-inc1. Random erasing is off in both (ours runs it on the accelerator). Reported:

* `loop`: the transform called in a plain loop in this process: images/s on one core, nothing
  else (file read + decode + augment).
* `pipeline W`: the full loader with W worker processes, batches consumed as fast as they come;
  `per worker` = total / W. On this 2-core machine W=2 saturates the cores.

timm's rows use `timm.data.create_transform(224, is_training=True, auto_augment=...,
interpolation='random', re_prob=0)`, which ends with ToTensor + Normalize on the CPU (what the brief
specifies, and timm's --no-prefetcher path); "timm uint8" uses `use_prefetcher=True`, timm's default
training path, which stops at a uint8 tensor like ours. timm's RandAugment is patched to survive
posterize(0 bits) on Pillow >= 10.x (see auto_augment.posterize); it costs nothing measurable.

    python benchmarks/bench_input_pipeline.py                 # everything, ~4 minutes here
    python benchmarks/bench_input_pipeline.py --measure ours-grain timm-dataloader --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mambaout_jax.data import LoaderOptions, TrainTransform, image_folder_source, make_train_iterator

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel")
SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (400, 300), (333, 500))


def _synthetic(width, height, rng):
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = (np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(5, 20)) > 0)[..., None] * 40
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(field + stripes + noise, 0, 255).astype(np.uint8)


def write_imagenet_like_folder(root: Path, num_images: int, scale: float = 1.0) -> Path:
    """root/train/<class>/<n>.JPEG: random crops of real photos resized to ImageNet's typical
    sizes (x scale), and 1 in 4 synthetic; JPEG quality 90, 4:2:0 like most of ImageNet."""
    import skimage.data

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    for i in range(num_images):
        width, height = (int(s * scale) for s in SIZES[i % len(SIZES)])
        if i % 4 == 3:
            image = Image.fromarray(_synthetic(width, height, rng))
        else:
            photo = photos[i % len(photos)]
            pw, ph = photo.size
            crop = rng.uniform(0.6, 1.0)
            cw = min(pw, int(ph * crop * width / height))
            ch = min(ph, int(cw * height / width))
            left, top = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
            image = photo.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.BICUBIC)
        class_dir = root / "train" / f"class_{i % 10:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{i:05d}.JPEG", "JPEG", quality=90)
    return root


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loader_pids() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if "resource_tracker" not in p.name]


@dataclasses.dataclass
class Measurement:
    images_per_s: float  # wall clock
    images_per_cpu_s: float  # per CPU-second of the processes doing the pixel work
    main_cpu: float  # CPU used by the consuming (main) process, in cores

    def row(self, name: str, command: str) -> str:
        return (f"| {name} | {self.images_per_s:.0f} | {self.images_per_cpu_s:.0f} | "
                f"{self.main_cpu:.2f} | `{command}` |")


def _measure(fn, seconds: float, worker_pids: list[int] | None) -> Measurement:
    """Calls fn() (-> images produced) until `seconds` pass. CPU time is counted on the worker
    processes if given, else on this process, so a busy shared machine lowers the wall-clock rate
    but not the per-CPU-second rate."""
    fn()  # warm up
    pids = worker_pids or []
    main0, workers0, start = time.process_time(), sum(map(_cpu_seconds, pids)), time.perf_counter()
    count = 0
    while time.perf_counter() - start < seconds:
        count += fn()
    wall = time.perf_counter() - start
    main = time.process_time() - main0
    work = sum(map(_cpu_seconds, pids)) - workers0 if pids else main
    return Measurement(count / wall, count / work, main / wall)


def _patch_timm_posterize():
    from timm.data import auto_augment

    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))
        return original(img, bits_to_keep, **kwargs)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize


def timm_transform(uint8: bool):
    from timm.data import create_transform

    _patch_timm_posterize()
    return create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                            interpolation="random", re_prob=0.0, use_prefetcher=uint8)


class TimmFolderDataset:
    """timm's ImageDataset on a folder: open, convert('RGB'), transform (picklable for fork)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), label


class ImageNetLength:
    """Presents the files as a source of ImageNet's length (cycling through them), so that
    grain's index shuffle costs what it costs on the real 1,281,167 images (it is ~30x slower
    per index on a domain of a few hundred)."""

    def __init__(self, source, length: int = 1_281_167):
        self.source, self.length = source, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.source[index % len(self.source)]


def bench_ours_loop(source, seconds, jpeg_draft=True, **_):
    transform = TrainTransform(jpeg_draft=jpeg_draft)
    rng = np.random.default_rng(0)
    paths = [source[i]["image"] for i in range(len(source))]
    state = {"i": 0}

    def one():
        transform(paths[state["i"] % len(paths)], rng)
        state["i"] += 1
        return 1

    return _measure(one, seconds, None)


def bench_timm_loop(source, seconds, uint8=False, **_):
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker; more threads only contend here
    dataset = TimmFolderDataset(source.samples, timm_transform(uint8))
    state = {"i": 0}

    def one():
        dataset[state["i"] % len(dataset)]
        state["i"] += 1
        return 1

    return _measure(one, seconds, None)


def bench_ours_pipeline(source, seconds, workers, batch_size, read_threads, **_):
    iterator = make_train_iterator(ImageNetLength(source), global_batch_size=batch_size, seed=0,
                                   shard=(0, 1), loader=LoaderOptions(worker_count=workers, read_threads=read_threads))
    for _ in range(2 * max(workers, 1)):  # worker start-up and first batches
        next(iterator)
    pids = _loader_pids() if workers else None
    result = _measure(lambda: len(next(iterator)["label"]), seconds, pids)
    iterator.close()
    return result


def bench_timm_pipeline(source, seconds, workers, batch_size, uint8=False, **_):
    import torch

    torch.set_num_threads(1)
    dataset = TimmFolderDataset(source.samples, timm_transform(uint8))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    iterator = iter(loader)
    for _ in range(2 * max(workers, 1)):
        next(iterator)
    pids = _loader_pids() if workers else None
    return _measure(lambda: len(next(iterator)[1]), seconds, pids)  # workers stop with the iterator


# name -> (description, function, extra kwargs, uses --workers, uses 2x larger JPEGs)
MEASUREMENTS = {
    "ours-loop": ("ours: TrainTransform in a loop, jpeg_draft on", bench_ours_loop, {}, False, False),
    "ours-loop-nodraft": ("ours: TrainTransform in a loop, jpeg_draft off", bench_ours_loop,
                          {"jpeg_draft": False}, False, False),
    "timm-loop": ("timm: create_transform (ToTensor+Normalize) in a loop", bench_timm_loop, {}, False, False),
    "timm-uint8-loop": ("timm: create_transform(use_prefetcher=True), uint8, in a loop", bench_timm_loop,
                        {"uint8": True}, False, False),
    "ours-grain": ("ours: make_train_iterator (grain)", bench_ours_pipeline, {}, True, False),
    "timm-dataloader": ("timm: create_transform in a torch DataLoader", bench_timm_pipeline, {}, True, False),
    "timm-uint8-dataloader": ("timm: use_prefetcher=True transform in a torch DataLoader",
                              bench_timm_pipeline, {"uint8": True}, True, False),
    "ours-loop-2x": ("ours: loop on 2x JPEGs (~1000x750), jpeg_draft on", bench_ours_loop, {}, False, True),
    "ours-loop-2x-nodraft": ("ours: loop on 2x JPEGs, jpeg_draft off", bench_ours_loop,
                             {"jpeg_draft": False}, False, True),
    "timm-loop-2x": ("timm: loop on 2x JPEGs", bench_timm_loop, {}, False, True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="+", choices=sorted(MEASUREMENTS), default=list(MEASUREMENTS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per figure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--read-threads", type=int, default=1, help="ours: threads per worker")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every figure this many times, interleaved, and report the "
                             "median: on a shared machine, background load then hits all alike")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        write_imagenet_like_folder(root / "1x", args.num_images)
        sources = {False: image_folder_source(root / "1x", "train")}
        if any(MEASUREMENTS[m][4] for m in args.measure):
            write_imagenet_like_folder(root / "2x", args.num_images // 2, scale=2.0)
            sources[True] = image_folder_source(root / "2x", "train")
        for large, source in sources.items():
            size = np.mean([os.path.getsize(p) for p, _ in source.samples]) / 1024
            print(f"{len(source)} {'2x ' if large else ''}JPEGs, mean {size:.0f} KiB; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        common = (f"--num-images {args.num_images} --seconds {args.seconds:g} "
                  f"--batch-size {args.batch_size} --rounds {args.rounds}")
        figures = [(name, workers) for name in args.measure
                   for workers in (args.workers if MEASUREMENTS[name][3] else [0])]
        results = {figure: [] for figure in figures}
        for round_index in range(args.rounds):
            for name, workers in figures:
                _, fn, kwargs, _, large = MEASUREMENTS[name]
                results[name, workers].append(fn(
                    sources[large], args.seconds, workers=workers, batch_size=args.batch_size,
                    read_threads=args.read_threads, **kwargs))
                print(f"round {round_index}: {name} {workers} workers: "
                      f"{results[name, workers][-1].images_per_cpu_s:.0f} images per CPU-second",
                      file=sys.stderr, flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}; medians of {args.rounds} round(s)")
        print("\n| what | images/s | images per CPU-second of the workers | main process CPU | command |")
        print("|---|---|---|---|---|")
        for name, workers in figures:
            description, _, _, uses_workers, _ = MEASUREMENTS[name]
            threads = f" --read-threads {args.read_threads}" if name == "ours-grain" else ""
            command = (f"python benchmarks/bench_input_pipeline.py --measure {name}"
                       + (f" --workers {workers}" if uses_workers else "") + threads + f" {common}")
            label = description + (f", {workers} workers" if uses_workers else "")
            runs = results[name, workers]
            median = Measurement(*(float(np.median([getattr(r, f.name) for r in runs]))
                                   for f in dataclasses.fields(Measurement)))
            print(median.row(label, command), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
