"""pc-encode: encode an image file (or a bundled photo) from the command line and write the maps.

Writes input.png, reconstruction.png and error.png at the image's size, montage.png (the three side by
side, enlarged to be seen) and encoding.npz with every array; prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, existing_file, fail, model_source, output_folder, positive_int
from pcmodel.config import has_whole_map_level
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

# What pc-encode writes into --out. encoding.npz holds latent_1 .. latent_L (rows, causes, H_l, W_l), one
# row per tile in tile mode, at the padded size in full mode; level_error_1 .. level_error_L, each level's
# prediction error e_l = r_(l-1) - prediction (level 1's is the image's) in the same layout; input,
# reconstruction and error (C, H, W) on the image's grid, as the PNGs show them; energy (steps + 1, rows),
# before the first step and after each; in full mode also padded = [top, bottom, left, right].
OUTPUT_FILES = ("input.png", "reconstruction.png", "error.png", "montage.png", "encoding.npz")


def encode_array(
    model: pcmodel.PCModel,
    image,
    steps: int | None,
    size_mode: str | None,
    max_side: int = DEFAULT_FULL_MAX_SIDE,
    solver: str | None = None,
    init: str | list[torch.Tensor] | None = None,
):
    """Prepare one image as the model's config says, run inference (`solver`, `init` as model.infer takes
    them), return (result, maps on the image grid, placement)."""
    mode = size_mode or model.config.preprocess.size_mode
    rows, shown, placement = prepare_image(image, model.config, mode, max_side)
    result = model.infer(rows.to(model.device), steps=steps, solver=solver, init=init)
    reconstruction = placement.restore(result.reconstruction.cpu())[0]
    return result, (shown, reconstruction, shown - reconstruction), placement


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-encode", description=__doc__)
    parser.add_argument(
        "image", nargs="?", type=existing_file, help="image file (default: the bundled astronaut photo, 256x256)"
    )
    parser.add_argument(
        "--model", type=model_source, default="default", help="checkpoint path or name (default: %(default)s)"
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="inference steps, >= 1 (default: the model's)")
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
        help="the dynamics: gradient (the paper's), momentum or nesterov (default: the model's)",
    )
    parser.add_argument(
        "--init",
        default=None,
        metavar="zero|amortised|ENCODING.npz",
        help="where inference starts: zero, amortised (the learned start), or a previous encoding.npz's latents "
        "(a warm start, e.g. the previous frame of a sequence); default: the model's",
    )
    parser.add_argument(
        "--out", type=output_folder, default=Path("encoded"), help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
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
        init = _start(args.init)
        model.solver(args.solver)  # refused here when this model's step size makes it unstable
        result, (shown, reconstruction, error), placement = encode_array(
            model, image, args.steps, args.size_mode, args.max_side, args.solver, init
        )
    except (OSError, ValueError) as exc:
        option = "--solver" if isinstance(exc, pcmodel.UnstableStepError) else "--init"
        return fail("pc-encode", f"{option}: {exc}")
    padded = {}
    if placement.mode == "full" and placement.fit is not None:
        f = placement.fit
        padded = {"padded": np.array([f.top, f.bottom, f.left, f.right])}
    pictures = display_maps(shown, reconstruction, error, model.config.preprocess)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, picture in zip(("input", "reconstruction", "error"), pictures):
            picture.save(args.out / f"{name}.png")
        montage(pictures).save(args.out / "montage.png")
        np.savez(
            args.out / "encoding.npz",
            **{f"latent_{i + 1}": r.cpu().numpy() for i, r in enumerate(result.latents)},
            **{f"level_error_{i + 1}": e.cpu().numpy() for i, e in enumerate(result.errors)},
            **padded,
            input=shown.numpy(),
            reconstruction=reconstruction.numpy(),
            error=error.numpy(),
            energy=result.energy.cpu().numpy(),
        )
    except OSError as exc:
        return fail("pc-encode", f"--out {args.out}: {exc}")
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


def _start(init: str | None) -> str | list[torch.Tensor] | None:
    """--init: a start's name, or the latents of a previous encoding.npz (level 1 first)."""
    if init is None or init in ("zero", "amortised"):
        return init
    if not init.endswith(".npz"):
        raise ValueError(f"{init!r} is neither zero, amortised nor an encoding.npz file")
    with np.load(init, allow_pickle=False) as saved:  # no pickle: a file we did not make is not trusted
        names = sorted((k for k in saved.files if k.startswith("latent_")), key=lambda k: int(k.split("_")[1]))
        if not names:
            raise ValueError(f"{init} holds no latent_1.. arrays (a pc-encode encoding.npz has them)")
        return [torch.from_numpy(np.asarray(saved[k], dtype=np.float32)) for k in names]


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
