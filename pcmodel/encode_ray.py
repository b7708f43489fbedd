"""pc-encode --engine ray: the same batches through the same BatchEncoder, as a Ray Data pipeline.

`ray.data.from_items` holds the batches of paths (pcmodel.collection.batches, as the local engine makes
them), `map_batches` runs `RayEncoder` (a callable class: each actor loads the model once, one thread)
on an actor pool of `workers`, and the rows come back to this process, which writes them with the
local engine's shard writer, so resuming works the same way (a row lands only in a complete shard).

Locally Ray is started for the job with `workers` + 1 CPUs (every CPU taken by actors can stall a
data set: the reading tasks need one), no dashboard and no usage reporting; `address` (auto,
ray://host:port) joins an existing cluster instead, whose nodes must have this package installed and
see the input files at the same paths (docs/ENCODINGS.md, "On a Ray cluster").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

from . import encodings
from .collection import BatchEncoder, EncodeSettings, Input, batches
from .encode_job import Progress, ShardWriter


class RayEncoder:
    """An actor's state: the model, loaded once. Called with a batch of one or more batches of paths."""

    def __init__(self, settings: EncodeSettings, sha256: str) -> None:
        self.encoder = BatchEncoder(settings, threads=1, expect_sha256=sha256)
        self.settings = settings

    def __call__(self, batch: dict) -> object:
        import pyarrow as pa

        tables = []
        for text in batch["inputs"]:
            inputs = [Input(path, file) for path, file in json.loads(str(text))]
            tables.append(encodings.table(self.encoder(inputs), self.encoder.levels, self.settings.outputs))
        return pa.concat_tables(tables)


def run_ray(
    settings: EncodeSettings,
    sha256: str,
    levels: int,
    work: Sequence[Input],
    workers: int,
    address: str | None,
    writer: ShardWriter,
    progress: Progress,
    report: Callable[[Progress], None] = lambda p: None,
) -> None:
    """Encode `work` on a Ray Data actor pool of `workers` into `writer` (the module docstring)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timings are not pc-encode's output
    started = not ray.is_initialized()
    if started:
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=workers + 1, **common)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        target = encodings.schema(levels, settings.outputs)
        items = [{"inputs": json.dumps([[i.path, i.file] for i in b])} for b in batches(work, settings.batch_size)]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            RayEncoder,
            fn_constructor_kwargs={"settings": settings, "sha256": sha256},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            table = table.cast(target)  # Ray keeps the columns, not the schema's metadata
            writer.add(table)
            progress.add(table)
            report(progress)
    finally:
        if started:
            ray.shutdown()
