"""`fastmnist bench --quick` produces its three result files, and the harness times on the threads it stamps
(the timings themselves are not tested), and the stamp names the CPU precisely."""

import json

import pytest
import torch
from PIL import Image

from fastmnist import cli
from fastmnist.bench.harness import Case, cpu_model, run_case, stamp, summarize_rounds
from helpers import num_threads


def test_bench_quick_writes_json_table_and_chart(tmp_path):
    assert cli.main(["bench", "--quick", "--models", "softmax", "--no-ops", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "epochs_quick.json").read_text())
    assert {"machine", "torch", "commit", "date"} <= set(document["stamp"])
    (row,) = document["rows"]
    assert row["case"].startswith("softmax b=256")
    assert set(row["timings"]) == {"eager", "fused modules", "fused step"}
    for timing in row["timings"].values():
        assert timing["min_us"] <= timing["median_us"] <= timing["max_us"] and timing["median_us"] > 0
    assert "| softmax b=256, 1000 images |" in (tmp_path / "epochs_quick.md").read_text()
    with Image.open(tmp_path / "epochs_quick.png") as image:
        assert image.format == "PNG" and image.width > 100


def test_ratios_of_the_medians_and_by_round():
    # the machine halves its speed in the third round, between the baseline's turn and the candidate's: the
    # candidate is twice as fast within every round but that one, and the ratio of the medians reads 1.0x
    per_round = {"eager": [1.0, 1.0, 1.0, 2.0, 2.0], "fused": [0.5, 0.5, 1.0, 1.0, 1.0]}
    timings = summarize_rounds(per_round, "eager")
    assert timings["fused"]["ratio_vs_baseline"] == pytest.approx(1.0)
    assert timings["fused"]["ratio_by_round"] == pytest.approx(2.0)
    assert timings["fused"]["ratio_by_round_min"] == pytest.approx(1.0)
    assert timings["fused"]["ratio_by_round_max"] == pytest.approx(2.0)
    assert timings["fused"]["median_us"] == pytest.approx(1e6)
    assert (timings["fused"]["min_us"], timings["fused"]["max_us"]) == pytest.approx((0.5e6, 1e6))
    assert timings["eager"]["ratio_by_round"] == timings["eager"]["ratio_vs_baseline"] == 1.0


@pytest.mark.parametrize("threads", [1, 2])
def test_timings_run_on_the_stamped_thread_count(threads):
    seen = []

    def record():
        seen.append(torch.get_num_threads())

    with num_threads(threads):
        run_case(Case("threads", ("baseline", record), [("candidate", record)], {}), rounds=2, min_run_time=0.001)
        stamped = stamp()["threads"]
    assert stamped == threads
    assert seen and set(seen) == {threads}


def test_cpu_model_names_family_model_and_vectors(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
                    "cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_model(str(info)) == "AMD EPYC (family 25, model 1, avx2)"
    info.write_text("model name\t: Some CPU\nflags\t\t: sse2 avx512f avx2\n")
    assert cpu_model(str(info)) == "Some CPU (avx512f)"
