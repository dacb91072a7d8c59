"""bbf_lunar/benchmark.py's seed-batching measurement: per core, and with every core busy."""

import json
import statistics

import pytest
import torch
from conftest import one_line_error, run_script

BENCH = "bbf_lunar/benchmark.py"


@pytest.mark.slow
def test_per_core_and_whole_machine_figures_are_written(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--steps", "20", "--warmup", "60", "--rounds", "2", "--seeds", "2", "--processes", "2"]
    done = run_script(BENCH, *flags, "--out", out, timeout=300)
    result = json.loads(out.read_text())
    per_core, machine = result["vectorised"]["2"], result["whole_machine"]
    assert len(result["rounds"]["1"]) == len(result["rounds"]["2"]) == 2  # every round timed both
    assert per_core["separate_steps_per_s"] > 0 and per_core["one_process_steps_per_s"] > 0
    assert per_core["speedup"] == pytest.approx(
        per_core["one_process_steps_per_s"] / per_core["separate_steps_per_s"]
    )
    assert machine["processes"] == 2 and len(machine["rounds"]["2"]) == 2
    assert machine["2"]["speedup"] == pytest.approx(
        machine["2"]["batched_steps_per_s"] / machine["2"]["separate_steps_per_s"]
    )
    assert "2 processes at once, summed" in done.stdout


@pytest.mark.slow
def test_compile_times_eager_and_compiled_in_turn(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--steps", "10", "--warmup", "60", "--rounds", "2", "--seeds", "2", "--compile"]
    done = run_script(BENCH, *flags, "--out", out, timeout=400)
    result = json.loads(out.read_text())
    assert len(result["rounds"]["2"]) == len(result["rounds_compiled"]["2"]) == 2
    for s in ("1", "2"):
        eager, compiled = (statistics.median(result[key][s]) for key in ("rounds", "rounds_compiled"))
        assert result["compile_speedup"][s] == pytest.approx(compiled / eager)
    per_core = result["vectorised_compiled"]["2"]
    assert per_core["speedup"] == pytest.approx(
        per_core["one_process_steps_per_s"] / per_core["separate_steps_per_s"]
    )
    assert "TD loss torch.compile'd" in done.stdout and "compiled / eager" in done.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--processes", "-1"], "--processes must be >= 0"),
        (["--replay-ratio", "nan"], "--replay-ratio must be a finite number"),
        (["--replay-ratio", "0"], "--replay-ratio must be > 0"),
        (["--seeds", "1"], "each seed count must be >= 2"),
        (["--cuda-graph"], "--cuda-graph needs --device cuda"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, message):
    done = run_script(BENCH, *flags, "--out", tmp_path / "b.json", rc=2, timeout=60)
    assert message in one_line_error(done)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    done = run_script(BENCH, "--device", "cuda", "--out", tmp_path / "b.json", rc=1, timeout=60)
    assert "--device cuda needs a CUDA GPU" in one_line_error(done)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_times_eager_and_graphed_in_turn_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--device", "cuda", "--cuda-graph", "--steps", "20", "--warmup", "60", "--rounds", "2"]
    done = run_script(BENCH, *flags, "--seeds", "2", "--out", out, timeout=300)
    result = json.loads(out.read_text())
    assert len(result["rounds"]["2"]) == len(result["rounds_cuda_graph"]["2"]) == 2
    for s in ("1", "2"):
        eager, graphed = (statistics.median(result[key][s]) for key in ("rounds", "rounds_cuda_graph"))
        assert result["cuda_graph_speedup"][s] == pytest.approx(graphed / eager)
    assert result["device"] != "cpu" and "gradient step as a CUDA graph" in done.stdout
