"""The benchmark script's variant parsing, CPU accounting and report table (no timing runs: it is a script)."""
from __future__ import annotations

import argparse
import os

import pytest

from actors.errors import ConfigError
from jobs import benchmark as bench
from jobs.config import PoolSpec, load_pipeline


def test_a_variant_sets_keys_of_a_stage_block_and_is_validated():
    pipeline = load_pipeline("vits")
    variant = bench.parse_variant("t1:vits.backend.threads=1,vits.options.sentence_silence_s=0.5,"
                                  "vits.pool.batch_size=4")
    assert variant == bench.Variant("t1", {"vits.backend.threads": 1, "vits.options.sentence_silence_s": 0.5,
                                           "vits.pool.batch_size": 4})
    spec = bench.in_process_spec(pipeline, variant, cores=3)
    assert (spec.stages[0].backend.threads, spec.stages[0].options["sentence_silence_s"],
            spec.stages[0].pool.batch_size) == (1, 0.5, 4)
    config = bench.in_process_spec(pipeline, bench.Variant("config"), cores=3)
    assert config.stages[0].backend.threads == 3  # every core, as the config's own threads are per actor
    for text, message in [("x:vitz.backend.threads=1", "no stage 'vitz'"),
                          ("x:vits.backend.thread=2", "stages.0.backend.thread: unknown key"),
                          ("x:vits.options.max_chars=0", "stages.0.options.max_chars"),
                          ("x:vits.backend.engine=openvino,vits.backend.device=cuda", "cpu only")]:
        with pytest.raises(ConfigError, match=message):
            bench.in_process_spec(pipeline, bench.parse_variant(text), cores=2)
    for text in ("t1", "t1:vits=1", "t1:vits.backend.threads", "t1:vits..threads=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(text)


def test_cpu_time_is_read_from_proc_and_set_against_the_pool_share():
    assert bench.cpu_seconds(os.getpid()) > 0
    usage = bench.ActorUsage()
    usage.cpu = {"b": {11: 3.0, 12: 1.0}, "a": {10: 2.0}}
    got = usage.usage(4.0, {"a": PoolSpec(num_cpus=0.5), "b": PoolSpec(num_cpus=1.0), "c": PoolSpec()})
    assert list(got) == ["a", "b"]  # pipeline order; a stage whose actors were never seen is left out
    assert got["b"] == {"cpu_s": 4.0, "actors": 2, "share": 2.0, "utilization": 0.5,
                        "node_fraction": round(4.0 / (4.0 * (os.cpu_count() or 1)), 3)}
    assert got["a"]["utilization"] == 1.0


def test_the_table_has_a_row_per_way_and_ratios_against_reference_and_config():
    entry = {"wall_s": 10.0, "stage_s": {"vits": 9.0}, "busy": {"vits": 0.9}, "peak_rss_mb": 500.0}
    report = {"reference": {"tool": "piper-tts", "audio_s_per_s": 10.0, "reused_from": "bench/vits.json"},
              "in_process": {"config": entry | {"audio_s_per_s": 20.0}, "t1": entry | {"audio_s_per_s": 15.0}},
              "ray_job": {"audio_s_per_s": 25.0, "stage_s": {"vits": 8.0}, "peak_rss_mb": {"vits": 600.0},
                          "usage": {"vits": {"utilization": 0.8, "node_fraction": 0.6}}}}
    assert bench.ratios(report) == {"ray_job_vs_in_process": 1.25, "ray_job_vs_reference": 2.5,
                              "in_process_vs_reference": {"config": 2.0, "t1": 1.5},
                              "in_process_vs_config": {"t1": 0.75}}
    lines = bench.markdown_table(report).splitlines()
    assert len(lines) == 2 + 4
    assert "reused from bench/vits.json" in lines[2]
    assert lines[4].startswith("| in-process `t1` | 15.0 | 1.50 | 0.75 | vits 9.0 | busy: vits 0.90 | 500 |")
    assert lines[5] == "| Ray job | 25.0 | 2.50 | 1.25 | vits 8.0 | vits 0.80 (node 0.60) | vits 600 |"
    del report["ray_job"], report["reference"]
    assert len(bench.markdown_table(report).splitlines()) == 2 + 2
