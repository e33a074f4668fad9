"""Pipeline files: every mistake is found on the driver and named by file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from actors.errors import ConfigError
from jobs.bulk_synth import main
from jobs.config import CONFIG_DIR, load_pipeline, pipeline_names

REPO = Path(__file__).resolve().parents[1]


def pipeline_file(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "vits-two-stage.yaml").read_text())
    edit(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", pipeline_names())
def test_every_shipped_pipeline_loads_and_chains(name):
    spec = load_pipeline(name)
    spec.check_chain(["id", *(k for k, c in spec.input_columns().items() if not c.optional)])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["stages"][1]["pool"].update(max_actorz=2), r"stages\.1\.pool\.max_actorz: unknown key"),
    (lambda d: d["stages"][0]["options"].update(max_charz=9), r"stages\.0\.options\.max_charz: unknown key"),
    (lambda d: d["stages"][1]["pool"].update(batch_size="eight"), r"stages\.1\.pool\.batch_size: Input should be"),
    (lambda d: d["stages"][1]["pool"].update(num_cpus=-1), r"stages\.1\.pool\.num_cpus: Input should be greater"),
    (lambda d: d["stages"][1]["pool"].update(min_actors=3, max_actors=2), r"max_actors 2 < min_actors 3"),
    (lambda d: d["stages"][0]["options"].update(max_chars=0), r"stages\.0\.options\.max_chars: Input should be greater"),
    (lambda d: d["defaults"]["backend"].update(thread=2), r"defaults\.backend\.thread: unknown key"),
    (lambda d: d["stages"][1].update(backend={"precision": "bf16"}), r"bf16 needs engine openvino"),
    (lambda d: d["stages"][0].update({"class": "actors.vits.Nope"}), r"class 'actors.vits.Nope' cannot be imported"),
    (lambda d: d["stages"][0].update({"class": "actors.rows.RowStatus"}), r"is not a voxray Stage class"),
    (lambda d: d.update(formatt="wav"), r"formatt: unknown key"),
    (lambda d: d["stages"][1].update(name="phonemize"), r"stage names must be unique"),
])
def test_mistakes_name_the_file_and_key(tmp_path, edit, message):
    path = pipeline_file(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline(path)
    assert str(path) in str(e.value)


def test_the_chain_of_columns_is_checked(tmp_path):
    swapped = load_pipeline(pipeline_file(tmp_path, lambda d: d["stages"].reverse()))
    with pytest.raises(ConfigError, match=r"stage 'vits' needs columns \['phoneme_ids', 'scales', "
                                          r"'sentence_lengths', 'sid'\]"):
        swapped.check_chain(["id", "text"])
    with pytest.raises(ConfigError, match=r"stage 'phonemize' needs columns \['text'\]"):
        load_pipeline("vits-two-stage").check_chain(["id", "words"])
    wrong = load_pipeline(pipeline_file(tmp_path, lambda d: d.update(family="chatterbox")))
    with pytest.raises(ConfigError, match=r"runs on 'vits' bundles, the pipeline's family is 'chatterbox'"):
        wrong.check_chain(["id", "text"])


def test_a_yaml_typo_fails_the_job_on_the_driver_with_one_line(tmp_path, capsys):
    path = pipeline_file(tmp_path, lambda d: d["stages"][1]["pool"].update(max_actorz=2))
    assert main(["--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_actorz: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
