"""pc-train: reproducible, resumable, interruptible, and it stops with a useful message when it must."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pcmodel
from training.run_config import TrainConfig
from training.train import main
from training.train_args import apply_settings, build_parser

from .conftest import FAST, TINY


def run(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / name
    code = main([*args, "--out", str(out)])
    return code, out


def weights(path: Path) -> list[torch.Tensor]:
    return pcmodel.load(path).weights


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_checkpoints_log_and_provenance(tmp_path, tiny_config_file):
    code, out = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST)
    assert code == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000004.safetensors",
        "step-0000006.safetensors",
    ]
    model = pcmodel.load(out / "model.safetensors")
    assert model.provenance["command"].startswith("pc-train --config ")
    training = model.provenance["training"]
    assert training["step"] == 6 and training["options"]["batch_size"] == 8
    assert training["data"]["source"] == "default" and len(training["data"]["fingerprint"]) == 64
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "energy", "rel_error", "k2", "seconds"} <= set(lines[0])
    assert {"held_out_rel_error", "held_out_energy", "stability_bound"} <= set(lines[-1])
    assert all(0 < m["rel_error"] < 1.5 for m in lines)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_config_file):
    base = ["--config", str(tiny_config_file), *FAST]
    runs = [run(tmp_path, name, *base, "--seed", seed)[1] for name, seed in (("a", "3"), ("b", "3"), ("c", "4"))]
    a, b, c = (weights(out / "model.safetensors") for out in runs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # bit for bit on CPU
    assert not torch.equal(a[0], c[0])


def test_resume_continues_bit_for_bit(tmp_path, tiny_config_file):
    """6 updates straight == 3 updates, then --resume to 6: identical weights and log (CPU, same threads)."""
    base = ["--config", str(tiny_config_file), *FAST]
    _, straight = run(tmp_path, "straight", *base)
    _, split = run(tmp_path, "split", *base, "--updates", "3")
    assert main(["--resume", str(split / "model.safetensors"), "--updates", "6", *FAST[4:]]) == 0
    assert all(
        torch.equal(x, y) for x, y in zip(weights(straight / "model.safetensors"), weights(split / "model.safetensors"))
    )
    keys = ("step", "energy", "rel_error", "k2", "held_out_rel_error")  # the end of a run adds a stability check
    assert [[m.get(k) for k in keys] for m in metrics(straight)] == [[m.get(k) for k in keys] for m in metrics(split)]
    commands = pcmodel.load(split / "model.safetensors").provenance["training"]["state"]["commands"]
    assert len(commands) == 2 and commands[1].startswith("pc-train --resume")


def test_resume_refuses_settings_that_would_change_the_run(tmp_path, tiny_config_file, capsys):
    _, out = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--updates", "2")
    capsys.readouterr()
    assert main(["--resume", str(out / "model.safetensors"), "--batch-size", "16", "--k2", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pc-train: ") and "--batch-size" in err and "--k2" in err


def test_energy_falls_while_training(tmp_path, tiny_config_file):
    code, out = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--updates", "40", "--batch-size", "32")
    assert code == 0
    energy = [m["energy"] for m in metrics(out)]
    assert sum(energy[-5:]) < 0.8 * sum(energy[:5])


def test_learning_blow_up_stops_and_names_k2(tmp_path, tiny_config_file, caplog):
    with caplog.at_level(logging.ERROR):
        code, _ = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--k2", "200", "--check-every", "1000")
    assert code == 1
    assert "k2" in caplog.text and ("diverged" in caplog.text)


def test_shrinking_stability_bound_stops_before_the_model_becomes_unloadable(tmp_path, tiny_config_file, caplog):
    """k1 starts just below the bound of the fresh weights; U grows; training stops naming k1, k2 and lam."""
    fresh = pcmodel.create(TINY, seed=0)
    k1 = 0.85 * fresh.stability_bound()
    with caplog.at_level(logging.ERROR):
        code, out = run(
            tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--k1", str(k1), "--k2", "0.3",
            "--check-every", "1", "--updates", "50",
        )  # fmt: skip
    assert code == 1
    assert "stability bound" in caplog.text and "k1" in caplog.text and "lam" in caplog.text
    saved = pcmodel.load(out / "model.safetensors")  # what was saved still loads: k1 below its bound
    assert saved.config.k1 < saved.stability_bound()


def test_unstable_start_is_refused(tmp_path, tiny_config_file, capsys):
    code, _ = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--k1", "50")
    assert code == 2 and "Lower k1" in capsys.readouterr().err


def test_settings_and_paper_schedule(tmp_path):
    config = apply_settings(TINY, ["levels.0.alpha=0.5", "preprocess.gain=2", "learning.k2_min=0.001"])
    assert config.levels[0].alpha == 0.5 and config.preprocess.gain == 2 and config.learning.k2_min == 0.001
    with pytest.raises(pcmodel.ConfigError, match="no such setting"):
        apply_settings(TINY, ["levels.0.alpah=0.5"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TINY.to_dict()))
    code, out = run(tmp_path, "a", "--config", str(path), *FAST, "--k2-schedule", "paper", "--k2", "0.1")
    assert code == 0
    learning = pcmodel.load(out / "model.safetensors").config.learning
    assert (learning.k2_decay, learning.k2_decay_every, learning.k2_decay_unit) == (1.015, 40, "inputs")
    k2 = [m["k2"] for m in metrics(out)]  # 8 inputs per update: one division every 5 updates
    assert k2[0] == 0.1 and k2[5] == pytest.approx(0.1 / 1.015)


def test_train_config_validates():
    with pytest.raises(pcmodel.ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(pcmodel.ConfigError, match="scales"):
        TrainConfig(scales=(2.0,))


def test_folder_data_and_empty_folder(tmp_path, tiny_config_file, caplog, capsys):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO):
        code, out = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--data", str(folder))
    assert code == 0 and "bad.png" in caplog.text
    assert pcmodel.load(out / "model.safetensors").provenance["training"]["data"]["source"] == str(folder)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(other / "x.png")
    resume = ["--resume", str(out / "model.safetensors"), "--updates", "8", *FAST[4:]]
    capsys.readouterr()
    assert main([*resume, "--data", str(other)]) == 2  # different images cannot continue the run
    assert "differ" in capsys.readouterr().err
    assert main(resume) == 0  # the saved --data is used by default
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(tmp_path, "b", "--config", str(tiny_config_file), *FAST, "--data", str(empty))[0] == 2


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, tiny_config_file):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training.train", "--config", str(tiny_config_file), *FAST,
               "--updates", "100000", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[2], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    model = pcmodel.load(out / "model.safetensors")
    step = model.provenance["training"]["step"]
    assert step >= 5 and (out / "checkpoints" / f"step-{step:07d}.safetensors").is_file()
    snapshot = out / "checkpoints" / f"step-{step:07d}.safetensors"
    assert main(["--resume", str(snapshot), "--updates", str(step + 2), *FAST[4:]]) == 0  # writes to the run folder
    assert pcmodel.load(out / "model.safetensors").provenance["training"]["step"] == step + 2


def test_figures_are_written_next_to_the_checkpoint(tmp_path, tiny_config_file):
    fast = [a for a in FAST if a != "--no-figures"]
    code, out = run(tmp_path, "a", "--config", str(tiny_config_file), *fast)
    assert code == 0
    names = {"level1.png", "level2.png", "reconstructions.png", "training.png"}
    assert {p.name for p in (out / "figures").iterdir()} == names
    for name in names:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000


def test_resume_of_a_finished_run_has_nothing_to_do(tmp_path, tiny_config_file, capsys):
    _, out = run(tmp_path, "a", "--config", str(tiny_config_file), *FAST, "--updates", "2")
    checkpoint = out / "model.safetensors"
    before = (checkpoint.read_bytes(), (out / "metrics.jsonl").read_text(), sorted((out / "checkpoints").iterdir()))
    capsys.readouterr()
    for extra in ([], ["--updates", "2"], ["--updates", "1"]):  # at or past the total: nothing to train
        assert main(["--resume", str(checkpoint), *extra, *FAST[4:]]) == 0
        err = capsys.readouterr().err
        assert err.startswith("pc-train: nothing to do") and len(err.strip().splitlines()) == 1, err
        assert "--updates" in err
    after = (checkpoint.read_bytes(), (out / "metrics.jsonl").read_text(), sorted((out / "checkpoints").iterdir()))
    assert after == before  # nothing rewritten


def test_help_shows_every_default_and_one_thread(monkeypatch):
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), f"{action.option_strings}: its help names no default"
    assert "one thread" in " ".join(parser.format_help().split())
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        torch.set_num_threads(2)
        assert main(["--preset", "rao-ballard-1999", "--print-config"]) == 0
        assert torch.get_num_threads() == 1  # one intra-op thread unless --threads says otherwise
        assert main(["--preset", "rao-ballard-1999", "--print-config", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)


@pytest.mark.parametrize("preset", ["conv-rgb", "rao-ballard-1999"])
def test_resume_continues_bit_for_bit_on_the_presets(tmp_path, preset):
    """The presets' own models (whose fast backends the tiny config does not reach): 4 updates straight == 2,
    then --resume to 4. The update after a resume is the first call of a loaded model, the straight run's follows
    an update: the backend had depended on that, and the weights differed by ~1e-8."""
    common = ["--eval-every", "3", "--checkpoint-every", "4", "--log-every", "1", "--no-progress", "--no-figures"]
    common += ["--threads", "1"]
    base = ["--preset", preset, "--batch-size", "4", "--k2", "0.001", *common]  # small batches: a small k2
    _, straight = run(tmp_path, "straight", *base, "--updates", "4")
    _, split = run(tmp_path, "split", *base, "--updates", "2")
    assert main(["--resume", str(split / "model.safetensors"), "--updates", "4", *common]) == 0
    assert all(
        torch.equal(x, y) for x, y in zip(weights(straight / "model.safetensors"), weights(split / "model.safetensors"))
    )
