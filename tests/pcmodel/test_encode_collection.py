"""pc-encode over collections: one row per input in a Parquet data set, read back by pcmodel.encodings,
pyarrow, pandas and DuckDB; bad files as rows with their reasons; resuming after Ctrl-C, SIGTERM and a
killed worker, with either engine; a killed Ray actor and a file that kills its actor every time; a full disk; and the
mistakes refused in one line before any work.

The model is rao-ballard-1999 (it loads in a tenth of a second) in its tile mode at 3 steps, so each run
costs the workers' start-up; the runs that need a real signal are subprocesses (`python -m pcmodel.cli`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pcmodel
from pcmodel import encodings
from pcmodel.cli import main

pa = pytest.importorskip("pyarrow", reason="pc-encode's data sets need the encode extra")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "rao-ballard-1999", "--steps", "3"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


# Each bad file and the reason its row must carry.
BAD = {
    "zero.jpg": "bad_image",
    "truncated.png": "bad_image",
    "notes-but-png.png": "bad_image",
    "tiny.png": "too_small",
    "bomb.png": "too_large",  # 6000 x 6000 pixels: over 25 M, refused from the header
    "tiles.png": "too_large",  # 700 x 700 needs 89 x 55 tiles of 16 x 26 in tile mode, over 4096
    "huge.png": "too_large",  # a file over 100 MiB (sparse), never read
    "photo.ppm": "unsupported_format",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, size in enumerate([(40, 30), (52, 32), (40, 30), (33, 61)]):
        photo(root / ("sub" if i % 2 else "") / f"good{i}.png", size, i)
    data = (root / "good0.png").read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes-but-png.png").write_text("not an image")
    photo(root / "tiny.png", (4, 4), 9)
    (root / "bomb.png").write_bytes(png_header_only(6000, 6000))
    (root / "tiles.png").write_bytes(png_header_only(700, 700))
    with open(root / "huge.png", "wb") as f:
        f.truncate(101 * 1024 * 1024)
    Image.new("L", (20, 20)).save(root / "photo.ppm")
    # Not inputs: a text file, a hidden file and a hidden folder's photo.
    (root / "notes.txt").write_text("a list of nothing")
    photo(root / ".hidden.png", (20, 20), 10)
    photo(root / ".cache" / "thumb.png", (20, 20), 11)
    return root


@pytest.fixture(scope="module")
def encoded(folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("encoded") / "set"
    argv = [str(folder), "--out", str(out), *MODEL, "--workers", "2", "--json"]
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert main(argv) == 0
    return out, json.loads(capture.getvalue())


def test_a_folder_is_one_row_per_image_and_bad_files_are_rows_with_their_reason(folder, encoded):
    out, summary = encoded
    rows = {r.path: r for r in encodings.read(out)}
    good = {"good0.png", "sub/good1.png", "good2.png", "sub/good3.png"}
    assert set(rows) == good | set(BAD)  # no hidden file, no text file; every image once
    assert {p: rows[p].reason for p in BAD} == BAD
    for path in BAD:
        assert rows[path].error and rows[path].latents == [] and rows[path].energy is None
    assert (rows["tiny.png"].width, rows["tiny.png"].height) == (4, 4)
    assert (rows["bomb.png"].width, rows["bomb.png"].height) == (6000, 6000)
    assert summary["rows"] == len(rows) and summary["failed"] == len(BAD) and summary["done"] == len(good)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["failed"] == len(BAD)
    assert manifest["identity"]["model"]["sha256"] == pcmodel.load("rao-ballard-1999").sha256
    assert manifest["identity"]["steps"] == 3 and manifest["version"]


def test_rows_match_pc_encode_on_one_file(folder, encoded, tmp_path):
    out, _ = encoded
    rows = {r.path: r for r in encodings.read(out)}
    for path in ("good0.png", "sub/good3.png"):
        single = tmp_path / path
        assert main([str(folder / path), *MODEL, "--out", str(single)]) == 0
        npz = np.load(single / "encoding.npz")
        row = rows[path]
        assert len(row.latents) == 2
        for i, latent in enumerate(row.latents):
            assert latent.shape == npz[f"latent_{i + 1}"].shape  # (tiles, causes, H_l, W_l)
            # Two backends: the collection is prepared for its steps (numba, the amortised start in
            # onnxruntime), one pc-encode call at these steps is not (torch): they agree as backends do.
            np.testing.assert_allclose(latent, npz[f"latent_{i + 1}"], rtol=1e-4, atol=1e-4)
        assert row.energy == pytest.approx(float(npz["energy"][-1].sum()), rel=1e-4)
        assert row.energy_initial == pytest.approx(float(npz["energy"][0].sum()), rel=1e-4)
        assert row.sha256 == __import__("hashlib").sha256((folder / path).read_bytes()).hexdigest()
        image = Image.open(folder / path)
        assert (row.width, row.height) == image.size


def test_an_image_over_pillows_own_pixel_limit_is_a_too_large_row_with_its_size(tmp_path, capsys):
    """Pillow refuses to open an image whose header declares more pixels than its decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS; an error past twice that, a warning past it), without saying the size. Its row, read
    with pyarrow, is too_large with the declared width and height and says them, as for pc-encode's own limit."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    sizes = {"pillow-error.png": (100_000, 90_000), "pillow-warning.png": (10_000, 9_500), "ours.png": (6000, 5000)}
    for name, (width, height) in sizes.items():
        (folder / name).write_bytes(png_header_only(width, height))
    assert 2 * Image.MAX_IMAGE_PIXELS < 100_000 * 90_000 and Image.MAX_IMAGE_PIXELS < 10_000 * 9_500
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), *MODEL, "--workers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == 3
    rows = {r["path"]: r for r in pq.read_table(out / "data").to_pylist()}
    assert set(rows) == set(sizes)
    for name, (width, height) in sizes.items():
        row = rows[name]
        assert row["reason"] == "too_large" and (row["width"], row["height"]) == (width, height), row
        assert row["error"] == f"the image is {width}x{height} = {width * height} pixels, over the limit of 25000000"


def test_pyarrow_pandas_and_duckdb_read_the_shards_as_they_are(encoded):
    duckdb = pytest.importorskip("duckdb")
    pd = pytest.importorskip("pandas")
    out, _ = encoded
    data = out / "data"
    table = pq.read_table(data)
    expected = [
        "path",
        "sha256",
        "width",
        "height",
        "model_sha256",
        "size_mode",
        "steps",
        "energy_initial",
        "energy_final",
        "latent_1",
        "latent_1_shape",
        "latent_2",
        "latent_2_shape",
        "error",
        "reason",
    ]
    assert table.column_names == expected
    # pyarrow alone recovers a tensor: its values and its shape.
    index = table.column("path").to_pylist().index("good0.png")
    shape = table.column("latent_1_shape")[index].as_py()
    values = table.column("latent_1")[index].values.to_numpy()
    latent = values.reshape(shape)
    record = next(r for r in encodings.read(out) if r.path == "good0.png")
    np.testing.assert_array_equal(latent, record.latents[0])

    frame = pd.read_parquet(data)
    assert len(frame) == table.num_rows and frame["reason"].notna().sum() == len(BAD)
    assert set(frame.loc[frame["path"] == "zero.jpg", "reason"]) == {"bad_image"}

    con = duckdb.connect()
    counts = con.execute(
        f"select count(*), count(distinct path), count(*) filter (where error is null), "
        f"max(len(latent_1)) from read_parquet('{data}/*.parquet')"
    ).fetchone()
    assert counts[:3] == (table.num_rows, table.num_rows, 4)
    assert counts[3] == max(int(np.prod(r.latents[0].shape)) for r in encodings.read(out) if r.latents)


def test_globs_and_list_files_and_their_missing_or_unreadable_entries(folder, tmp_path, capsys):
    listing = tmp_path / "inputs.csv"
    listing.write_text(f"id,path\n1,{folder / 'good0.png'}\n2,{folder / 'missing.png'}\n3,{folder / 'sub'}\n")
    text = tmp_path / "inputs.txt"
    text.write_text(f"# photos\n{folder / 'good2.png'}\n\n")
    out = tmp_path / "out"
    pattern = str(folder / "sub" / "*.png")
    assert main([str(listing), str(text), pattern, "--out", str(out), *MODEL, "--workers", "1", "--json"]) == 0
    rows = {r.path: r for r in encodings.read(out)}
    sub = sorted(str(p) for p in (folder / "sub").glob("*.png"))
    assert set(rows) == {str(folder / "good0.png"), str(folder / "missing.png"), str(folder / "sub")} | {
        str(folder / "good2.png"),
        *sub,
    }
    assert rows[str(folder / "missing.png")].reason == "not_found"
    assert rows[str(folder / "sub")].reason == "unreadable"  # a folder where a file should be
    assert rows[str(folder / "good2.png")].reason is None
    assert json.loads(capsys.readouterr().out)["failed"] == 2


def test_outputs_add_maps_as_arrays_and_pngs(folder, tmp_path):
    out = tmp_path / "maps"
    outputs = "reconstruction,error_map,error_map_png"
    assert main([str(folder / "sub"), "--out", str(out), *MODEL, "--workers", "1", "--outputs", outputs]) == 0
    names = pq.read_schema(next((out / "data").glob("*.parquet"))).names
    assert "latent_1" not in names and {"reconstruction", "error_map", "error_map_png"} <= set(names)
    for row in encodings.read(out):
        image = Image.open(folder / "sub" / row.path)
        c, (w, h) = 1, image.size
        assert row.maps["reconstruction"].shape == row.maps["error_map"].shape == (c, h, w)
        png = Image.open(io.BytesIO(row.maps["error_map_png"]))
        assert png.size == (w, h)


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pcmodel.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **kwargs,
    )


def wait_for_shards(out: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(encodings.shards(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.05)


def paths_in(out: Path) -> list[str]:
    return pq.read_table(out / "data", columns=["path"]).column("path").to_pylist()


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(IMAGES):
        photo(root / f"{i:03d}.png", (40, 30), 100 + i)
    return root


IMAGES = 24
SLOW = ["--model", "rao-ballard-1999", "--steps", "300", "--workers", "1", "--batch-size", "2", "--shard-rows", "2"]


def finish(args: list[str], capsys) -> dict:
    """The same command again, in this process: it must finish the data set."""
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ctrl_c_stops_within_seconds_and_the_same_command_finishes_the_data_set(many, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(many), "--out", str(out), *SLOW]
    process = run_cli(args)
    wait_for_shards(out, 1, process)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert process.stderr is not None
    lines = []  # up to the stop's report: by then the workers are stopped and the rows written
    while not lines or ("stopped" not in lines[-1] and lines[-1]):
        lines.append(process.stderr.readline())
    stopped = time.monotonic() - sent
    _, rest = process.communicate(timeout=60)
    err = "".join(lines) + rest
    # A clean stop, not the end of the batch in flight (seconds at 300 steps): 0.6 s on an idle 2-core
    # machine, the interpreter's exit 1.6 s more.
    assert stopped < 5, err
    assert process.returncode == 130
    assert "run the same command again" in err.lower() and "pc-encode " + " ".join(args) in err
    first = paths_in(out)  # the shards are complete Parquet files
    assert 0 < len(first) < IMAGES and len(first) == len(set(first))
    assert not [p for p in (out / "data").iterdir() if not p.name.endswith(".parquet")]  # no temporary file
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"

    summary = finish(args, capsys)
    assert summary["encoded"] == IMAGES - len(first)  # nothing encoded twice
    assert sorted(paths_in(out)) == sorted(f"{i:03d}.png" for i in range(IMAGES))  # nothing lost, nothing twice


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signals_during_the_clean_stop_wait_for_it(sig, many, tmp_path):
    """A second SIGTERM during the clean stop had raised again inside it: a traceback, no summary, the manifest
    left `running`. Now the first stops the run and later ones (here one every 20 ms until it exits) wait."""
    out = tmp_path / "out"
    process = run_cli([str(many), "--out", str(out), *SLOW, "--json"])
    wait_for_shards(out, 1, process)
    deadline = time.monotonic() + 60
    while process.poll() is None:
        assert time.monotonic() < deadline, "pc-encode did not stop"
        process.send_signal(sig)
        time.sleep(0.02)
    stdout, err = process.communicate()
    assert process.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err, err
    assert json.loads(stdout)["status"] == "interrupted"
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    first = paths_in(out)
    assert sorted(first) == sorted(set(first))


def test_a_killed_worker_is_restarted_and_sigterm_stops_cleanly(many, tmp_path, capsys):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    args = [str(many), "--out", str(out), *SLOW]
    process = run_cli([*args, "--json"])
    wait_for_shards(out, 1, process)
    # The worker is a child of the forkserver, itself a child of pc-encode.
    descendants = psutil.Process(process.pid).children(recursive=True)
    workers = [p for p in descendants if p.ppid() != process.pid]
    assert len(workers) == 1, [p.cmdline() for p in descendants]
    workers[0].send_signal(signal.SIGKILL)
    wait_for_shards(out, len(encodings.shards(out)) + 2, process)  # a new worker goes on
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=30)
    assert process.returncode == 143, err
    summary = json.loads(stdout)
    assert summary["restarts"] == 1 and summary["status"] == "interrupted" and summary["failed"] == 0
    first = paths_in(out)
    # SIGTERM sent as a shard appears: it lands as shards are written (see the test of a SIGTERM as a shard is
    # written). Each row once, and what the run counted is what is on disk (it started from nothing).
    assert sorted(first) == sorted(set(first)), sorted(first)
    assert summary["rows"] == summary["encoded"] == len(first)

    again = finish(args, capsys)
    assert again["encoded"] == IMAGES - len(first) and again["failed"] == 0
    assert sorted(paths_in(out)) == sorted(f"{i:03d}.png" for i in range(IMAGES))


# Every process of the run (pc-encode, its forkserver, the workers) starts Python and runs sitecustomize:
# there the encoder learns to die (SIGKILL) on any batch holding poison.png.
POISON_SITE = """
import os, signal
from pcmodel import collection

_call = collection.BatchEncoder.__call__

def _poisoned(self, inputs):
    if any(item.path == "poison.png" for item in inputs):
        os.kill(os.getpid(), signal.SIGKILL)
    return _call(self, inputs)

collection.BatchEncoder.__call__ = _poisoned
"""


POISON_FILES = ["a.png", "poison.png", "b.png", "c.png"]


def encode_with_poison(tmp_path: Path, command: list[str], options: list[str], env: dict) -> dict:
    """pc-encode (`command`) over POISON_FILES, two a batch, in processes that die on any batch holding
    poison.png: the run completes, the batch killed its process twice, then poison.png alone twice (a
    worker_died row), and the other three are encoded. Returns the rows by path."""
    root = tmp_path / "photos"
    for i, name in enumerate(POISON_FILES):
        photo(root / name, (40, 30), i)
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), *MODEL, "--workers", "1", "--batch-size", "2", *options, "--json"]
    run = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=150)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["status"], summary["restarts"], summary["split"]) == ("complete", 4, 1), run.stderr
    assert (summary["rows"], summary["done"], summary["failed"]) == (4, 3, 1)
    rows = {r.path: r for r in encodings.read(out)}
    assert sorted(paths_in(out)) == sorted(rows) == sorted(POISON_FILES)
    assert rows["poison.png"].reason == "worker_died"
    assert all(rows[p].reason is None and rows[p].latents for p in POISON_FILES if p != "poison.png")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 4, "rows": 4, "done": 3, "failed": 1, "missing": 0}
    return rows


def test_a_file_that_kills_its_local_worker_every_time_becomes_a_worker_died_row(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(POISON_SITE)
    env = {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    rows = encode_with_poison(tmp_path, [sys.executable, "-m", "pcmodel.cli"], [], env)
    assert "signal 9" in rows["poison.png"].error


def test_a_changed_input_is_encoded_again_and_its_old_row_replaced(folder, tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        photo(root / f"{i}.png", (40, 30), i)
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), *MODEL, "--workers", "1", "--json"]
    assert main(args) == 0
    before = {r.path: r for r in encodings.read(out)}
    photo(root / "1.png", (40, 30), 99)  # new content, same path
    photo(root / "3.png", (40, 30), 3)  # a new file
    assert main(args) == 0
    after = {r.path: r for r in encodings.read(out)}
    assert paths_in(out).count("1.png") == 1 and set(after) == {"0.png", "1.png", "2.png", "3.png"}
    assert after["1.png"].sha256 != before["1.png"].sha256
    assert not np.array_equal(after["1.png"].latents[0], before["1.png"].latents[0])
    np.testing.assert_array_equal(after["0.png"].latents[0], before["0.png"].latents[0])


def test_a_full_disk_fails_in_one_line_and_keeps_the_complete_shards(many, tmp_path):
    out = tmp_path / "out"
    args = [str(many), "--out", str(out), *MODEL, "--workers", "1", "--shard-rows", "4"]
    assert main([*args, "--limit", "4"]) == 0

    def small_files() -> None:  # a file system with room for nothing but the manifest
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    run = subprocess.run(
        [sys.executable, "-m", "pcmodel.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        preexec_fn=small_files,
    )
    assert run.returncode == 1
    lines = [line for line in run.stderr.strip().splitlines() if "images/s" not in line]  # not the progress log
    assert len(lines) == 1 and "cannot write a shard" in lines[0] and "Traceback" not in run.stderr
    assert sorted(paths_in(out)) == [f"{i:03d}.png" for i in range(4)]  # the first run's shard, readable
    assert not [p for p in (out / "data").iterdir() if not p.name.endswith(".parquet")]


def one_line_exit_2(argv: list[str], capsys) -> str:
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["{folder}", "{folder}/no-such.png", "--out", "{out}"], "no-such.png"),
        (["{folder}", "--out", "{out}", "--workers", "0"], "--workers"),
        (["{folder}", "--out", "{out}", "--batch-size", "x"], "--batch-size"),
        (["{folder}", "--out", "{out}", "--outputs", "latents,bogus"], "--outputs"),
        (["{folder}", "--out", "{out}", "--engine", "spark"], "--engine"),
        (["{folder}", "--out", "{out}", "--address", "auto"], "--address"),
        (["{folder}/good0.png", "--workers", "2"], "--workers"),
        (["{folder}/sub/*.jpg", "--out", "{out}"], "matches no files"),
        (["{empty}", "--out", "{out}"], "no image files"),
        (["{folder}/sub", "{copy}/sub", "--out", "{out}"], "same path"),
        (["{folder}", "--out", "{out}", "--init", "{folder}/encoding.npz"], "--init"),
        (["{folder}", "--out", "{out}", "--solver", "heavy"], "--solver"),
        (["{folder}", "--out", "{folder}/good0.png/out"], "cannot write there"),  # an unwritable --out
    ],
)
def test_mistakes_are_one_line_and_exit_2_before_any_work(argv, names, folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    photo(tmp_path / "copy" / "sub" / "good1.png", (40, 30), 5)
    values = {"folder": str(folder), "out": str(tmp_path / "out"), "empty": str(tmp_path / "empty")}
    values["copy"] = str(tmp_path / "copy")
    err = one_line_exit_2([a.format(**values) for a in argv], capsys)
    assert names in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_out_folder_with_another_model_or_settings_is_refused(encoded, folder, capsys):
    out, _ = encoded
    before = sorted(p.name for p in (out / "data").iterdir())
    for change in (["--model", "conv-rgb"], ["--model", "rao-ballard-1999", "--steps", "4"]):
        err = one_line_exit_2([str(folder), "--out", str(out), *change], capsys)
        assert f"--out {out} holds a data set of model rao-ballard-1999" in err
    err = one_line_exit_2([str(folder), "--out", str(out), *MODEL, "--outputs", "latents,error_map"], capsys)
    assert "outputs latents" in err
    assert sorted(p.name for p in (out / "data").iterdir()) == before


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = one_line_exit_2([str(folder), "--out", str(out), *MODEL], capsys)
    assert "another pc-encode is writing" in err


def test_encodings_imports_without_pyarrow_until_it_reads():
    code = (
        "import sys, pcmodel, pcmodel.encodings, pcmodel.collection, pcmodel.cli; "
        "print('pyarrow' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_rows_bit_for_bit(folder, encoded, tmp_path, capsys):
    pytest.importorskip("ray", reason="--engine ray needs the ray extra")
    local, _ = encoded
    out = tmp_path / "ray"
    # One actor: the local Ray gets workers + 1 = 2 CPUs, as CI's 2-CPU machines have.
    summary = finish([str(folder), "--out", str(out), *MODEL, "--workers", "1", "--engine", "ray"], capsys)
    assert summary["engine"] == "ray" and summary["rows"] == 4 + len(BAD) and summary["failed"] == len(BAD)
    ours = pq.read_table(local / "data").sort_by("path")
    theirs = pq.read_table(out / "data").sort_by("path")
    assert theirs.schema == ours.schema
    assert theirs.equals(ours)  # every column, latents bit for bit


# Batches of one image, so that a Ray task (encode_ray.GROUPS_PER_TASK batches) is short and tasks remain
# after the first shard.
RAY_KILL = ["--model", "rao-ballard-1999", "--steps", "1000", "--workers", "1", "--batch-size", "1"]


@pytest.mark.slow
def test_a_ray_actor_killed_mid_run_is_restarted_and_its_batches_redone(many, tmp_path, capsys):
    pytest.importorskip("ray", reason="--engine ray needs the ray extra")
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "ray"
    process = run_cli([str(many), "--out", str(out), *RAY_KILL, "--shard-rows", "2", "--engine", "ray", "--json"])
    wait_for_shards(out, 1, process, timeout=90)
    # As the OOM killer would: the actor's process (a worker of the raylet pc-encode started), from outside.
    actors = []
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "MapBatches(RayEncoder)" in " ".join(child.cmdline()):
                actors.append(child)
    assert len(actors) == 1, actors
    actors[0].send_signal(signal.SIGKILL)
    stdout, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    summary = json.loads(stdout)
    # Restarted, the batch it held run again whole (not split), every input once. `restarts` counts deaths while
    # encoding: 1 as a rule, 0 where the kill landed between two of its batches (seen once under CI's load; Ray
    # then resubmits the next one to the new actor); the deaths count is tested exactly by the poison-file test.
    assert (summary["status"], summary["split"]) == ("complete", 0) and summary["restarts"] in (0, 1), err
    assert (summary["rows"], summary["done"], summary["failed"], summary["encoded"]) == (IMAGES, IMAGES, 0, IMAGES)
    paths = paths_in(out)
    assert sorted(paths) == [f"{i:03d}.png" for i in range(IMAGES)]
    assert sorted(r.path for r in encodings.read(out)) == sorted(paths)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"inputs": IMAGES, "rows": IMAGES, "done": IMAGES, "failed": 0, "missing": 0}
    # The rows are the local engine's, bit for bit.
    local = tmp_path / "local"
    finish([str(many), "--out", str(local), *RAY_KILL], capsys)
    assert pq.read_table(out / "data").sort_by("path").equals(pq.read_table(local / "data").sort_by("path"))


def exit_watching(process: subprocess.Popen, timeout: float) -> tuple[str, str, list]:
    """Wait for `process` to end, gathering every process under it meanwhile (Ray's, those it starts as it
    stops included): its stdout, stderr and those processes (psutil's, each with its name)."""
    import psutil

    seen: dict = {}
    deadline = time.monotonic() + timeout
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen.setdefault(child.pid, (child, child.name()))
        assert time.monotonic() < deadline, "it did not stop"
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    return stdout, stderr, list(seen.values())


def raylet_in(processes: list) -> bool:
    import psutil

    for p in processes:
        with contextlib.suppress(psutil.Error):  # one that ended meanwhile
            if "raylet" in p.name():
                return True
    return False


def running(processes: list, timeout: float) -> list:
    """Those of `processes` still running (a zombie counts as ended) after up to `timeout` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in processes:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# Four Ray tasks of four batches of one image, about a second each: Ray Data hands the driver the rows of a
# task or two at once, and tasks remain after the first shard.
RAY_STOP = ["--model", "rao-ballard-1999", "--steps", "2000", "--workers", "1", "--batch-size", "1"]
RAY_STOP_IMAGES = 16


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, group, when, code",
    [
        (signal.SIGINT, True, "shard", 130),
        (signal.SIGTERM, False, "shard", 143),
        (signal.SIGTERM, False, "raylet", 143),
    ],
    ids=["ctrl-c-to-the-process-group", "sigterm", "sigterm-as-ray-starts"],
)
def test_ctrl_c_and_sigterm_stop_a_ray_run_cleanly_and_the_same_command_finishes_it(sig, group, when, code, tmp_path):
    """As the local engine: exit 130 or 143, the manifest `interrupted`, the JSON summary, the resume line, the
    rows written kept, and Ray stopped with the run (no process of it left). Ctrl-C goes to the process group,
    as a terminal sends it (Ray's own processes are in it); SIGTERM to pc-encode alone, as KubeRay stops a head.
    Were: SIGTERM, taken over by ray.init, an abort (exit 134, no summary, the manifest `running`); a signal
    while ray.init ran (its raylet up), exit 15 or a crash, and Ray's agents left running."""
    pytest.importorskip("ray", reason="--engine ray needs the ray extra")
    psutil = pytest.importorskip("psutil")
    root = tmp_path / "photos"
    for i in range(RAY_STOP_IMAGES):
        photo(root / f"{i:03d}.png", (40, 30), 100 + i)
    out = tmp_path / "ray"
    args = [str(root), "--out", str(out), *RAY_STOP, "--shard-rows", "2", "--engine", "ray", "--json"]
    process = run_cli(args, start_new_session=True)
    try:
        if when == "shard":
            wait_for_shards(out, 1, process, timeout=90)
        else:  # Ray's raylet started: ray.init goes on for a second or more (agents, the driver's connection)
            deadline = time.monotonic() + 60
            while not raylet_in(psutil.Process(process.pid).children(recursive=True)):
                assert process.poll() is None and time.monotonic() < deadline, "no raylet"
                time.sleep(0.02)
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        stdout, err, ray = exit_watching(process, timeout=60)
        assert process.returncode == code, err
        assert "SIGTERM received" not in err
        summary = json.loads(stdout)
        assert summary["status"] == "interrupted" and summary["engine"] == "ray"
        assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
        assert "run the same command again" in err.lower() and "pc-encode " + " ".join(args) in err
        assert "raylet" in [name for _, name in ray], ray
        left = running([p for p, _ in ray], timeout=15)
        assert not left, f"Ray's processes outlived the run: {left}"
    finally:  # whatever is left of the run's process group (Ray's agents of a failed run), not to outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.communicate()
    if when == "raylet":
        return
    first = paths_in(out)
    assert 0 < len(first) < RAY_STOP_IMAGES and len(first) == len(set(first))
    assert summary["rows"] == summary["encoded"] == len(first)  # what was written is what it counted
    assert not [p for p in (out / "data").iterdir() if not p.name.endswith(".parquet")]  # no temporary file

    command = [sys.executable, "-m", "pcmodel.cli", *args]
    again = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["status"] == "complete" and summary["encoded"] == RAY_STOP_IMAGES - len(first)
    assert sorted(paths_in(out)) == [f"{i:03d}.png" for i in range(RAY_STOP_IMAGES)]  # each input once


def test_while_ray_starts_signals_are_held_and_the_callers_handlers_stay():
    """encode_ray._signals_held around ray.init: a handler set meanwhile (Ray's SIGTERM handler, which exits) is
    not installed over the caller's, and a signal that comes is delivered to the caller's handler at the end;
    where the caller had none (SIG_DFL), the one set meanwhile stays."""
    from pcmodel.encode_ray import _signals_held

    class Stop(Exception):
        pass

    def ours(signum, frame):
        raise Stop(signum)

    def rays(signum, frame):
        sys.exit(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, ours)
        reached = False
        with pytest.raises(Stop), _signals_held():
            signal.signal(signal.SIGTERM, rays)  # as ray.init does
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.01)  # its handler would run by now
            reached = True
        assert reached and signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with _signals_held():
            signal.signal(signal.SIGTERM, rays)
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# pc-encode --engine ray with an encoder whose process dies (SIGKILL) on any batch holding poison.png.
POISONED = """
import os, signal, sys
from pcmodel import cli, encode_ray

class Poisoned(encode_ray.RayEncoder):
    def encode(self, inputs):
        if any(item.path == "poison.png" for item in inputs):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(inputs)

encode_ray.RayEncoder = Poisoned  # defined in __main__: Ray sends its code to the actors
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_file_that_kills_its_ray_actor_every_time_becomes_a_worker_died_row(tmp_path):
    pytest.importorskip("ray", reason="--engine ray needs the ray extra")
    rows = encode_with_poison(tmp_path, [sys.executable, "-c", POISONED], ["--engine", "ray"], ENV)
    assert "died" in rows["poison.png"].error


def test_the_readmes_read_example_runs_on_a_data_set(encoded, tmp_path, monkeypatch, capsys):
    import re

    out, _ = encoded
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- encode-read-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert block, "README has no encode-read-example block"
    (tmp_path / "encoded").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "good0.png [(" in printed and "zero.jpg bad_image" in printed
    assert "('too_large', 3)" in printed


# pc-encode --engine ray whose actors cannot start (the model does not load in them).
UNLOADABLE = """
import sys
from pcmodel import cli, encode_ray

class Unloadable(encode_ray.RayEncoder):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("the model did not load")

encode_ray.RayEncoder = Unloadable  # defined in __main__: Ray sends its code to the actors
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_ray_job_whose_actors_cannot_start_fails_in_one_line(tmp_path):
    pytest.importorskip("ray", reason="--engine ray needs the ray extra")
    root = tmp_path / "photos"
    for i in range(3):
        photo(root / f"{i}.png", (40, 30), i)
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), *MODEL, "--workers", "1", "--engine", "ray", "--json"]
    command = [sys.executable, "-c", UNLOADABLE, *args]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=150)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("pc-encode: the Ray job failed (ActorDiedError") and "\x1b" not in last, last
    assert json.loads(run.stdout)["status"] == "failed"
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test, as in a terminal, whatever the run inherited
    (a test run started in the background, `cmd &` in a script, inherits SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_as_a_shard_is_written_never_writes_its_rows_twice(tmp_path, monkeypatch, ctrl_c_raises):
    """Ctrl-C landing just as a shard's file is complete: the shard counts as written (the final flush of the
    interrupted run does not write its rows again). Seen once in the Ctrl-C test above: rows twice."""
    from pcmodel import encode_job

    written = encodings.write_shard

    def then_ctrl_c(folder, data):
        path = written(folder, data)
        signal.raise_signal(signal.SIGINT)  # to this thread (os.kill may pick another of the process's threads)
        return path

    monkeypatch.setattr(encodings, "write_shard", then_ctrl_c)
    writer = encode_job.ShardWriter(tmp_path, shard_rows=2)
    with pytest.raises(KeyboardInterrupt):
        writer.add(pa.table({"path": ["a.png", "b.png"]}))
    monkeypatch.setattr(encodings, "write_shard", written)
    writer.flush()  # what an interrupted run does on its way out
    rows = pa.concat_tables([pq.read_table(p) for p in encodings.shards(tmp_path)]).column("path").to_pylist()
    assert rows == ["a.png", "b.png"]


def test_a_run_interrupted_in_process_gives_back_the_signal_handlers(many, tmp_path, monkeypatch, ctrl_c_raises):
    """Called with an argv inside a longer-lived process (a script, this test run), pc-encode's main puts the
    caller's SIGINT and SIGTERM handlers back after an interrupted run; only the command itself, whose process is
    ending, ignores later signals. (It had left both ignored here: Ctrl-C stopped working in the caller, and a
    later test that raised SIGINT saw nothing.)"""
    written = encodings.write_shard

    def then_ctrl_c(folder, data):
        path = written(folder, data)
        signal.raise_signal(signal.SIGINT)
        return path

    monkeypatch.setattr(encodings, "write_shard", then_ctrl_c)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    args = [str(many), "--out", str(tmp_path / "out"), "--model", "rao-ballard-1999", "--steps", "2"]
    assert main([*args, "--workers", "1", "--batch-size", "2", "--shard-rows", "2", "--limit", "6"]) == 130
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert before[signal.SIGINT] is signal.default_int_handler


# pc-encode sending itself SIGTERM (os.kill: the kernel picks one of its threads, as for a SIGTERM from outside)
# at one moment of its second shard's write, picked by an audit hook (Python's own; nothing of ours replaced):
# the temporary shard opened to be written, or the data folder opened to be fsynced once the shard is in place.
SIGTERM_AS_A_SHARD_IS_WRITTEN = """
import os, signal, sys, time
from pcmodel import cli, encodings

moment, seen = sys.argv[1], []

def hook(event, args):
    if event != "open" or not isinstance(args[0], str):
        return
    name = os.path.basename(args[0])
    if name.startswith(".part-") if moment == "writing" else name == encodings.DATA:
        seen.append(name)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs in here, or where the signal was held until

sys.addaudithook(hook)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("moment", ["writing", "renamed"])
def test_sigterm_as_a_shard_is_written_keeps_its_rows_once_and_counts_them(moment, many, tmp_path):
    """SIGTERM held by pthread_sigmask for the main thread alone went to another thread (torch, pyarrow and Ray
    start some), and its handler raised in the main thread all the same, inside the flush: after the rename the
    final flush wrote the rows a second time (the killed-worker test above, now and then), and either way the
    rows went uncounted in `encoded`. Now the stop waits for the shard: its rows once, and counted."""
    out = tmp_path / "out"
    args = [str(many), "--out", str(out), *MODEL, "--workers", "1", "--batch-size", "2", "--shard-rows", "2", "--json"]
    command = [sys.executable, "-c", SIGTERM_AS_A_SHARD_IS_WRITTEN, moment, *args]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 143, run.stderr
    summary = json.loads(run.stdout)
    paths = paths_in(out)
    assert sorted(paths) == sorted(set(paths)) and len(paths) >= 4, sorted(paths)  # the two shards, each row once
    assert summary["rows"] == summary["encoded"] == len(paths), summary


def test_fifos_devices_and_odd_list_entries_become_rows_and_a_rerun_finishes(tmp_path):
    """A FIFO and a link to /dev/zero named like images are `unreadable` rows, never read (a FIFO blocked the
    run forever; /dev/zero was read without end); a FIFO without an image name is no input. A NUL byte in a
    list's path is an `unreadable` row (its rerun crashed); a CSV's quoted newline stays in its path. The same
    command again finishes at once (it had hashed /dev/zero forever)."""
    root = tmp_path / "photos"
    photo(root / "good.png", (40, 30), 0)
    photo(root / "new\nline.png", (40, 30), 1)
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo")
    (root / "zero.png").symlink_to("/dev/zero")
    listing = tmp_path / "list.csv"
    listing.write_text(f'path\n"{root / "new"}\n{"line.png"}"\n')  # quoted: a newline inside the path
    nul = tmp_path / "nul.txt"
    nul.write_text(f"{root / 'good.png'}\0x\n")
    argv = [sys.executable, "-m", "pcmodel.cli", str(root), str(listing), str(nul), "--out", str(tmp_path / "out")]
    argv += [*MODEL, "--workers", "1", "--json"]
    for _ in range(2):
        run = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        rows = {r.path: r for r in encodings.read(tmp_path / "out")}
        assert rows["fifo.png"].reason == rows["zero.png"].reason == "unreadable", rows
        assert "not a regular file" in rows["fifo.png"].error and "fifo" not in rows
        assert rows["good.png"].reason is None and rows["new\nline.png"].reason is None
        assert rows[str(root / "new\nline.png")].reason is None  # from the CSV, its path whole
        assert rows[f"{root / 'good.png'}\0x"].reason == "unreadable"
        assert len(rows) == 6 and len(paths_in(tmp_path / "out")) == 6


def test_a_damaged_out_folder_or_list_is_one_line_and_exit_2(encoded, folder, tmp_path, capsys):
    """A manifest that is not one, a shard cut short, a list that is not text: one line and exit 2, nothing
    written (each was a traceback). The same outputs in another order are the same data set."""
    out, _ = encoded
    for name, damage, text in (
        ("manifest", lambda d: (d / "manifest.json").write_text("{not json"), "is not a data set's manifest"),
        ("list", lambda d: (d / "manifest.json").write_text("[1, 2]"), "a JSON list, not an object"),
        ("shard", lambda d: os.truncate(encodings.shards(d)[0], 500), "cannot be read"),
    ):
        copy = tmp_path / name
        subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
        damage(copy)
        before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*")}
        err = one_line_exit_2([str(folder), "--out", str(copy), *MODEL, "--workers", "1"], capsys)
        assert text in err, err
        assert {p.name: p.stat().st_mtime_ns for p in copy.rglob("*") if p.name != ".lock"} == {
            k: v for k, v in before.items() if k != ".lock"
        }
    not_text = tmp_path / "photo.txt"
    not_text.write_bytes((folder / "good0.png").read_bytes())
    assert "must be UTF-8 text" in one_line_exit_2([str(not_text), "--out", str(tmp_path / "o")], capsys)
    two = tmp_path / "two"
    single = [str(folder / "good0.png"), str(folder / "sub"), "--out", str(two), *MODEL, "--workers", "1"]
    assert main([*single, "--outputs", "latents,error_map"]) == 0
    assert main([*single, "--outputs", "error_map,latents"]) == 0
