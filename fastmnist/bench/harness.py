"""One benchmark harness for every fastmnist benchmark.

Candidates of one case (the eager baseline first) are timed with torch.utils.benchmark, interleaved round by
round in one process, so that drifting machine load hits them alike; each round gives a median, and the case
reports the median over rounds with the spread (min and max of the round medians). Ratios are baseline time
over candidate time (> 1 means faster than the baseline): the ratio of the two medians, and, less moved by a
machine whose speed drifts between rounds, the median of the ratios taken within each round ("by round").
Results are written as JSON stamped with the machine, torch version and git commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.utils.benchmark as tbench

# results go to the source checkout's benchmarks/results when run from one, else to ./benchmarks/results
_CHECKOUT = Path(__file__).resolve().parents[2]
RESULTS_DIR = (_CHECKOUT if (_CHECKOUT / "benchmarks").is_dir() else Path.cwd()) / "benchmarks" / "results"


@dataclasses.dataclass
class Case:
    """One benchmark case: a name, the baseline and the candidates, each a zero-argument callable."""

    name: str
    baseline: tuple[str, Callable[[], object]]
    candidates: list[tuple[str, Callable[[], object]]]
    info: dict = dataclasses.field(default_factory=dict)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, with its family and model numbers and widest vector extension where /proc/cpuinfo has
    them: virtual machines often name every AMD EPYC generation alike, and the ratios differ between them."""
    try:
        fields = {}
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = fields["model name"]
        flags = set(fields.get("flags", "").split())
        vectors = next((isa for isa in ("avx512f", "avx2") if isa in flags), "no avx2")
        if "cpu family" in fields and "model" in fields:
            return f"{name} (family {fields['cpu family']}, model {fields['model']}, {vectors})"
        return f"{name} ({vectors})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(device: str = "cpu") -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if not device.startswith("cuda"):
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def time_compile(fn: Callable[[], object]) -> float:
    """Seconds for the first call of a torch.compile'd callable (compilation included)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case: Case, rounds: int = 5, min_run_time: float = 0.1, device: str = "cpu") -> dict:
    """Times the case's callables interleaved, `rounds` times each; returns its result row."""
    entries = [case.baseline, *case.candidates]
    for _, fn in entries:  # warm up: first-call allocations, lazy initialisation
        fn()
    per_round: dict[str, list[float]] = {label: [] for label, _ in entries}
    for _ in range(rounds):
        for label, fn in entries:
            # Timer runs the statement on num_threads threads (its default is 1): time on the threads stamped
            timer = tbench.Timer(stmt="fn()", globals={"fn": _synchronized(fn, device)},
                                 num_threads=torch.get_num_threads())
            per_round[label].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    base_label = case.baseline[0]
    return {"case": case.name, "baseline": base_label, "info": case.info,
            "timings": summarize_rounds(per_round, base_label)}


def summarize_rounds(per_round: dict[str, list[float]], base_label: str) -> dict[str, dict]:
    """Per label, from its time in each round (seconds): the median and spread in us, the ratio of the baseline's
    median to its median, and the median of the per-round ratios (the baseline's time over its time in the same
    round), with their range."""
    base_rounds = per_round[base_label]
    base = statistics.median(base_rounds)
    timings = {}
    for label, samples in per_round.items():
        median = statistics.median(samples)
        by_round = [b / t for b, t in zip(base_rounds, samples)]
        timings[label] = {
            "median_us": median * 1e6,
            "min_us": min(samples) * 1e6,
            "max_us": max(samples) * 1e6,
            "ratio_vs_baseline": base / median,
            "ratio_by_round": statistics.median(by_round),
            "ratio_by_round_min": min(by_round),
            "ratio_by_round_max": max(by_round),
        }
    return timings


def run_cases(cases: list[Case], rounds: int = 5, min_run_time: float = 0.1, device: str = "cpu",
              verbose: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        row = run_case(case, rounds=rounds, min_run_time=min_run_time, device=device)
        rows.append(row)
        if verbose:
            print(format_row(row), flush=True)
    return rows


def _ratios(timing: dict) -> str:
    return f"{timing['ratio_vs_baseline']:.2f}x; {timing['ratio_by_round']:.2f}x by round"


def format_row(row: dict) -> str:
    parts = [f"{row['case']:<44}"]
    for label, t in row["timings"].items():
        ratio = "" if label == row["baseline"] else f" ({_ratios(t)})"
        parts.append(f"{label} {t['median_us']:9.1f} us{ratio}")
    return " | ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """A table with each candidate's median time and its ratio against the baseline."""
    labels = list(rows[0]["timings"]) if rows else []
    head = "| case | " + " | ".join(f"{label} (us)" for label in labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for row in rows:
        cells = []
        for label in labels:
            t = row["timings"].get(label)
            if t is None:
                cells.append("")
            elif label == row["baseline"]:
                cells.append(f"{t['median_us']:.1f}")
            else:
                cells.append(f"{t['median_us']:.1f} ({_ratios(t)})")
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], out_dir: Path | str = RESULTS_DIR, device: str = "cpu",
                  extra: dict | None = None) -> Path:
    """Writes `<out_dir>/<name>.json` (stamp + rows) and `<name>.md` (the table); returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "stamp": stamp(device), "rows": rows, **(extra or {})}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    s = document["stamp"]
    header = (f"# {name}\n\n{s['machine']}, torch {s['torch']}, {s['threads']} threads, commit {s['commit']}, "
              f"{s['date']}. Median of interleaved rounds; ratio = baseline time / candidate time, of the medians and "
              "(by round) the median of the ratios within each round.\n\n")
    (out_dir / f"{name}.md").write_text(header + markdown_table(rows) + "\n")
    return path


def op_benchmark_main(argv: list[str] | None, name: str, description: str, shapes: list[tuple],
                      make_case: Callable[..., Case], rounds: int) -> None:
    """The command line of a one-op benchmark: times make_case(batch, *shape, backward, with_compile) for batches
    1, 64 and 256, every shape, forward and forward+backward, and writes `<name>.json` and `.md`. --quick: batch
    64 only, 3 rounds, no torch.compile (results `<name>_quick`); --no-compile; --out DIR."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer rounds, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    with_compile = not (args.quick or args.no_compile)
    rows = []
    for batch in [64] if args.quick else [1, 64, 256]:
        for shape in shapes:
            for backward in (False, True):
                case = make_case(batch, *shape, backward, with_compile)
                rows += run_cases([case], rounds=3 if args.quick else rounds, min_run_time=0.05 if args.quick else 0.2)
    path = write_results(f"{name}_quick" if args.quick else name, rows, args.out)
    print(f"results written to {path} and {path.with_suffix('.md')}")
