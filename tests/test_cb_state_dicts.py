"""Full-size modules carry exactly the official names and shapes of the three checkpoint files.

`official_layout()` (export/chatterbox/official_layout.json, package data) lists every
parameter/buffer name and shape of the official modules per checkpoint file.
Everything here is built on the meta device: no weights are allocated.
"""
from __future__ import annotations

import pytest
import torch

from export.chatterbox import s3gen as s3gen_mod
from export.chatterbox.checkpoint import (CheckpointError, ModelConfig, TensorFile, check_shapes,
                                          component_shapes)
from export.chatterbox.official_layout import official_layout
from export.chatterbox.s3gen import S3Gen, S3GenConfig
from export.chatterbox.t3 import T3, T3Config
from export.chatterbox.voice_encoder import VoiceEncoder


def _released(file: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in official_layout()[file].items()}


def _meta_tensors(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


BUILDERS = {
    "ve.safetensors": lambda: VoiceEncoder(),
    "t3_cfg.safetensors": lambda: T3(T3Config()),
    "s3gen.safetensors": lambda: S3Gen(S3GenConfig()),
}


@pytest.mark.parametrize("file", list(BUILDERS))
def test_names_and_shapes_equal_official(file):
    with torch.device("meta"):
        model = BUILDERS[file]()
    ours, want = _shapes(model), official_layout()[file]
    assert sorted(set(want) - set(ours)) == [], "missing in our module"
    assert sorted(set(ours) - set(want)) == [], "not in the official module"
    assert {k: v for k, v in ours.items() if v != want[k]} == {}


@pytest.mark.parametrize("file", list(BUILDERS))
def test_strict_load_of_official_key_set(file):
    """The released key set loads with strict=True (s3gen: plus the computed tokenizer buffers)."""
    want = dict(official_layout()[file])
    with torch.device("meta"):
        model = BUILDERS[file]()
    released = {k: v for k, v in want.items() if k not in s3gen_mod.COMPUTED_BUFFERS} \
        if file == "s3gen.safetensors" else want
    sd = _meta_tensors(released)
    if file == "s3gen.safetensors":
        assert len(released) == len(want) - 2
        with pytest.raises(RuntimeError, match="_mel_filters"):
            model.load_state_dict(sd, strict=True, assign=True)
        sd.update(model.computed_buffers())
    model.load_state_dict(sd, strict=True, assign=True)
    # one key short, or one too many, is refused
    short = dict(sd)
    dropped = sorted(short)[len(short) // 2]
    short.pop(dropped)
    with torch.device("meta"):
        other = BUILDERS[file]()
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(short, strict=True, assign=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**sd, "no_such.weight": torch.empty(1, device="meta")}, strict=True, assign=True)


def test_s3gen_sections_cover_the_file():
    """The exporter loads s3gen one section at a time; together the sections are the whole file."""
    cfg = ModelConfig.from_preset("full")
    covered: dict[str, tuple[int, ...]] = {}
    for comp in ("tokenizer", "speaker_encoder", "flow", "estimator", "mel2wav"):
        part = component_shapes(comp, cfg)
        assert not set(part) & set(covered), comp
        covered.update(part)
    want = _released("s3gen.safetensors")
    assert covered == want
    assert component_shapes("ve", cfg) == _released("ve.safetensors")
    assert component_shapes("t3", cfg) == _released("t3_cfg.safetensors")
    assert s3gen_mod.expected_shapes(cfg.s3gen) == want


def test_checkpoint_key_check_names_the_problem():
    """The checks the exporter runs on a checkpoint's key set, with the full-size expectations."""
    expected = _released("t3_cfg.safetensors")
    check_shapes("t3_cfg.safetensors", expected, dict(expected))
    got = dict(expected)
    got.pop("text_head.weight")
    got["speech_head.weight"] = (8193, 1024)
    got["extra.bias"] = (3,)
    with pytest.raises(CheckpointError) as err:
        check_shapes("t3_cfg.safetensors", expected, got)
    msg = str(err.value)
    assert "t3_cfg.safetensors" in msg
    assert "missing keys: text_head.weight" in msg
    assert "unexpected keys: extra.bias" in msg
    assert "speech_head.weight (expected [8194, 1024], got [8193, 1024])" in msg
    # released s3gen files lack the computed buffers: optional, not missing
    s3 = _released("s3gen.safetensors")
    released = {k: v for k, v in s3.items() if k not in s3gen_mod.COMPUTED_BUFFERS}
    check_shapes("s3gen.safetensors", s3, released, optional=s3gen_mod.COMPUTED_BUFFERS)


def test_checkpoint_key_check_hints_from_the_released_layout():
    """With the official file named, the message says what the released layout suggests went wrong."""
    t3, ve = _released("t3_cfg.safetensors"), _released("ve.safetensors")
    with pytest.raises(CheckpointError) as err:
        check_shapes("ckpt/t3_cfg.safetensors", t3, ve, file="t3_cfg.safetensors")
    msg = str(err.value)
    assert f"0 of the {len(t3)} expected keys present" in msg
    assert "its keys are those of the official ve.safetensors, not t3_cfg.safetensors" in msg
    # released full-size weights against the tiny config, and the other way round
    tiny = component_shapes("ve", ModelConfig.from_preset("tiny"))
    with pytest.raises(CheckpointError, match="file has the released full-size shapes but the model config"):
        check_shapes("ckpt/ve.safetensors", tiny, ve, file="ve.safetensors")
    with pytest.raises(CheckpointError, match="it holds a model of other sizes"):
        check_shapes("ckpt/ve.safetensors", ve, tiny, file="ve.safetensors")
    # no file named, no hint
    with pytest.raises(CheckpointError) as err:
        check_shapes("ckpt/t3_cfg.safetensors", t3, ve)
    assert "official" not in str(err.value)


def test_legacy_weight_norm_names_are_renamed(tmp_path):
    """Older HiFT files store weight_g / weight_v; torch's own load hook renames them, and so do we."""
    from safetensors.torch import save_file

    save_file({"mel2wav.conv_pre.weight_g": torch.ones(4, 1, 1), "mel2wav.conv_pre.weight_v": torch.ones(4, 2, 7),
               "mel2wav.conv_pre.bias": torch.zeros(4)}, str(tmp_path / "s3gen.safetensors"))
    f = TensorFile(tmp_path / "s3gen.safetensors", "s3gen.safetensors")
    assert sorted(f.keys()) == ["mel2wav.conv_pre.bias", "mel2wav.conv_pre.parametrizations.weight.original0",
                                "mel2wav.conv_pre.parametrizations.weight.original1"]
    assert "legacy weight_norm" in f.layout
