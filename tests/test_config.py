"""Config validation: every shipped YAML loads; bad input fails with the field path and valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from discl_ray.config import STRATEGIES, ConfigError, load_config, load_yaml, to_flat_dict

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_validates(path):
    """Every value the file (with its ``base:`` chain) sets is the value the validated config holds: nothing
    is dropped, renamed or defaulted over (λ lists compare as sets: the schema sorts them)."""
    cfg = load_config(path)
    written = to_flat_dict(load_yaml(path))
    resolved = to_flat_dict(cfg.model_dump(mode="json"))
    assert written, path
    for key, val in written.items():
        if key.startswith("sweep.space"):
            continue                                    # compared as a whole below (its keys hold dots)
        assert key in resolved, (path, key)
        got = resolved[key]
        if isinstance(val, list) and key.endswith("lams"):
            assert sorted(got) == sorted(val), (path, key)
        else:
            assert got == val or (isinstance(val, (int, float)) and got == pytest.approx(val)), (path, key, got, val)
    assert cfg.sweep.space == load_yaml(path).get("sweep", {}).get("space", {})


def test_shipped_configs_exist():
    assert any(p.parent.name == "toy" for p in CONFIGS)


@pytest.mark.parametrize("override, needle", [
    ("training.strategy=foo", "training.strategy"),
    ("generation.lams=[0.2,1.5]", "[0, 1]"),
    ("generation.lams=[-0.1]", "generation.lams"),
    ("generation.seeds=[]", "generation.seeds"),
    ("training.epocs=3", "did you mean 'epochs'"),
    ("training.epochs=ten", "training.epochs"),
    ("training.lams=[0.0,0.0]", "unique"),
    ("dataset.name=mnist", "imagenet_lt"),
    ("training.curriculum_epochs=100", "curriculum_epochs"),
    ("mining.mode=confidence", "exactly one of"),
    ("prompts.template=hello", "{name}"),
    ("bogus_section.x=1", "unknown key"),
])
def test_bad_values_fail_with_field_path(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value)


def test_unknown_strategy_lists_every_valid_choice():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["training.strategy=curriculum"])
    for name in STRATEGIES:
        assert name in str(err.value)


def test_training_lams_must_be_generated():
    with pytest.raises(ConfigError, match="not in generation.lams"):
        load_config(overrides=["generation.lams=[0.0]", "training.lams=[0.0,0.5]"])
    cfg = load_config(overrides=["generation.lams=[0.5]", "training.lams=[0.5,1.0]"])
    assert cfg.training.lams == [0.5, 1.0]


def test_sweep_space_keys_must_exist():
    with pytest.raises(ConfigError, match="training.bogus"):
        load_config(data={"sweep": {"space": {"training.bogus": {"grid": [1, 2]}}}})
    with pytest.raises(ConfigError, match="grid"):
        load_config(data={"sweep": {"space": {"training.seed": {"pick": [1, 2]}}}})
    cfg = load_config(data={"sweep": {"space": {"training.seed": {"grid": [0, 1]}}}})
    assert cfg.sweep.space["training.seed"] == {"grid": [0, 1]}


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("experiment: a\ntraining:\n  epochs: 9\n  curriculum_epochs: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nexperiment: b\ntraining:\n  epochs: 7\n")
    data = load_yaml(tmp_path / "child.yaml")
    assert data["experiment"] == "b" and data["training"] == {"epochs": 7, "curriculum_epochs": 4}
    cfg = load_config(tmp_path / "child.yaml", ["training.lr=0.5", "generation.seeds=[3]"])
    assert (cfg.training.epochs, cfg.training.curriculum_epochs, cfg.training.lr) == (7, 4, 0.5)
    assert cfg.generation.seeds == [3]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(overrides=["training.epochs"])


def test_lams_are_sorted():
    cfg = load_config(overrides=["generation.lams=[0.5,0.0,0.3]", "training.lams=[1.0,0.3]"])
    assert cfg.generation.lams == [0.0, 0.3, 0.5] and cfg.training.lams == [0.3, 1.0]
