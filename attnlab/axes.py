"""Axis names, stated once: the device mesh's axes and every parameter's logical axes.

A bottom-layer module (no attnlab imports), so that every layer that names an
axis reads it from here: the models attach logical names to their parameters
(`attnlab.models.params`), the fused kernel splits its activations over the
mesh's data and head axes (`attnlab.kernels.sharded`), and `attnlab.sharding`
maps logical names onto mesh axes (`DEFAULT_RULES`, overridable per config).

It imports no flax at run time (only for type checking): the kernels import it,
and `import attnlab.kernels` pulls in no flax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from flax import nnx

Axes = tuple[str, ...]

# The mesh's axes, in device order: the batch's axes first, "model" last (the
# innermost axis gets neighbouring devices, where tensor parallelism's
# per-layer collectives are cheapest).
MESH_AXES = ("data", "fsdp", "model")
# The axes the batch is split over.
DATA_AXES = ("data", "fsdp")
# The axes attention heads are split over (tensor parallelism), in parameters
# by DEFAULT_RULES and in the fused kernel's activations (`attnlab.kernels.sharded`).
HEAD_AXES = ("model",)

# The logical name of the leading axis of parameters stacked over encoder blocks
# (`BackboneConfig.scan_layers`).
LAYERS_AXIS = "layers"

# Every logical axis name the models use -> the mesh axes it is split over
# (None: replicated). A model's parameter with a name missing here is refused
# (`attnlab.sharding.state_shardings`), so a new name gets a rule when it is introduced.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",  # FSDP: almost every weight has one embedding axis
    "heads": HEAD_AXES, "kv_heads": HEAD_AXES, "mlp": "model", "vocab": "model",  # Megatron
    "head_dim": None, "classes": None, "length": None, "patches": None,
    "patch_height": None, "patch_width": None, "channels": None,
    LAYERS_AXIS: None,  # the stacked blocks of scan_layers
    "taps": None,  # the 9 taps of InLine's predicted 3x3 kernels (layers.InlineLocal)
}

# Where flax keeps a variable's logical names, newest flax first.
_AXES_KEYS = ("out_sharding", "sharding_names", "sharding")


def variable_axes(variable: nnx.Variable) -> Axes | None:
  """The logical axis names of one parameter (None: it has none); any flax >= 0.12.2."""
  metadata = variable.get_metadata()
  for key in _AXES_KEYS:
    if metadata.get(key) is not None:
      return tuple(metadata[key])
  return None
