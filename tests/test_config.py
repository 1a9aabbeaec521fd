import dataclasses

import pytest

from sotjax import SOTConfig, SotjaxInputError


@pytest.mark.parametrize("field, value", [
    ("lam", -0.1), ("lam", 1.5), ("epsilon", 0.0), ("epsilon", -1.0), ("epsilon", float("nan")),
    ("loss", "wasserstein"), ("steps", 0), ("steps", 2.5), ("lr", 0.0), ("momentum", 1.0),
    ("entropy", -1e-3), ("keep", 0.0), ("keep", 1.01), ("keep_count", 0), ("dtype", "float16"),
    ("optimizer", "lbfgs"), ("reweight", "linear"), ("sinkhorn_threshold", 0.0), ("lse_mode", "fast"),
])
def test_invalid_fields_are_rejected_with_their_name(field, value):
    with pytest.raises(SotjaxInputError, match=rf"^{field}="):
        SOTConfig(**{field: value})


def test_defaults_are_the_papers_and_config_is_frozen():
    cfg = SOTConfig()
    assert (cfg.lam, cfg.epsilon, cfg.loss, cfg.keep) == (0.5, 0.1, "transport", 0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lam = 0.3  # type: ignore[misc]
    assert cfg.replace(lam=0.2).lam == 0.2
    assert SOTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SotjaxInputError, match="unknown field"):
        SOTConfig.from_dict({"lambda": 0.5})


def test_layers_partition_the_flat_config():
    from sotjax.config import LAYERS, GeometryConfig, ObjectiveConfig, SelectionConfig, SolverConfig

    flat = [f.name for f in dataclasses.fields(SOTConfig)]
    layered = [f.name for layer in LAYERS.values() for f in dataclasses.fields(layer)]
    assert sorted(flat) == sorted(layered) and len(set(layered)) == len(layered)
    cfg = SOTConfig(lam=0.3, epsilon=0.05, lr=2.0, keep=0.5, plan="stream", memory_budget=1 << 30)
    assert cfg.objective == ObjectiveConfig(lam=0.3)
    assert cfg.geometry == GeometryConfig(epsilon=0.05, plan="stream", memory_budget=1 << 30)
    assert cfg.solver == SolverConfig(lr=2.0) and cfg.selection == SelectionConfig(keep=0.5)
    assert SOTConfig.from_layers(cfg.geometry, cfg.objective, cfg.solver, cfg.selection) == cfg
    assert SOTConfig.paper() == SOTConfig(conditioning="raw") and SOTConfig().conditioning == "standardize"
    assert SOTConfig.entropic().entropy == 0.03


@pytest.mark.parametrize("layer, bad", [
    ("GeometryConfig", {"plan": "sparse"}), ("GeometryConfig", {"memory_budget": 0}),
    ("ObjectiveConfig", {"lam": -0.1}), ("SolverConfig", {"steps": 0}), ("SelectionConfig", {"keep": 0.0}),
])
def test_each_layer_validates_its_fields(layer, bad):
    import sotjax.config as C

    with pytest.raises(SotjaxInputError, match=next(iter(bad))):
        getattr(C, layer)(**bad)
    with pytest.raises(SotjaxInputError, match=next(iter(bad))):
        SOTConfig(**bad)
