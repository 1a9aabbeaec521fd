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
