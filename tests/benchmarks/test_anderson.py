"""benchmarks/anderson.py: Anderson acceleration is right (exact on a linear map) and the report measures it."""

from __future__ import annotations

import json

import torch

from benchmarks import anderson


def test_anderson_solves_a_linear_fixed_point_in_n_plus_one_steps():
    """On G(x) = A x + b (n = 4), type-II Anderson with a full window is GMRES: exact after n + 1 maps; the
    plain iteration is far from it."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.9, 0.5, -0.3, 0.95], dtype=torch.float64)) @ q.T
    b = torch.randn(3, 4, generator=generator, dtype=torch.float64)  # three images
    fixed = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - a, b.T).T

    def step(r):
        return [r[0] @ a.T + b]

    start = [torch.zeros(3, 4, dtype=torch.float64)]
    accelerated = anderson.anderson(step, start, steps=6, window=5)[0]
    torch.testing.assert_close(accelerated, fixed, rtol=0, atol=1e-9)
    plain = start
    for _ in range(6):
        plain = step(plain)
    assert (plain[0] - fixed).abs().max() > 1e-2


def test_the_report_has_every_method_and_anderson_is_closer_at_20_steps(capsys):
    assert anderson.main(["--model", "rao-ballard-1999", "--count", "4", "--window", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    rows = {(r["start"], r["method"], r["steps"]): r for r in report["rows"]}
    assert {m for _, m, _ in rows} == {"gradient", report["served"], "anderson m=3"}
    assert {s for s, *_ in rows} == {"zero", "amortised"}
    for start in ("zero", "amortised"):
        assert (
            rows[(start, "anderson m=3", 20)]["energy_gap_pct"] < rows[(start, report["served"], 20)]["energy_gap_pct"]
        )
