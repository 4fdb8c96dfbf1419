"""Search grids (paper Table 1) and how a grid point becomes a run config."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from typing import Any

from .._config import ClusteringConfig, Config, ModelConfig, config_from_dict
from .._errors import ConfigError

#: Table 1 of the paper for the fusion model and the domain refinement (the integration grids
#: live with the methods: ``spatlas.pp.get_integration(name).grid``).
MODEL_GRIDS: dict[str, dict[str, list]] = {
    "grid_ae": {"morphology_weight": [0, 1, 1.5, 2, 3], "window": [5, 7]},
}
CLUSTERING_GRID: dict[str, list] = {"refine": [True, False]}

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "params"}
_CLUSTERING_FIELDS = {f.name for f in dataclasses.fields(ClusteringConfig)}


def default_grid(component: str) -> dict[str, list]:
    """Table-1 grid of a component: an integration method, a model, or ``clustering``."""
    from .. import pp

    if component == "clustering":
        return copy.deepcopy(CLUSTERING_GRID)
    if component in MODEL_GRIDS:
        return copy.deepcopy(MODEL_GRIDS[component])
    if component in pp.list_integrations():
        return copy.deepcopy(pp.get_integration(component).grid)
    return {}


def config_path(component: str, name: str, *, integration: str, model: str) -> tuple[str, ...]:
    """Where a component's parameter goes in the config tree."""
    if component == "clustering":
        if name not in _CLUSTERING_FIELDS:
            raise ConfigError(
                f"tune.grids.clustering: unknown setting '{name}' "
                f"(known: {', '.join(sorted(_CLUSTERING_FIELDS))})"
            )
        return ("clustering", name)
    if component == integration:
        return ("integration", "params", name)
    if component == model:
        return ("model", name) if name in _MODEL_FIELDS else ("model", "params", name)
    raise ConfigError(f"tune: component '{component}' is not part of this pipeline")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One named pipeline to tune: an integration method, optionally a fusion model.

    Attributes
    ----------
    name
        Label in the tables (``harmony``, ``harmony+grid_ae``).
    integration
        Integration method (``none`` for uncorrected PCs).
    model
        Fusion model name, or ``none``.
    """

    name: str
    integration: str
    model: str = "none"

    @property
    def components(self) -> tuple[str, ...]:
        """The components whose grids this pipeline searches."""
        parts = [self.integration] if self.integration != "none" else []
        if self.model != "none":
            parts.append(self.model)
        return (*parts, "clustering")


def pipeline_grid(
    pipeline: Pipeline,
    grids: Mapping[str, Mapping[str, list]],
    *,
    morphology: bool,
) -> dict[tuple[str, ...], list]:
    """Config path -> values for every parameter searched in ``pipeline``.

    ``grids`` overrides the Table-1 grid of a component (a component given as an empty mapping
    is not searched). Without morphology, a model's ``morphology_weight`` is not searched (it
    has no effect).
    """
    out: dict[tuple[str, ...], list] = {}
    for component in pipeline.components:
        grid = grids.get(component)
        grid = default_grid(component) if grid is None else grid
        if not isinstance(grid, Mapping):
            raise ConfigError(
                f"tune.grids.{component}: expected a mapping of parameter -> list of values"
            )
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"tune.grids.{component}.{name}: expected a non-empty list of values, "
                    f"got {values!r}"
                )
            if name == "morphology_weight" and not morphology and component == pipeline.model:
                continue
            path = config_path(
                component, name, integration=pipeline.integration, model=pipeline.model
            )
            out[path] = list(values)
    return out


def grid_points(grid: Mapping[tuple[str, ...], list]) -> list[dict[tuple[str, ...], Any]]:
    """The Cartesian product of a grid, in a fixed order (first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def apply_point(base: Mapping, point: Mapping[tuple[str, ...], Any]) -> dict:
    """A copy of the config dict ``base`` with the grid point's values set."""
    data = copy.deepcopy(dict(base))
    for path, value in point.items():
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def pipeline_config(base: Mapping, pipeline: Pipeline, fixed: Mapping[str, Mapping]) -> dict:
    """``base`` with the pipeline's methods set and the fixed settings of its components."""
    data = copy.deepcopy(dict(base))
    data.setdefault("integration", {})
    data.setdefault("model", {})
    if data["integration"].get("method") != pipeline.integration:
        data["integration"]["params"] = {}
    if data["model"].get("name") != pipeline.model:
        data["model"]["params"] = {}
    data["integration"]["method"] = pipeline.integration
    data["model"]["name"] = pipeline.model
    for component in pipeline.components:
        for name, value in (fixed.get(component) or {}).items():
            path = config_path(
                component, name, integration=pipeline.integration, model=pipeline.model
            )
            data = apply_point(data, {path: value})
    return data


def point_label(point: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """Flat ``section.key`` names of a grid point (for tables)."""
    return {".".join(p for p in path if p != "params"): v for path, v in point.items()}


def stable_hash(*parts: Any) -> str:
    """Short hash of JSON-serialisable parts (cache keys, trial ids)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate(data: Mapping) -> Config:
    """Build the config of a grid point (raises a ConfigError naming a bad key)."""
    return config_from_dict(copy.deepcopy(dict(data)))
