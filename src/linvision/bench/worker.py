"""One bench case, in this process or in a fresh subprocess killed at its deadline
(``python -c "from linvision.bench.worker import worker_main; worker_main()" CASE.json RESULT.json``), with the
batch halved on out-of-memory or too slow. A case is a JSON-able dict built by :mod:`linvision.bench.suites`."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

from ..errors import LinvisionError
from .measure import (CaseTimeout, MemoryMeter, TooSlow, count_flops, is_oom, profile_step, runtime_warmup,
                      step_flops, time_limit, time_steps)
from .specs import OPS, RUNNERS, CaseSkip, create_model, create_seg_model, parse_spec

__all__ = ["run_model_case", "run_op_case", "worker_main", "execute_case", "run_with_backoff"]

_WORKER_CODE = "from linvision.bench.worker import worker_main; worker_main()"  # one case per process


def _setup_worker(case: Dict[str, Any]) -> torch.device:
    torch.set_num_threads(case["threads"])
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    device = torch.device(case["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LinvisionError("--device cuda: no CUDA device available")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _deadline(case: Dict[str, Any]) -> float:
    """The case's wall-clock deadline (``time.time()`` scale, set by the parent) on the ``perf_counter`` scale,
    less a second for writing the result."""
    return time.perf_counter() + (case["deadline_wall"] - time.time()) - 1.0


def run_model_case(case: Dict[str, Any], fresh_process: bool = False,
                   save_partial: Callable[[Dict[str, Any]], None] = lambda r: None) -> Dict[str, Any]:
    """Run one model case (``case``: model, resolution, batch_size, mode, dtype, device, threads, compile,
    channels_last, warmup, iters, min_time, deadline_wall, flops; a segmentation case adds task="seg", size [H, W],
    num_classes, decoder, decoder_channels). Returns a result dict with ``status`` ``ok`` or
    ``oom`` / ``too_slow`` / ``skipped`` / ``failed`` and a ``reason``; never raises for a case problem.
    ``save_partial(result)`` is called once the timing is done (a worker killed later keeps it)."""
    device = _setup_worker(case)
    spec, runner = parse_spec(case["model"]), None
    bs, train = case["batch_size"], case["mode"] == "train"
    deadline = _deadline(case)
    out: Dict[str, Any] = {}
    try:
        runner = RUNNERS[spec.runner]
        if train and not runner.supports_train:
            raise CaseSkip(f"runner {runner.name!r} does not support train mode")
        runtime_warmup(device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        meter = MemoryMeter(device, fresh_process)
        meter.start()
        mf = torch.channels_last if case.get("channels_last") else torch.contiguous_format
        model, x, y = _model_and_batch(case, spec, runner, device, mf)
        model.train(train)
        out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        out["weights_mib"] = (sum(p.numel() * p.element_size() for p in model.parameters())
                              + sum(b.numel() * b.element_size() for b in model.buffers())) / 2 ** 20
        fn = torch.compile(model) if case.get("compile") else model
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

        if train:
            def step():
                model.zero_grad(set_to_none=True)
                with amp:
                    o = runner.forward(fn, x)
                F.cross_entropy(o.float(), y).backward()
        else:
            def step():
                with torch.inference_mode(), amp:
                    runner.forward(fn, x)

        warmup = max(case["warmup"], 3) if case.get("compile") else case["warmup"]
        t = time_steps(step, sync, warmup=warmup, iters=case.get("iters"), min_time=case["min_time"],
                        deadline=deadline)
        out.update(meter.stop())
        med = statistics.median(t["times"])
        out.update(status="ok", reason="", img_per_s=bs / med, ms_per_step=1e3 * med,
                   ms_min=1e3 * min(t["times"]), ms_max=1e3 * max(t["times"]), iters=t["iters"],
                   warmup=len(t["warmup_times"]), memory_method=meter.method)
        if t["iters_cut"]:
            out["reason"] = f"{t['iters']} timed steps (cut by the case budget)"
        save_partial(out)
        if case.get("profile"):  # one more step under torch.profiler, within the budget
            try:
                with time_limit(deadline - time.perf_counter()):
                    out["profile_top"] = profile_step(step, sync, device)
            except CaseTimeout:
                out["reason"] = "; ".join(filter(None, [out["reason"], "not profiled (case budget)"]))
        if case.get("flops", True):  # one more step (eager), counted; after timing and memory, within the budget
            try:
                with time_limit(deadline - time.perf_counter()):
                    fwd, stp = step_flops(model, runner, x, train, amp)
                out.update(gmacs=fwd / bs / 2e9, gflop_per_img_step=(stp if train else fwd) / bs / 1e9)
                out["gflops"] = out["gflop_per_img_step"] * out["img_per_s"]
            except CaseTimeout:
                out["reason"] = "; ".join(filter(None, [out["reason"], "FLOPs not counted (case budget)"]))
            except Exception as e:  # noqa: BLE001  (the timing stands without FLOPs)
                out["reason"] = "; ".join(filter(None, [out["reason"], f"FLOPs not counted: {_one_line(e)}"]))
    except CaseSkip as e:
        out.update(status="skipped", reason=str(e))
    except TooSlow as e:
        out.update(status="too_slow", reason=f"too slow at batch {bs}: {e}")
    except LinvisionError:
        raise
    except Exception as e:  # noqa: BLE001  (a case failure must not stop the run)
        if is_oom(e):
            out.update(status="oom", reason=f"out of memory at batch {bs}: {_one_line(e)}")
        else:
            out.update(status="failed", reason=_one_line(e))
    return out


def _model_and_batch(case: Dict[str, Any], spec, runner, device: torch.device, mf: torch.memory_format):
    """``(model, x, y)`` of a model case: a classifier at ``case["resolution"]`` (``x`` from the runner or
    ``[B, 3, R, R]``, ``y`` class labels ``[B]``), or for ``case["task"] == "seg"`` a segmentation model
    (:func:`~linvision.bench.specs.create_seg_model`) on ``x`` ``[B, 3, H, W]`` (``case["size"]``), ``y`` pixel labels
    ``[B, H, W]``."""
    bs = case["batch_size"]
    if case.get("task") == "seg":
        if runner.make_input is not None:
            raise CaseSkip(f"runner {runner.name!r} makes classifier inputs, not [B, 3, H, W] images")
        k = case["num_classes"]
        H, W = case["size"]
        model = create_seg_model(spec, k, case["decoder"], case["decoder_channels"], device)
        x = torch.randn(bs, 3, H, W, device=device)
        y = torch.randint(0, k, (bs, H, W), device=device)
    else:
        res = case["resolution"]
        model = create_model(spec, res, device)
        x = (runner.make_input(bs, res, device) if runner.make_input is not None
             else torch.randn(bs, 3, res, res, device=device))
        y = torch.randint(0, 1000, (bs,), device=device)
    if isinstance(x, torch.Tensor):
        x = x.contiguous(memory_format=mf)
    return model.to(memory_format=mf), x, y


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def worker_main() -> None:
    """Subprocess entry (:data:`_WORKER_CODE`): ``python -c CODE CASE.json RESULT.json`` runs the case in
    ``CASE.json`` and writes its result (and ``RESULT.json.partial`` as parts finish)."""
    case = json.loads(Path(sys.argv[1]).read_text())
    out, partial = Path(sys.argv[2]), Path(sys.argv[2] + ".partial")

    def save_partial(result: Dict[str, Any]) -> None:
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, partial)

    try:
        fn = run_op_case if case["kind"] == "op" else run_model_case
        result = fn(case, fresh_process=True, save_partial=save_partial)
    except Exception as e:  # noqa: BLE001
        result = {"status": "failed", "reason": _one_line(e)}
    out.write_text(json.dumps(result))


def execute_case(case: Dict[str, Any], isolate: bool) -> Dict[str, Any]:
    """Run a case in a fresh subprocess (killed at its deadline) or in this process."""
    if not isolate:
        fn = run_op_case if case["kind"] == "op" else run_model_case
        return fn(case, fresh_process=False)
    timeout = case["deadline_wall"] - time.time()
    if timeout <= 0:
        return {"status": "too_slow", "reason": "no time left in the case budget"}
    with tempfile.TemporaryDirectory(prefix="linvision-bench-") as tmp:
        inp, outp = Path(tmp) / "case.json", Path(tmp) / "result.json"
        inp.write_text(json.dumps(case))
        cmd = [sys.executable, "-c", _WORKER_CODE, str(inp), str(outp)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = f"killed at the case time budget ({case['budget']:.3g} s)"
            partial = Path(str(outp) + ".partial")
            if partial.exists():  # what finished before the kill (the timing; an op's forward)
                r = json.loads(partial.read_text())
                r["reason"] = "; ".join(filter(None, [r.get("reason"), f"then {killed}"]))
                return r
            return {"status": "too_slow", "reason": killed}
        if outp.exists():
            return json.loads(outp.read_text())
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        if proc.returncode < 0:
            return {"status": "oom", "reason": f"worker killed by signal {-proc.returncode} (out of memory?)"}
        return {"status": "failed", "reason": f"worker exited with status {proc.returncode}: "
                                              f"{err[-1] if err else 'no output'}"}


def run_with_backoff(case: Dict[str, Any], isolate: bool) -> Dict[str, Any]:
    """Run ``case``; on ``oom`` / ``too_slow`` halve the batch size and retry (same budget), down to 1."""
    attempts = []
    while True:
        r = execute_case(case, isolate)
        if r["status"] in ("oom", "too_slow") and case["batch_size"] > 1:
            attempts.append(f"batch {case['batch_size']}: {r['reason']}")
            case = dict(case, batch_size=case["batch_size"] // 2)
            continue
        break
    r["batch_size"] = case["batch_size"]
    r["attempts"] = attempts
    if r["status"] in ("oom", "too_slow"):
        r["skip_kind"], r["status"] = r["status"], "skipped"
    return r


def _op_step(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One forward (``no_grad``) or forward + backward (a fixed random output gradient) of an op."""
    if not backward:
        def step():
            with torch.no_grad():
                fn()
        return step
    g = torch.randn_like(fn().detach())

    def step():
        for p in leaves:
            p.grad = None
        fn().backward(g)
    return step


def run_op_case(case: Dict[str, Any], fresh_process: bool = False,
                save_partial: Callable[[Dict[str, Any]], None] = lambda r: None) -> Dict[str, Any]:
    """One op at one T: forward (under ``no_grad``) and forward + backward, each timed and memory-metered; a
    direction over the memory estimate limit or the time budget is skipped with its reason."""
    device = _setup_worker(case)
    op = OPS[case["op"]]
    B, T, C, H = case["batch_size"], case["tokens"], case["channels"], case["heads"]
    deadline = _deadline(case)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out: Dict[str, Any] = {"status": "ok", "reason": ""}
    reasons = []
    runtime_warmup(device)
    meter = MemoryMeter(device, fresh_process)
    for direction, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        bwd = key == "fwdbwd"
        est = op.mem_mib(B, T, C, H, bwd) if op.mem_mib else None
        out[f"est_{key}_mib"] = est
        limit = case.get("max_memory_mib")
        if est is not None and limit is not None and est > limit:
            reasons.append(f"{direction} skipped: needs ~{est:.0f} MiB (estimate), over --max-memory-mib {limit:.0f}")
            continue
        try:
            meter.start(collect=False)
            fn, leaves = op.make(B, T, C, H, device, torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32)
            step = _op_step(fn, leaves, bwd)
            t = time_steps(step, sync, warmup=case["warmup"], iters=case.get("iters"), min_time=case["min_time"],
                            deadline=deadline)
            mem = meter.stop()
            out[f"{key}_ms"] = 1e3 * statistics.median(t["times"])
            out[f"{key}_iters"] = t["iters"]
            out[f"{key}_peak_mib"] = mem["peak_mib"]
            save_partial(dict(out, memory_method=meter.method, reason="; ".join(reasons)))
            if not bwd and case.get("flops", True):
                try:
                    with time_limit(deadline - time.perf_counter()), torch.no_grad():
                        out["gflop_fwd"] = count_flops(fn) / 1e9
                except CaseTimeout:
                    reasons.append("FLOPs not counted (case budget)")
            del fn, leaves, step
        except TooSlow as e:
            reasons.append(f"{direction} too slow: {e}")
        except Exception as e:  # noqa: BLE001
            reasons.append(f"{direction} {'out of memory' if is_oom(e) else 'failed'}: {_one_line(e)}")
    out["memory_method"] = meter.method
    out["reason"] = "; ".join(reasons)
    if out.get("fwd_ms") is None and out.get("fwdbwd_ms") is None:
        out["status"] = "skipped"
    return out
