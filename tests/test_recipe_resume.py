"""Resume safety: the checkpoint's config is compared with the current one before anything is
restored, and ``--resume OTHER`` never writes to the other run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from configs import digits
from mambaout_jax.train.recipe import ConfigError, check_resume_config
from mambaout_jax.train.trainer import train


def config(**overrides):
    c = digits.get_config()
    c.unlock()
    c.batch_size = 16
    c.max_steps = 2
    c.checkpoint_every_steps = 1
    c.eval_batch_size = 64
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_changed_stream_or_maths_fields_are_listed_and_can_be_allowed():
    saved = config().to_json()
    check_resume_config(saved, config(lr=1e-2, epochs=3), saved_process_count=1, process_count=1)  # not guarded
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, config(seed=1, batch_size=32, **{"data.worker_count": 2}), saved_process_count=1,
                            process_count=1)  # fmt: skip
    message = str(e.value)
    for field in ("seed: 42 -> 1", "batch_size: 16 -> 32", "data.worker_count: 0 -> 2", "resume_allow_changes="):
        assert field in message, message
    assert "lr" not in message.split("changed:")[1].split(". If")[0]
    with pytest.raises(ConfigError, match="process_count: 1 -> 2"):
        check_resume_config(saved, config(), saved_process_count=1, process_count=2)
    check_resume_config(saved, config(seed=1, **{"data.worker_count": 2, "resume_allow_changes": "seed, data"}),
                        saved_process_count=1, process_count=1)  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_from_another_run_reads_it_only_and_checks_its_config(tmp_path):
    first = tmp_path / "first"
    train(config(), first)
    before = snapshot(first)
    assert any("checkpoints" in k for k in before)
    with pytest.raises(ConfigError, match="batch_size: 16 -> 32"):
        train(config(batch_size=32, max_steps=4), tmp_path / "bad", resume=str(first))
    result = train(config(max_steps=3, lr=1e-3), tmp_path / "second", resume=str(first))
    assert result["step"] == 3
    assert snapshot(first) == before  # byte for byte: nothing written, renamed or deleted there
    # The own checkpoint is compared too.
    with pytest.raises(ConfigError, match="seed: 42 -> 3"):
        train(config(max_steps=4, seed=3), tmp_path / "second")
