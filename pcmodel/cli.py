"""pc-encode: encode an image file (or a bundled photo) from the command line and write the maps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import pcmodel
from pcmodel.images import DEFAULT_MAX_PIXELS, decode, display_maps, prepare_image, sample_photo


def encode_array(model: pcmodel.PCModel, image, steps: int | None, size_mode: str | None):
    """Prepare one image as the model's config says, run inference, return (result, maps on the image grid)."""
    rows, shown, placement = prepare_image(image, model.config, size_mode or model.config.preprocess.size_mode)
    result = model.infer(rows.to(model.device), steps=steps)
    reconstruction = placement.restore(result.reconstruction.cpu())[0]
    return result, (shown, reconstruction, shown - reconstruction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pc-encode", description=__doc__)
    parser.add_argument("image", nargs="?", help="image file (default: the bundled astronaut photo, 256x256)")
    parser.add_argument("--model", default="default", help="checkpoint path or name (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    parser.add_argument("--size-mode", choices=("resize", "tile"), default=None, help="default: the model's")
    parser.add_argument("--out", type=Path, default=Path("encoded"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        model = pcmodel.load(args.model)
        image = sample_photo() if args.image is None else decode(Path(args.image).read_bytes(), DEFAULT_MAX_PIXELS)
    except (OSError, ValueError) as exc:
        print(f"pc-encode: {exc}", file=sys.stderr)
        return 2
    result, (shown, reconstruction, error) = encode_array(model, image, args.steps, args.size_mode)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, picture in zip(
        ("input", "reconstruction", "error"), display_maps(shown, reconstruction, error, model.config.preprocess)
    ):
        picture.save(args.out / f"{name}.png")
    np.savez(args.out / "latents.npz", **{f"level{i + 1}": r.numpy() for i, r in enumerate(result.latents)})
    relative = float(error.square().sum() / shown.square().sum().clamp_min(1e-12))
    summary = {
        "model": model.name,
        "sha256": model.sha256,
        "input": [1, *shown.shape],
        "steps": int(result.steps.max()),
        "energy_initial": float(result.energy[0].sum()),
        "energy_final": float(result.energy[-1].sum()),
        "relative_error": relative,
        "out": str(args.out),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
