"""Components: every model is configured, loaded and placed one way (docs/design.md §12.2).

* :mod:`.component`: :class:`Component` and the factories that build one from its config section.
* :mod:`.loading`: :func:`load_component`, weights from a port, a ``bifrost port`` output or another phase's
  checkpoint, straight into the component's shardings, with strict key accounting.
* :mod:`.trees`: placing variable trees on shardings, logical-axis boxes, flattening.
"""
from bifrost_jax.components.component import (Component, clip_component, clip_latents_from_pixels, component_key,
                                              fixed_key, flux_component, module_kwargs, t5_component,
                                              vae_component, vision_component, vision_grid)
from bifrost_jax.components.loading import (bifrost1_layout, has_key_prefix, is_orbax_port, load_component,
                                            restore_orbax_port, restore_phase_checkpoint)
from bifrost_jax.components.trees import (abstract_dtype, check_keys, dtype_of, flat_paths, merge_trees, place,
                                          place_partial, rebox, relax_indivisible)

__all__ = ["Component", "abstract_dtype", "bifrost1_layout", "check_keys", "clip_component",
           "clip_latents_from_pixels", "component_key", "dtype_of", "fixed_key", "flat_paths", "flux_component",
           "has_key_prefix", "is_orbax_port", "load_component", "merge_trees", "module_kwargs", "place",
           "place_partial", "rebox", "relax_indivisible", "restore_orbax_port", "restore_phase_checkpoint",
           "t5_component", "vae_component", "vision_component", "vision_grid"]
