"""`discl train` entry point: bad config and missing inputs fail fast with clear messages (no Ray started)."""

from __future__ import annotations

from jobs.train import main


def test_bad_strategy_names_valid_choices(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_root: {tmp_path / 'runs'}\ntraining:\n  strategy: bogus\n")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "training.strategy" in err and "diverse_to_specific" in err and "adaptive" in err


def test_missing_tables_fail_before_training(tmp_path, capsys):
    from discl_ray.config import load_config
    from discl_ray.training.fixture import write_fixture

    root = tmp_path / "runs"
    args = [f"run_root={root}", "experiment=fx", "dataset.image_size=16", "mining.few_max=10",
            "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]",
            "tracking.enabled=false"]
    write_fixture(load_config(None, args))
    for sub in ("score/scores",):
        for f in (root / "fx" / sub).glob("*.parquet"):
            f.unlink()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  strategy: diverse_to_specific\n")
    assert main(["--config", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert "scores" in err and "discl score" in err and "spectrum" not in err


def test_train_rejects_a_non_ascii_run_name_before_any_work(tmp_path, capsys):
    from jobs import train

    rc = train.main(["--config", "configs/toy/digits_lt.yaml", f"run_root={tmp_path}", "--run-name", "text-only λ=0"])
    assert rc == 2
    assert "ASCII" in capsys.readouterr().err
