"""The fuzzer of issue #22: bad overrides, data files and run dirs must each end in one named line (exit 2),
never a traceback or a hang, and must change nothing they were not asked to write.

Cases come from hypothesis strategies (tests/fuzz/), derandomized: every run draws the same cases. They
run in one worker process (tests/fuzz/worker.py) that calls `losia_cli.cli.main` in-process, each
under a timeout. `make test` runs a fast slice; `make fuzz` (LOSIA_FUZZ_CASES=N) the long run, with
a summary line per category and in total.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import datafiles, rundirs
from fuzz.harness import ANY, INVALID, Tally, Worker, changed, headline, repro_line, tree_state
from fuzz.overrides import issue_cases, override_cases, schema_leaves

REPO = Path(__file__).resolve().parents[1]
RECIPE = "smollm2_135m_math"
# LOSIA_FUZZ_CASES: the long run's total; unset, the fast slice of `make test`.
TOTAL = int(os.environ.get("LOSIA_FUZZ_CASES", "0"))
COUNTS = ({"overrides": TOTAL * 60 // 100, "data": TOTAL * 25 // 100, "rundirs": TOTAL * 15 // 100} if TOTAL
          else {"overrides": 100, "data": 30, "rundirs": 2})  # + the cases issue #22 reported, every time
TIMEOUT_S = 60  # one case, in the worker; a fixed build of a tiny file takes a second or two
SPECIAL_TIMEOUT_S = 20  # a path that is not a regular file must be refused at once, never read


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def summary():
    """The categories' tallies; at the end, one line over all of them (shown with -s: `make fuzz`)."""
    tallies: list[Tally] = []
    yield tallies
    if tallies:
        counts = {kind: sum(t.counts()[kind] for t in tallies) for kind in Tally.KINDS}
        print("\n" + headline("fuzz, all categories", sum(t.cases for t in tallies), counts))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, smollm2_dir):
    """A scratch root and the worker, with a data cache of its own (sharing the converted SmolLM2)."""
    root = tmp_path_factory.mktemp("fuzz")
    cache = root / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(smollm2_dir.parent)
    env = {**os.environ, "LOSIA_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LOSIA_FUZZ_UNSET", None)  # the interpolation ${oc.env:LOSIA_FUZZ_UNSET} must dangle
    worker = Worker(env)
    yield root, worker
    worker.stop()


def _scratch(root: Path, name: str) -> Path:
    path = root / name
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _finish(tally: Tally, summary: list) -> None:
    summary.append(tally)
    print("\n" + tally.report(examples=5))  # shown with -s (`make fuzz`), as each category ends
    counts = tally.counts()
    assert not any(counts.values()), tally.report(examples=3)


# --- (a) overrides -----------------------------------------------------------------------------------
def test_fuzz_overrides(sandbox, summary):
    root, worker = sandbox
    tally = Tally("overrides")

    def one(case):
        work = _scratch(root, "work")
        argv = ["recipes", "validate", RECIPE, *case.words]
        outcome = worker.run(argv, work, TIMEOUT_S)
        tally.check(outcome, case.expect, list(case.names), repro_line(argv),
                    outside=[p for p in tree_state(work) if p != "."], about=case.names[0])

    for case in issue_cases():
        one(case)
    fuzz_settings(COUNTS["overrides"])(given(override_cases(schema_leaves()))(one))()
    _finish(tally, summary)


# --- (b) data files ----------------------------------------------------------------------------------
def test_fuzz_data_files(sandbox, summary):
    root, worker = sandbox
    tally = Tally("data files")

    @fuzz_settings(COUNTS["data"])
    @given(datafiles.data_cases(), st.sampled_from(["data.source", "data.val_source"]))
    def one(case, key):
        folder, work = _scratch(root, "data"), _scratch(root, "work")
        path = datafiles.write(case, folder)
        argv = ["recipes", "validate", RECIPE, f"data={datafiles.group(case.task)}", f"{key}={path}"]
        before = tree_state(folder)
        outcome = worker.run(argv, work, TIMEOUT_S)
        tally.check(outcome, case.expect, [str(path), path.name], f"{case.what}: {repro_line(argv)}",
                    changed_input=changed(before, tree_state(folder)),
                    outside=[p for p in tree_state(work) if p != "."], about=case.what.split(", row ")[0])

    one()
    _finish(tally, summary)


def test_fuzz_special_files(sandbox, summary):
    """A FIFO, /dev/zero, a folder, a dangling link ... as a data source: refused at once, never read."""
    root, worker = sandbox
    tally = Tally("special files")
    for key in ("data.source", "data.val_source") if TOTAL else ("data.source",):
        for name, make in datafiles.SPECIAL.items():
            folder, work = _scratch(root, "data"), _scratch(root, "work")
            path = make(folder)
            argv = ["recipes", "validate", RECIPE, f"{key}={path}"]
            outcome = worker.run(argv, work, SPECIAL_TIMEOUT_S)
            tally.check(outcome, INVALID, [str(path)], f"{name}: {repro_line(argv)}",
                        outside=[p for p in tree_state(work) if p != "."])
    _finish(tally, summary)


# --- (c) run dirs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    """One finished run, built once: full fine-tuning of the tiny Llama, a checkpoint at each step."""
    from losia_cli.compose import load_config
    from losia_cli.workflow import train

    overrides = [f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "train.micro_batch_size=4",
                 "train.max_steps=2", "train.warmup_ratio=0", "method=full", "train.save_every=1"]
    out = tmp_path_factory.mktemp("fuzz-run")
    run = train(load_config([*overrides, f"run.output_dir={out}", "run.name=run"], quiet=True))
    return run, overrides


def test_fuzz_run_dirs(sandbox, summary, finished_run):
    root, worker = sandbox
    pristine, overrides = finished_run
    pristine_state = tree_state(pristine)
    tally = Tally("run dirs")
    names = list(rundirs.commands(pristine, root, overrides))

    def one(command, damage, out_choice):
        case = _scratch(root, "case")
        run = rundirs.copy_run(pristine, case / "run", writable=command == "resume")
        if command == "resume":
            (run / "report.json").unlink()  # resumable: the run was stopped before its end
        rundirs.apply(run, *damage)
        out, work = case / "out", case / "work"  # work: the working dir, empty
        out.mkdir()
        work.mkdir()
        argv, stdin = rundirs.commands(run, out, overrides)[command]
        outs = rundirs.OUTS.get(command, [])
        allowed = {"out", "run"}  # writes into the run are counted as changed input, not twice
        if out_choice is not None and outs:  # --out aimed back at the input or the working dir, forced
            argv = [*argv[:-1], outs[out_choice % len(outs)].format(run=run)] + (["--force"] if command != "report" else [])
            allowed.add("work")
        before, before_case = tree_state(run), tree_state(case)
        outcome = worker.run(argv, work, TIMEOUT_S * 2, stdin)
        after_case = tree_state(case)
        writes_run = command == "resume" and outcome.code == 0  # the run dir is what resume writes
        repro = f"{damage[1]} {damage[0]}: {repro_line(argv)}"
        tally.check(outcome, ANY, [str(run), Path(damage[0]).name, str(out), "--out"], repro,
                    changed_input=[] if writes_run else changed(before, tree_state(run)),
                    outside=[p for p in changed(before_case, after_case) if p.split("/")[0] not in allowed | {"."}])
        if writes_run and "resumed at step" not in outcome.out and "warning" not in outcome.out + outcome.err:
            tally.fail("silent acceptance", "run.resume=auto started over without a word", repro)
        shutil.rmtree(case)

    for case in rundirs.ISSUE_CASES:
        one(*case)
    fuzz_settings(COUNTS["rundirs"])(given(st.sampled_from(names), rundirs.damage(pristine),
                                           st.sampled_from([None, *range(4)]))(one))()
    assert not changed(pristine_state, tree_state(pristine)), "a command wrote into the shared pristine run"
    _finish(tally, summary)
