"""pc-encode: encode an image file (or a bundled photo), or a collection of images into a Parquet data set.

One image file: writes input.png, reconstruction.png and error.png at the image's size, montage.png (the
three side by side, enlarged to be seen) and encoding.npz with every array into --out; prints a JSON
summary. A folder (recursive), a glob, a list file (.txt, .csv) or several paths: writes a data set of
one row per input into --out (pcmodel.encodings, docs/ENCODINGS.md) on every core, resumably: run the
same command again after an interruption and it finishes what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pcmodel
from pcmodel.atomic import write_all
from pcmodel.cliargs import (
    ArgumentParser,
    existing_file,
    fail,
    model_source,
    output_folder,
    positive_int,
    step_count,
    write_failure,
)
from pcmodel.collection import DEFAULT_BATCH_SIZE, InputError, is_collection
from pcmodel.config import has_whole_map_level
from pcmodel.encode_job import OutputError, WorkerError, WriteError
from pcmodel.images import (
    DEFAULT_FULL_MAX_SIDE,
    DEFAULT_MAX_PIXELS,
    PLACEMENTS,
    decode,
    display_maps,
    montage,
    prepare_image,
    sample_photo,
)
from pcmodel.starts import StartError, geometry, read_start, start_bytes

# What pc-encode writes into --out. encoding.npz holds latent_1 .. latent_L (rows, causes, H_l, W_l), one
# row per tile in tile mode, at the padded size in full mode; level_error_1 .. level_error_L, each level's
# prediction error e_l = r_(l-1) - prediction (level 1's is the image's) in the same layout; input,
# reconstruction and error (C, H, W) on the image's grid, as the PNGs show them; energy (steps + 1, rows),
# before the first step and after each; in full mode also padded = [top, bottom, left, right]; size_mode and
# image_size [H, W] (the image as the model saw it), which a warm start from this file is checked against.
OUTPUT_FILES = ("input.png", "reconstruction.png", "error.png", "montage.png", "encoding.npz")


def encode_array(
    model: pcmodel.PCModel,
    image,
    steps: int | None,
    size_mode: str | None,
    max_side: int = DEFAULT_FULL_MAX_SIDE,
    solver: str | None = None,
    init: str | None = None,
):
    """Prepare one image as the model's config says, run inference (`solver`; `init` zero, amortised or a
    start file's path, checked against this image), return (result, maps on the image grid, placement)."""
    mode = size_mode or model.config.preprocess.size_mode
    rows, shown, placement = prepare_image(image, model.config, mode, max_side)
    start = _start(init, model, placement.mode, rows, shown)
    result = model.infer(rows.to(model.device), steps=steps, solver=solver, init=start)
    reconstruction = placement.restore(result.reconstruction.cpu())[0]
    return result, (shown, reconstruction, shown - reconstruction), placement


# Options of a collection only (--json is accepted for one image too: its summary is always JSON).
COLLECTION_OPTIONS = ("outputs", "workers", "batch_size", "engine", "address", "limit", "shard_rows")


def outputs_list(text: str) -> tuple[str, ...]:
    """A comma-separated subset of pcmodel.encodings.OUTPUTS."""
    from pcmodel.encodings import OUTPUTS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"give a comma-separated subset of {','.join(OUTPUTS)}, got {text!r}")
    return names


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pc-encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="an image file (default: the bundled astronaut photo, 256x256); or a folder, a glob, a .txt/.csv list "
        "of paths, or several paths: a data set",
    )
    parser.add_argument(
        "--model", type=model_source, default="default", help="checkpoint path or name (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=step_count, default=None, help="inference steps, 1 to 100000 (default: the model's)"
    )
    parser.add_argument(
        "--size-mode",
        choices=tuple(m for m in PLACEMENTS if m != "fit"),
        default=None,
        help="resize, tile (overlapping tiles, blended) or full (convolutional models: the whole image scaled to "
        "at most --max-side, one inference); default: the model's",
    )
    parser.add_argument(
        "--max-side",
        type=positive_int,
        default=DEFAULT_FULL_MAX_SIDE,
        help="full mode: the longer side the image is scaled down to, never up (default: %(default)s)",
    )
    parser.add_argument(
        "--solver",
        choices=pcmodel.SOLVERS,
        default=None,
        help="the dynamics: gradient (the paper's), momentum, nesterov or anderson (default: the model's)",
    )
    parser.add_argument(
        "--init",
        default=None,
        metavar="zero|amortised|ENCODING.npz",
        help="where inference starts: zero, amortised (the learned start), or a previous encoding.npz's latents "
        "(a warm start, e.g. the previous frame of a sequence, of the same size and size mode; an .npz of an /encode "
        "response's latent_1..latent_L works too); default: the model's",
    )
    parser.add_argument(
        "--out", type=output_folder, default=Path("encoded"), help="output folder (default: %(default)s)"
    )
    data = parser.add_argument_group("a collection (a data set)")
    data.add_argument(
        "--outputs",
        type=outputs_list,
        default=None,
        help="columns besides the energies: latents, reconstruction and error_map (float32 arrays), "
        "reconstruction_png and error_map_png (PNG bytes) (default: latents)",
    )
    data.add_argument("--workers", type=positive_int, default=None, help="processes (default: every core)")
    data.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per batch, and rows per model call (default: 8)"
    )
    data.add_argument("--engine", choices=("local", "ray"), default=None, help="local processes or Ray Data")
    data.add_argument("--address", default=None, help="--engine ray: a cluster (auto, ray://host:port)")
    data.add_argument("--limit", type=positive_int, default=None, help="encode at most the first N inputs")
    data.add_argument("--json", action="store_true", default=None, help="print a JSON summary on stdout")
    data.add_argument("--shard-rows", type=positive_int, default=None, help="rows per Parquet shard (default: 1000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """pc-encode; returns the exit status. Without `argv` it is the command (its process ends with this call);
    with one, a call inside a longer-lived process (a script, a test), whose signal handlers it gives back."""
    ending = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.paths and is_collection(args.paths):
        return encode_collection(args, argv, ending)
    given = [f"--{name.replace('_', '-')}" for name in COLLECTION_OPTIONS if getattr(args, name) is not None]
    if given:
        return fail(
            "pc-encode",
            f"{', '.join(given)}: for a collection (a folder, a glob, a list file or several paths), not one image",
        )
    if args.paths:
        try:
            args.image = existing_file(args.paths[0])
        except argparse.ArgumentTypeError as exc:
            return fail("pc-encode", f"argument PATH: {exc}")
    else:
        args.image = None
    return encode_one(args)


def encode_one(args: argparse.Namespace) -> int:
    """One image file (or the bundled photo): the maps, the montage and encoding.npz, as always."""
    try:
        image = sample_photo() if args.image is None else decode(args.image.read_bytes(), DEFAULT_MAX_PIXELS)
    except (OSError, ValueError) as exc:
        return fail("pc-encode", f"{args.image}: {exc}")
    try:
        model = pcmodel.load(args.model)
    except (OSError, ValueError) as exc:
        return fail("pc-encode", f"--model {args.model}: {exc}")
    if args.size_mode == "full" and has_whole_map_level(model.config):
        return fail(
            "pc-encode",
            f"--size-mode full needs a convolutional model; {model.name} has a dense level (native size only): "
            "use --size-mode tile or resize",
        )
    try:
        model.solver(args.solver)  # refused here when this model's step size makes it unstable
        result, (shown, reconstruction, error), placement = encode_array(
            model, image, args.steps, args.size_mode, args.max_side, args.solver, args.init
        )
    except StartError as exc:  # its message names --init and the file
        return fail("pc-encode", str(exc))
    except (OSError, ValueError) as exc:
        option = "--solver" if isinstance(exc, pcmodel.UnstableStepError) else "--init"
        return fail("pc-encode", f"{option}: {exc}")
    padded = {}
    if placement.mode == "full" and placement.fit is not None:
        f = placement.fit
        padded = {"padded": np.array([f.top, f.bottom, f.left, f.right])}
    pictures = display_maps(shown, reconstruction, error, model.config.preprocess)
    arrays = {
        **{f"latent_{i + 1}": r.cpu().numpy() for i, r in enumerate(result.latents)},
        **{f"level_error_{i + 1}": e.cpu().numpy() for i, e in enumerate(result.errors)},
        **padded,
        **geometry(placement.mode, shown.shape[-2:]),  # a warm start from this file is checked against them
        "input": shown.numpy(),
        "reconstruction": reconstruction.numpy(),
        "error": error.numpy(),
        "energy": result.energy.cpu().numpy(),
    }
    names = ("input.png", "reconstruction.png", "error.png", "montage.png")
    files = [(args.out / n, _png(p)) for n, p in zip(names, [*pictures, montage(pictures)])]
    files.append((args.out / "encoding.npz", _npz(arrays)))
    try:  # the five files as one: a full disk leaves none of them written, and any from before as they were
        args.out.mkdir(parents=True, exist_ok=True)
        write_all(files)
    except OSError as exc:  # a full disk exits 1, an --out that cannot be written 2
        return write_failure("pc-encode", f"--out {args.out}", exc, "nothing was written")
    relative = float(error.square().sum() / shown.square().sum().clamp_min(1e-12))
    summary = {
        "model": model.name,
        "sha256": model.sha256,
        "input": [1, *shown.shape],
        "size_mode": placement.mode,
        "steps": int(result.steps.max()),
        "solver": model.solver(args.solver).label,
        "init": args.init or model.config.initial_latents,
        "energy_initial": float(result.energy[0].sum()),
        "energy_final": float(result.energy[-1].sum()),
        "relative_error": relative,
        "out": str(args.out),
        "files": list(OUTPUT_FILES),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _png(picture):
    """A writer (pcmodel.atomic) of a PIL image as PNG."""
    return lambda f: picture.save(f, format="PNG")


def _npz(arrays: dict[str, np.ndarray]):
    """A writer (pcmodel.atomic) of arrays as an .npz file."""
    return lambda f: np.savez(f, **arrays)


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: stop cleanly, keep what is complete."""


class StopOnce:
    """The handler of SIGTERM and SIGINT during a collection run: the first raises Stopped (SIGTERM) or
    KeyboardInterrupt (Ctrl-C); later ones, while the run stops cleanly and writes its summary, do nothing (a
    second SIGTERM had raised again inside the clean stop: a traceback and no summary)."""

    def __init__(self) -> None:
        self.stopping = False  # set by the first signal, and once the run's work has ended

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise Stopped(signum) if signum == signal.SIGTERM else KeyboardInterrupt


class Reporter:
    """Progress on stderr: a rich bar on a terminal (images/s, ETA, failures), else a log line every `every` s."""

    def __init__(self, total: int, already: int, every: float = 10.0) -> None:
        self.total, self.already, self.every = total, already, every
        self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and total and importlib.util.find_spec("rich") is not None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("pc-encode"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[rate]:.1f} images/s"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[failed]} failed"),
                transient=False,
            )
            self.task = self.bar.add_task("encode", total=total, completed=already, rate=0.0, failed=0)
            self.bar.start()

    def __call__(self, progress) -> None:
        elapsed = max(time.monotonic() - progress.started, 1e-9)
        rate = progress.finished / elapsed
        if self.bar is not None:
            completed = self.already + progress.finished
            self.bar.update(self.task, completed=completed, rate=rate, failed=progress.failed)
            return
        if time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        remaining = self.total - self.already - progress.finished
        eta = f", ETA {remaining / rate:.0f} s" if rate > 0 else ""
        print(
            f"pc-encode: {self.already + progress.finished}/{self.total} images, {rate:.1f} images/s, "
            f"{progress.failed} failed{eta}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def encode_collection(args: argparse.Namespace, argv: list[str], ending: bool = False) -> int:
    """A folder, glob, list or several paths into a Parquet data set in --out, resumably (module docstring)."""
    from pcmodel.collection import find_inputs

    engine = args.engine or "local"
    if args.address is not None and engine != "ray":
        return fail("pc-encode", "--address is for --engine ray (a Ray cluster)")
    needed = ["pyarrow"] + (["ray"] if engine == "ray" else [])
    for module in needed:
        if importlib.util.find_spec(module) is None:
            extra = "ray" if module == "ray" else "encode"
            return fail("pc-encode", f"a data set needs {module}: pip install 'predictive-coding[{extra}]'")
    try:
        inputs = find_inputs(args.paths)
    except InputError as exc:
        return fail("pc-encode", f"argument PATH: {exc}")
    if args.limit is not None:
        inputs = inputs[: args.limit]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers do the work; the driver's model is only its identity
    try:
        return _encode_collection(args, argv, inputs, engine, ending)
    finally:
        torch.set_num_threads(threads)


def _encode_collection(
    args: argparse.Namespace, argv: list[str], inputs: list, engine: str, ending: bool = False
) -> int:
    from pcmodel import encode_job, encodings
    from pcmodel.collection import EncodeSettings

    try:
        model = pcmodel.load(args.model)
    except (OSError, ValueError) as exc:
        return fail("pc-encode", f"--model {args.model}: {exc}")
    size_mode = args.size_mode or model.config.preprocess.size_mode
    if size_mode == "full" and has_whole_map_level(model.config):
        return fail(
            "pc-encode",
            f"--size-mode full needs a convolutional model; {model.name} has a dense level (native size only): "
            "use --size-mode tile or resize",
        )
    if args.init is not None and args.init not in ("zero", "amortised"):
        message = f"--init {args.init}: a collection starts from zero or amortised (a warm start is for one image)"
        return fail("pc-encode", message)
    settings = EncodeSettings(
        model=args.model,
        steps=args.steps or model.config.steps,
        size_mode=size_mode,
        max_side=args.max_side,
        outputs=args.outputs or ("latents",),
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        solver=args.solver,
        init=args.init,
    )
    try:  # the solver's stability and the start, on one native-size input, before any work
        model.solver(args.solver)
        model.infer(torch.zeros(1, *model.config.input_shape), steps=1, solver=args.solver, init=args.init)
    except ValueError as exc:
        option = "--solver" if isinstance(exc, pcmodel.UnstableStepError) else "--init"
        return fail("pc-encode", f"{option}: {exc}")
    workers = args.workers or encode_job.default_workers()
    try:
        output = encode_job.Output.open(args.out, encode_job.identity(model, settings))
    except OutputError as exc:
        return fail("pc-encode", str(exc))
    except OSError as exc:
        return fail("pc-encode", f"--out {args.out}: cannot write there ({exc.strerror or exc})")
    resume = "pc-encode " + shlex.join(argv)
    started = time.monotonic()
    status, code = "complete", 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopOnce()
    for sig in previous:
        signal.signal(sig, stop)
    progress = None
    reporter = None
    writer = encode_job.ShardWriter(args.out, args.shard_rows or 1000)
    try:
        work = encode_job.plan(args.out, inputs)
        output.write_manifest(status="running", runs=output.manifest["runs"] + 1, inputs=len(inputs))
        progress = encode_job.Progress(total=len(work.pending))
        reporter = Reporter(len(inputs), len(inputs) - len(work.pending))
        if work.pending and engine == "ray":
            from pcmodel.encode_ray import run_ray

            levels = model.num_levels
            run_ray(settings, model.sha256, levels, work.pending, workers, args.address, writer, progress, reporter)
        elif work.pending:
            encode_job.run_local(
                settings, model.sha256, model.num_levels, work.pending, workers, writer, progress, reporter
            )
        writer.flush()
    except KeyboardInterrupt as exc:
        status, code = "interrupted", 143 if isinstance(exc, Stopped) else 130
        with contextlib.suppress(WriteError):  # a full disk: the complete shards stand
            writer.flush()
    except WriteError as exc:
        status, code = "failed", 1
        shards = len(encodings.shards(args.out))
        print(
            f"pc-encode: cannot write a shard into {exc.filename} ({exc.strerror}); the {shards} complete shards there "
            f"stay readable: make room and run the same command again to finish: {resume}",
            file=sys.stderr,
        )
    except WorkerError as exc:
        status, code = "failed", 1
        print(f"pc-encode: {exc}", file=sys.stderr)
    except OSError as exc:  # the manifest, or a shard rewritten without a changed file's row
        status, code = "failed", 1
        where = exc.filename or args.out
        print(
            f"pc-encode: cannot write into {where} ({exc.strerror or exc}); the complete shards stay readable: "
            f"make room and run the same command again to finish: {resume}",
            file=sys.stderr,
        )
    finally:
        stop.stopping = True  # from here on a signal waits: the manifest and the summary are written whole
        if reporter is not None:
            reporter.close()
    seconds = time.monotonic() - started
    try:
        totals = encodings.counts(args.out)  # the complete shards: what the summary reports, written or not
        try:
            output.write_manifest(
                status=status,
                counts={"inputs": len(inputs), **totals, "missing": max(0, len(inputs) - totals["rows"])},
                seconds=round(seconds, 3),
                seconds_total=round(output.manifest.get("seconds_total", 0.0) + seconds, 3),
                engine=engine,
                workers=workers,
            )
        except OSError as exc:  # a full disk at the last write: the run did not finish, though its rows did
            if status == "complete":  # (a failure or a stop has said so in its own line already)
                status, code = "failed", 1
                advice = (
                    f"the {totals['rows']} rows in {args.out}/{encodings.DATA} are complete, but the manifest says "
                    f"the run is unfinished: make room and run the same command again to finish: {resume}"
                )
                write_failure("pc-encode", f"--out {args.out}", exc, advice)
    finally:
        output.close()
    encoded = progress.finished if progress is not None else 0
    if status == "interrupted":
        print(
            f"pc-encode: stopped; {totals['rows']} of {len(inputs)} inputs are in {args.out}. "
            f"Run the same command again to finish: {resume}",
            file=sys.stderr,
        )
    summary = {
        "out": str(args.out),
        "status": status,
        "model": model.name,
        "sha256": model.sha256,
        "engine": engine,
        "workers": workers,
        "inputs": len(inputs),
        "encoded": encoded,
        "failed_now": progress.failed if progress is not None else 0,
        "rows": totals["rows"],
        "done": totals["done"],
        "failed": totals["failed"],
        "seconds": round(seconds, 3),
        "images_per_s": round(encoded / seconds, 2) if seconds > 0 else None,
        "restarts": progress.restarts if progress is not None else 0,
        "split": progress.split if progress is not None else 0,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    elif status == "complete":
        print(
            f"pc-encode: {summary['rows']} rows in {args.out}/{encodings.DATA} ({summary['failed']} failed); "
            f"{encoded} encoded now in {seconds:.1f} s",
            file=sys.stderr,
        )
    for sig, handler in previous.items():
        # Stopped by a signal as the command, the process is ending: later signals are ignored through the
        # interpreter's exit too (which puts SIG_DFL back in place of a Python handler, but keeps SIG_IGN). Called
        # inside a longer-lived process, its handlers come back: Ctrl-C must go on working there.
        signal.signal(sig, signal.SIG_IGN if status == "interrupted" and ending else handler)
    return code


def _start(
    init: str | None, model: pcmodel.PCModel, mode: str, rows: torch.Tensor, shown: torch.Tensor
) -> str | list[torch.Tensor] | None:
    """--init: a start's name, or the latents of a start file (pcmodel.starts: a previous encoding.npz, or a
    response's latents saved with np.savez) for these rows, refused where it was made another way or from an
    image of another size."""
    if init is None or init in ("zero", "amortised"):
        return init
    if not init.endswith(".npz"):
        raise ValueError(f"{init!r} is neither zero, amortised nor an encoding.npz file")
    shapes = [(rows.shape[0], *s) for s in model.latent_shapes(tuple(rows.shape[-2:]))]
    what = f"--init {init}"
    start = read_start(Path(init), len(model.config.levels), start_bytes(shapes), what)
    return [torch.from_numpy(a) for a in start.fit(mode, shown.shape[-2:], shapes, what)]


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
