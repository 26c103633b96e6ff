import dataclasses

import pytest

from drt_jax import ConfigError, ModelConfig
from drt_jax.config import list_presets
from tests.conftest import small_config


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(n_heads=5), "does not divide d_model"),
        (dict(n_kv_heads=3), "must divide n_heads"),
        (dict(top_k=0), "top_k=0"),
        (dict(window=3), "shorter than one chunk"),
        (dict(chunk_size=1), "chunk_size=1"),
        (dict(arch="rnn"), "arch='rnn'"),
        (dict(position="learned"), "position='learned'"),
        (dict(arch="full", window=8), "window=None"),
        (dict(arch="swa", window=None), "needs a sliding window"),
        (dict(decoder_layers=(2,)), "every group >= 1 layer"),
        (dict(landmark_id=99), "outside the vocabulary"),
        (dict(landmark_id=61), "landmark_id must differ"),
        (dict(dropout_rate=1.5), "dropout_rate"),
        (dict(gca_residual="both"), "gca_residual"),
    ],
)
def test_invalid_configs_fail_with_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        small_config(**overrides)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_presets_load_and_are_frozen():
    names = list_presets()
    for required in ("tiny", "drt-133m", "drt-355m", "drt-775m", "swa-133m", "full-133m"):
        assert required in names
        cfg = ModelConfig.from_preset(required)
        assert cfg.name == required
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 1


def test_unknown_preset_is_one_line():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_preset("nope")
    assert "unknown preset 'nope'" in str(err.value) and "\n" not in str(err.value)


def test_from_preset_overrides_are_validated():
    assert ModelConfig.from_preset("tiny", top_k=2).top_k == 2
    with pytest.raises(ConfigError):
        ModelConfig.from_preset("tiny", top_k=0)
