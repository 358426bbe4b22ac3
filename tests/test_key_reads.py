"""The evidence of the exact dead-key check (`rlhf.key_reads`, checked at the end of a whole suite in conftest.py):
a read counts by its full key path, from the project's code only, through copies made with `carry`."""
from __future__ import annotations

import dataclasses

import pytest

from rlhf import config, key_reads

SFT = "configs/tiny/sft.yaml"


@pytest.fixture
def reads(tmp_path, monkeypatch):
    """This test's reads alone, into its own directory."""
    monkeypatch.setenv(key_reads.ENV, str(tmp_path))
    monkeypatch.setattr(key_reads, "_seen", set())
    monkeypatch.setattr(key_reads, "_out", None)
    yield lambda: key_reads.collected(str(tmp_path))
    if key_reads._out is not None:
        key_reads._out.close()


def test_loading_and_checking_a_config_reads_no_key(reads):
    cfg = config.load_config("sft", SFT)
    config.to_yaml(cfg)  # printing it reads every field from OmegaConf's code
    dataclasses.asdict(cfg)
    assert reads() == set()


def test_a_read_counts_by_its_full_path_and_only_from_the_project(reads):
    cfg = config.load_config("dpo", "configs/tiny/dpo.yaml")
    assert cfg.optim.lr > 0  # the test's own read is no use
    assert reads() == set()
    config.ranks(cfg.layout)
    assert reads() == {"dpo:layout.num_nodes", "dpo:layout.gpus_per_node"}


def test_a_role_built_from_the_sections_answers_for_their_keys(reads):
    cfg = config.load_config("dpo", "configs/tiny/dpo.yaml")
    reference = cfg.role().frozen()
    assert reads() == {"dpo:layout", "dpo:deepspeed", "dpo:optim", "dpo:lora", "dpo:train",
                       "dpo:train.micro_batch_size", "dpo:train.max_tokens_per_micro_batch"}
    config.get_key(reference, "deepspeed.zero_stage")
    assert "dpo:deepspeed.zero_stage" in reads()


def test_a_copy_keeps_its_keys_only_when_made_with_replaced(reads):
    cfg = config.load_config("ppo", "configs/tiny/ppo.yaml")
    lost = dataclasses.replace(cfg.generation, max_new_tokens=8)
    kept = key_reads.replaced(cfg.generation, max_new_tokens=8)
    config.get_key(lost, "temperature")
    assert "ppo:generation.temperature" not in reads()
    config.get_key(kept, "temperature")
    assert "ppo:generation.temperature" in reads()


def test_sampling_settings_handed_on_as_a_dict_are_read_and_a_recorded_config_is_not(reads):
    from actors.inference import as_dict
    cfg = config.load_config("ppo", "configs/tiny/ppo.yaml")
    config.as_dict(cfg)  # what W&B records of a run
    assert reads() == set()
    as_dict(cfg.generation)  # what the rollout engine samples with
    assert {"ppo:generation.temperature", "ppo:generation.top_p"} <= reads()
    assert not any(k.startswith("ppo:ppo.") for k in reads())


def test_a_key_is_dead_unless_read_at_its_own_path():
    from conftest import KEYS_READ_ONLY_WITH_CUDA, unread_keys
    from rlhf.commands import COMMANDS
    every = {f"{name}:{key}" for name, command in COMMANDS.items() for key in config.config_keys(command.config)}
    assert unread_keys(every) == []
    # Another role's micro_batch_size read, or the same key read in another command, is not this path read.
    assert unread_keys(every - {"ppo:roles.reference.micro_batch_size"}) == ["roles.reference.micro_batch_size"]
    assert unread_keys(every - {"sft:optim.lr"}) == []  # rm's optim.lr is the same setting, read by the same code
    assert unread_keys(every - {f"{c}:optim.lr" for c in COMMANDS}) == ["optim.lr"]
    assert unread_keys(every - {f"{c}:{k}" for c in COMMANDS for k in KEYS_READ_ONLY_WITH_CUDA}) == []
