"""The ViT-ResNAS pipeline from the CLI: ``supernet train`` → ``search`` → ``train --arch``, on a tiny generated
data set: outputs, resume (super-network and search), constraints, latency, one-line errors."""
from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from linvision.cli import main
from linvision.nas import SPACES, analytic_macs
from linvision.nas.search import EvolutionarySearch, LatencyModel, pareto_front, read_history

SN = ["--space", "test", "--batch-size", "4", "--archs-per-step", "2", "--holdout", "4", "--workers", "0",
      "--threads", "1", "--choice-warmup-epochs", "1", "--warmup-epochs", "0.5"]
SEARCH = ["--population", "8", "--iterations", "3", "--top-k", "4", "--mutations", "3", "--crossovers", "3",
          "--workers", "0", "--threads", "1"]
BUDGET = "1.7M"  # the test space spans 1.29 M .. 1.94 M MACs at 56x56 with 2 classes


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("linvision: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def supernet(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("sn") / "sn"
    assert main(["supernet", "train", *SN, "--data", str(tiny_data), "--output", str(out), "--epochs", "2"]) == 0
    return out


def test_supernet_train_outputs_and_resume(supernet, tiny_data, tmp_path, capsys):
    for f in ("model.safetensors", "config.json", "train_state.pt", "metrics.csv", "curves.png"):
        assert (supernet / f).is_file(), f
    config = json.loads((supernet / "config.json").read_text())
    assert config["supernet"] and config["space"]["name"] == "test" and config["holdout"]["n"] == 4
    assert config["img_size"] == 56 and config["class_names"] == ["blue", "red"] and config["step"] == 6
    with open(supernet / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and 0 <= float(rows[-1]["holdout_top1_largest"]) <= 100
    # stopping after epoch 1 and resuming reproduces the straight run bit for bit
    b = tmp_path / "b"
    assert run(capsys, "supernet", "train", *SN, "--data", tiny_data, "--output", b, "--epochs", "2",
               "--max-steps", "3")[0] == 0
    assert json.loads((b / "config.json").read_text())["epoch"] == 1
    rc, out, _ = run(capsys, "supernet", "train", "--resume", b, "--workers", "0")
    assert rc == 0 and "epoch 2" in out
    x, y = load_file(supernet / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    one_line_error(*run(capsys, "supernet", "train", "--resume", b, "--archs-per-step", "1")[::2],
                   "cannot resume", "--archs-per-step")
    one_line_error(*run(capsys, "supernet", "train", *SN, "--data", tiny_data, "--output", b)[::2],
                   "already holds a run")
    one_line_error(*run(capsys, "supernet", "train", *SN, "--data", tiny_data, "--output", tmp_path / "c",
                        "--img-size", "64")[::2], "multiple of 56")
    one_line_error(*run(capsys, "supernet", "train", *SN, "--data", tiny_data, "--output", tmp_path / "c",
                        "--space", "huge")[::2], "unknown search space")


def test_search_then_retrain(supernet, tiny_data, tmp_path, capsys):
    out = tmp_path / "search"
    rc, stdout, _ = run(capsys, "search", "--supernet", supernet, "--macs", BUDGET, *SEARCH, "--output", out,
                        "--random-archs", "5")
    assert rc == 0 and "best held-out top-1" in stdout
    for f in ("history.csv", "best.json", "search.png", "search.json", "random_archs.json"):
        assert (out / f).is_file(), f
    hist = read_history(out / "history.csv")
    sp = SPACES["test"]
    keys = [sp.encode(h["arch"]) for h in hist]
    assert len(keys) == len(set(keys)), "a sub-network was evaluated twice"
    assert [h["iteration"] for h in hist].count(0) == 8 and max(h["iteration"] for h in hist) == 2
    assert {h["origin"] for h in hist if h["iteration"] > 0} == {"mutation", "crossover"}
    for h in hist:
        assert 0.975 * 1.7e6 <= h["macs"] <= 1.7e6 and h["macs"] == analytic_macs(h["arch"], 56, 2, stem_chans=8)
        assert 0 <= h["top1"] <= 100
    best = json.loads((out / "best.json").read_text())
    assert best["holdout_top1"] == max(h["top1"] for h in hist) and best["constraint"]["upper"] == 1.7e6
    rand = json.loads((out / "random_archs.json").read_text())
    assert len(rand) == 5 and all(0.975 * 1.7e6 <= r["macs"] <= 1.7e6 for r in rand)
    # the winner retrains from the JSON alone (model, img_size, stem from the file)
    rc, stdout, _ = run(capsys, "train", "--arch", out / "best.json", "--data", tiny_data, "--output", tmp_path / "rt",
                        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1", "--max-steps", "2")
    assert rc == 0 and "test top-1" in stdout
    config = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert config["model_args"]["arch"]["dims"] == best["arch"]["dims"] and config["model_args"]["img_size"] == 56
    rc, stdout, _ = run(capsys, "eval", "--checkpoint", tmp_path / "rt", "--data", tiny_data, "--json",
                        "--workers", "0")
    assert rc == 0 and json.loads(stdout)["n"] == 8


def test_search_resume_regenerates_the_interrupted_iteration(supernet, tmp_path, capsys):
    """Kill mid-iteration (history cut after 10 rows, plus a torn line): --resume evaluates only what is
    missing and ends with exactly the history of an uninterrupted search; --iterations may be extended."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "search", "--supernet", supernet, "--macs", BUDGET, *SEARCH, "--output", a)[0] == 0
    assert run(capsys, "search", "--supernet", supernet, "--macs", BUDGET, *SEARCH, "--output", b)[0] == 0
    lines = (b / "history.csv").read_text().splitlines(keepends=True)
    (b / "history.csv").write_text("".join(lines[:11]) + lines[11][:25])
    assert run(capsys, "search", "--resume", b, "--workers", "0")[0] == 0
    ha, hb = read_history(a / "history.csv"), read_history(b / "history.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "loss"} for r in rows]  # noqa: E731
    assert strip(ha) == strip(hb)  # same candidates in the same order (losses may differ in the last float bit:
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=1e-5)  # BLAS and alignment)
    assert run(capsys, "search", "--resume", b, "--iterations", "4", "--workers", "0")[0] == 0
    assert max(h["iteration"] for h in read_history(b / "history.csv")) == 3
    one_line_error(*run(capsys, "search", "--resume", b, "--top-k", "3")[::2], "cannot resume", "--top-k")
    one_line_error(*run(capsys, "search", "--supernet", supernet, "--macs", BUDGET, "--output", b)[::2],
                   "already holds a search")


def test_search_errors(supernet, tmp_path, capsys, tiny_data):
    one_line_error(*run(capsys, "search", "--supernet", supernet, "--macs", "1M", "--output", tmp_path / "x")[::2],
                   "outside what space test can reach")
    one_line_error(*run(capsys, "search", "--supernet", supernet, "--output", tmp_path / "x")[::2],
                   "exactly one constraint")
    one_line_error(*run(capsys, "search", "--supernet", supernet, "--macs", "lots", "--output", tmp_path / "x")[::2],
                   "cannot read a MACs value")
    one_line_error(*run(capsys, "search", "--supernet", tiny_data, "--macs", "1M", "--output", tmp_path / "x")[::2],
                   "config")
    (tmp_path / "bad.json").write_text('{"dims": [1]}')
    one_line_error(*run(capsys, "train", "--arch", tmp_path / "bad.json", "--data", tiny_data)[::2], "bad.json")


def test_latency_constraint(supernet, tmp_path, capsys):
    """Latency table calibrated once on this device, then a search under a latency budget."""
    sp = SPACES["test"]
    lm = LatencyModel(sp, 56, 2, batch=1, repeats=3)
    table = lm.calibrate(progress=False)
    assert len(table) == 3 + 9 + 9 + 9 + 6 + 4 + 6 + 3 * 3 + 3 * 2 + 2 and all(v > 0 for v in table.values())
    # the search itself runs on a deterministic table (timings of a busy machine are noisy): ms ~ size
    for k in table:
        table[k] = math.prod(int(p) for p in k.split("/")[2:] or ["1"]) * 1e-4 + 0.01 * len(k.split("/")[1:2])
    lm.table = table
    f = tmp_path / "latency.json"
    f.write_text(json.dumps({"table": table}))
    lats = sorted(lm(sp.random_arch(random.Random(i))) for i in range(40))
    budget = lats[20]
    out = tmp_path / "lat"
    rc, stdout, err = run(capsys, "search", "--supernet", supernet, "--latency-ms", budget, "--latency-table", f,
                          "--lower", "0.8", *SEARCH, "--output", out)
    assert rc == 0 and " ms" in stdout, err[-2000:]
    hist = read_history(out / "history.csv")
    assert all(0.8 * budget <= h["latency_ms"] <= budget for h in hist)
    assert LatencyModel(sp, 56, 2, mode="measure", repeats=2)(sp.smallest()) > 0


def test_evolution_operators():
    sp = SPACES["test"]
    cost = lambda a: analytic_macs(a, 56, 2, stem_chans=8)  # noqa: E731
    evo = EvolutionarySearch(sp, cost, 1.7e6, population=20, top_k=5, mutate_prob=0.5, seed=3)
    first = evo.propose(0, [])
    assert len(first) == 20 and len({c.key for c in first}) == 20 and all(evo.feasible(c.arch) for c in first)
    assert [c.key for c in evo.propose(0, [])] == [c.key for c in first]          # deterministic
    hist = [{"arch": c.arch, "top1": float(i)} for i, c in enumerate(first)]
    nxt = evo.propose(1, hist)
    old = {c.key for c in first}
    assert nxt and all(c.key not in old for c in nxt) and all(evo.feasible(c.arch) for c in nxt)
    # mutation with probability 0 changes nothing; crossover only mixes the parents' genes
    rng = random.Random(0)
    evo.mutate_prob = 0
    assert evo.mutate(first[0].arch, rng) == first[0].arch
    child = evo.crossover(first[0].arch, first[1].arch, rng)
    for g, v in zip(sp.genes(), sp.encode(child)):
        assert v in (evo._get(first[0].arch, g), evo._get(first[1].arch, g)) or g.kind in ("heads", "mlp")
    assert pareto_front([(1, 50), (2, 40), (2, 60), (3, 60), (0.5, 10)]) == [4, 0, 2]


@pytest.mark.slow
def test_demo_script_smoke(tiny_data, tmp_path):
    """scripts/resnas_demo.sh end to end with tiny settings (the real demo: see the README); slow only because
    it starts six Python processes."""
    import os
    import subprocess
    from pathlib import Path

    import linvision
    script = Path(__file__).resolve().parents[1] / "scripts" / "resnas_demo.sh"
    src = str(Path(linvision.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "DATA": str(tiny_data),
           "OUT": str(tmp_path / "demo"), "SPACE": "test", "SN_EPOCHS": "1", "SN_BATCH": "4", "ARCHS_PER_STEP": "2",
           "HOLDOUT": "4", "MACS": BUDGET, "POPULATION": "4", "ITERATIONS": "2", "TOP_K": "2", "CHILDREN": "2",
           "HOLDOUT_LIMIT": "4", "RANDOM_ARCHS": "1", "RT_EPOCHS": "1", "RT_BATCH": "4", "RETRAIN_RANDOM": "1",
           "EXTRA": "--workers 0 --threads 1", "RT_EXTRA": "--max-steps 1"}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "| searched winner |" in summary and "| random 0 |" in summary and "winner" in summary.splitlines()[-1]
    assert (tmp_path / "demo" / "random_0" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_data, tmp_path):
    """Super-network training (DDP, Gloo) and sharded search evaluation under torchrun with 2 processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import linvision
    src = str(Path(linvision.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547", "-m",
          "linvision"]
    res = subprocess.run(tr + ["supernet", "train", *SN, "--data", str(tiny_data), "--epochs", "1", "--output",
                               str(tmp_path / "sn")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done:") == 1 and "x 2 rank(s)" in res.stderr
    res = subprocess.run(tr + ["search", "--supernet", str(tmp_path / "sn"), "--macs", BUDGET, *SEARCH,
                               "--output", str(tmp_path / "se")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hist = read_history(tmp_path / "se" / "history.csv")
    assert len(hist) == 8 + 2 * 6 and len({SPACES["test"].encode(h["arch"]) for h in hist}) == len(hist)


def test_help_has_examples(capsys):
    for cmd in (["supernet", "train"], ["search"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0 and "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["supernet"])
    assert e.value.code == 2
