"""The trainer's device and precision knobs on the CPU, and a real local Hugging Face model
directory given to `sponge train --model` (tiny Llama and GPT-2 written into tmp_path; nothing is
downloaded). The same on a CUDA device: tests/test_gpu.py."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from sponge.trainer import (
    CharTokenizer,
    ReMixConfig,
    ReMixTrainer,
    TinyModelConfig,
    build_tiny_model,
    make_task,
    warm_start,
)
from sponge.trainer.models import export_hf, resolve_device

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def warm_model():
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, seed=0)
    warm_start(model, tok, task, steps=40, seed=0)
    return task, tok, model


def small(**kw):
    base = {"prompts_per_step": 4, "group_size": 4, "eval_size": 16, "progress": False, "rollout_budget": 10_000}
    return ReMixConfig(**{**base, **kw})


def test_device_knob_resolves_and_refuses_what_is_not_there():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        ReMixConfig(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            resolve_device("cuda:0")


def test_explicit_cpu_device_trains_exactly_as_auto_on_a_cpu(warm_model):
    if torch.cuda.is_available():
        pytest.skip("auto is the GPU here")
    task, tok, model = warm_model
    runs = []
    for device in ("auto", "cpu"):
        trainer = ReMixTrainer(copy.deepcopy(model), tok, task, small(device=device, seed=3))
        runs.append([trainer.step() for _ in range(3)])
        assert trainer.device == torch.device("cpu")
    keys = ("loss", "pg_loss", "reward_mean", "ratio_max", "n_replay")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]


def test_bf16_autocast_trains_and_recomputes_fresh_logprobs(warm_model):
    task, tok, model = warm_model
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, small(bf16=True, device="cpu", kl_coef=0.05,
                                                                       dynamic_sampling=False))
    assert trainer.recompute                    # generation and scoring kernels differ in bf16
    records = [trainer.step() for _ in range(3)]
    for r in records:
        assert r["updates"] >= 1 and math.isfinite(r["loss"]) and math.isfinite(r["kl"])
        assert any(k.startswith("fresh_is_") for k in r)    # the correction saw the fresh rows
    # master weights stay float32 under autocast
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert trainer.evaluate()["eval_success"] >= 0.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sponge_train_with_a_local_model_directory(tmp_path, capsys, arch):
    from sponge.cli import main

    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, TinyModelConfig(arch=arch, n_positions=32), seed=0)
    warm_start(model, tok, task, steps=30, seed=0)
    export_hf(model, tok, tmp_path / "model")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "model"), "--out", str(out), "--rollout-budget", "32",
                 "--prompts-per-step", "2", "--group-size", "4", "--eval-size", "16", "--threads", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.rindex("{\n"):])
    assert summary["rollouts"] == 32 and summary["eval_success_end"] is not None
    assert (out / "checkpoint" / "state.pt").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["rollouts"] == 32 and "eval_success" in lines[-1]
    assert any(r.get("n_fresh", 0) > 0 for r in lines)


@pytest.mark.long
@pytest.mark.slow
def test_gpu_check_dry_run_exercises_every_cpu_path(tmp_path):
    """bench/gpu_check.py --cpu-dry-run: every check runs or says why not, and the JSON holds the
    figures the GPU run will report (the real run is for a GPU machine)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--steps", "10",
                           "--min-rise", "-1", "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == {"train", "train_vllm", "logprobs", "logprobs_vllm", "speed", "speed_vllm", "faiss"}
    assert report["ok"] and report["device"] == "cpu (dry run)" and report["failed"] == []
    assert {n for n, c in checks.items() if c["status"] == "pass"} == {"train", "logprobs", "speed"}
    for name in ("train_vllm", "logprobs_vllm", "speed_vllm"):
        assert checks[name]["status"] == "skipped" and "vLLM" in checks[name]["reason"]
    assert checks["faiss"]["status"] == "skipped" and checks["faiss"]["same_neighbours_share"] == 1.0
    assert checks["logprobs"]["generators"]["transformers_float32"]["mean_abs_delta"] < 1e-4
    assert checks["speed"]["training"]["cpu_steps_per_s"] > 0 and checks["train"]["rollouts"] == 10 * 80


def test_trl_example_takes_a_local_model_directory(tmp_path):
    """examples/trl_replay.py --model PATH: the policy and both tokenizers come from the directory
    (the whole example, broker and service included, ran with it by hand: see its docstring)."""
    import importlib.util
    from pathlib import Path

    from sponge.trainer import HFTokenizer

    path = Path(__file__).resolve().parent.parent / "examples" / "trl_replay.py"
    spec = importlib.util.spec_from_file_location("trl_replay_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    task = make_task("reverse")
    chars = CharTokenizer(task.alphabet)
    export_hf(build_tiny_model(chars, TinyModelConfig(arch="llama"), seed=0), chars, tmp_path / "m")
    model, tok, hf = example.load_policy(str(tmp_path / "m"), task)
    assert isinstance(tok, HFTokenizer) and hf is tok.hf
    assert tok.encode_prompt("0123") == chars.encode_prompt("0123") == hf("0123")["input_ids"]
    assert type(model).__name__ == "LlamaForCausalLM"
    _, default_tok, _ = example.load_policy(None, task)
    assert isinstance(default_tok, CharTokenizer)
