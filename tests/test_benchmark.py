"""`--benchmark` of both methods: one JSON key set, consistent numbers, and every timed pass
(step, floor, inference, inference floor) under the precision asked for."""
import contextlib
import json

import pytest
import torch

import biomedap
import biomedvr
import common
import runner

SHARED = {"step_ms", "floor_ms", "ratio", "eval_images_per_s", "eval_floor_images_per_s", "eval_ratio",
          "peak_memory_mb", "trainable_parameters", "device", "precision"}
EXTRAS = {"biomedap": {"variant", "prompt_length"}, "biomedvr": set()}  # method-specific keys


@pytest.fixture
def bench(backbones, monkeypatch):
    """bench(module, *flags) -> its benchmark's report on the cached tiny backbone on the CPU,
    each pass timed once without warm-up (the numbers' meaning, not their accuracy, is tested)."""
    cached = lambda name, device="cpu": backbones(name)  # noqa: E731
    monkeypatch.setattr(common, "load_backbone", cached)
    once = runner.time_ms
    monkeypatch.setattr(runner, "time_ms", lambda fn, device, warmup, reps: once(fn, device, 0, 1))

    def go(module, *flags):
        argv = ["--benchmark", "--backbone", "tiny", "--device", "cpu", *flags]
        return runner.run(module, runner.parse_args(module, argv))
    return go


def test_both_methods_print_the_same_keys(bench, capsys):
    reports = {"biomedap": bench(biomedap), "biomedvr": bench(biomedvr)}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == list(reports.values())  # the one JSON line each prints is what it returns
    ap, vr = (set(r) - EXTRAS[m] for m, r in reports.items())
    assert ap == vr and SHARED <= ap
    for method, r in reports.items():
        assert r["method"] == method and r["precision"] == "fp32" and r["device"].startswith("cpu: ")
        assert r["ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"], rel=0.01)
        assert r["eval_ratio"] == pytest.approx(r["eval_floor_images_per_s"] / r["eval_images_per_s"], rel=0.01)
        assert r["peak_memory_mb"] > 0 and r["step_ms"] > 0
    assert reports["biomedvr"]["trainable_parameters"] == 2 * 3 * 32 * 32 + 2  # two 32-pixel programs, gate


@pytest.mark.parametrize("module, flags", [(biomedap, ["--variant", "paper"]), (biomedap, ["--variant", "official"]),
                                           (biomedvr, [])], ids=["biomedap-paper", "biomedap-official", "biomedvr"])
def test_every_timed_pass_runs_in_the_asked_precision(bench, backbones, monkeypatch, module, flags):
    # No GPU here: CPU bf16 autocast stands in for CUDA's, and the dtype of every frozen-tower
    # Linear output while a pass is timed shows the precision that pass ran in.
    def cpu_autocast(precision, device):
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    monkeypatch.setattr(common, "autocast", cpu_autocast)  # the method files
    monkeypatch.setattr(runner, "autocast", cpu_autocast)  # benchmark_report
    timing, dtypes, once = [False], [], runner.time_ms

    def timed(fn, device, warmup, reps):
        timing[0] = True
        try:
            return once(fn, device, warmup, reps)
        finally:
            timing[0] = False
    monkeypatch.setattr(runner, "time_ms", timed)
    record = lambda mod, inputs, output: dtypes.append(output.dtype) if timing[0] else None  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in backbones("tiny").model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        report = bench(module, "--precision", "bf16", *flags)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(dtypes) > 4 and set(dtypes) == {torch.bfloat16}
    assert report["precision"] == "bf16"
