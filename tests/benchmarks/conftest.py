"""The tiny configs and seeded generator of tests/pcmodel, shared: the benchmarks run the same networks."""

from tests.pcmodel.conftest import KINDS, generator, tiny_config

__all__ = ["KINDS", "generator", "tiny_config"]
