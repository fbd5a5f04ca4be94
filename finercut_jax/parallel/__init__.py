"""Many devices and many processes: the mesh and the logical-axis rules that place every array on
it (`sharding`), and the distributed runtime of a multi-host job (`distributed`)."""
from finercut_jax.parallel.distributed import DistributedError, initialize, is_primary
from finercut_jax.parallel.sharding import RULES, make_mesh

__all__ = ["RULES", "DistributedError", "initialize", "is_primary", "make_mesh"]
