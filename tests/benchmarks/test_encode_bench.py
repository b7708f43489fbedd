"""benchmarks/encode_bench.py: its images are the mixed sizes it says, and a case reports what it measured."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from benchmarks import encode_bench


def test_the_images_are_crops_of_mixed_sizes_in_two_formats(tmp_path):
    paths = encode_bench.make_images(tmp_path, 12)
    sizes = {Image.open(p).size for p in paths}
    assert len(sizes) > 6 and all(32 <= side <= 160 for size in sizes for side in size)
    assert {Image.open(p).format for p in paths} == {"PNG", "JPEG"}
    (tmp_path / "again").mkdir()
    again = encode_bench.make_images(tmp_path / "again", 12, seed=0)  # seeded: the same images
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_the_loop_case_reports_its_rate_and_memory(capsys):
    threads = torch.get_num_threads()
    try:
        assert encode_bench.main(["--images", "3", "--cases", "loop", "--size-mode", "resize", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    loop = report["cases"]["loop"]
    assert report["images"] == 3 and loop["images_per_s"] == pytest.approx(3 / loop["seconds"])
    assert loop["peak_rss_mb"] > 50 and report["machine"]["cpu"]
    assert report["ratios"] == {}  # one case: nothing to compare


def test_an_unknown_case_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        encode_bench.main(["--cases", "loop,spark"])
    assert exit_.value.code == 2 and "spark" in capsys.readouterr().err
