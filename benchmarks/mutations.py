"""Do the tests catch the bugs issue 18 listed? Apply each mutation to a copy of the repo, run the tests
that should guard it, print (mutation, tests, caught?).

    python benchmarks/mutations.py              # the working tree
    python benchmarks/mutations.py --rev main   # a committed revision (e.g. the tests before a change)

A mutation whose code is absent from the tree prints "n/a"; test files absent from it are left out.
One pytest per mutation, -x, OMP_NUM_THREADS=1: about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = "losia_cli/methods/losia/method.py"
LOSIA_TESTS = ["tests/test_losia_reference.py", "tests/test_losia_method.py", "tests/test_losia_equivalence.py"]

# (name, file, [(code, mutated code), ...], guarding test files)
MUTATIONS = [
    ("_reset_moments returns at once", METHOD,
     [("        for param in params:\n", "        return\n        for param in params:\n")], LOSIA_TESTS),
    ("_reset_moments resets the next slot's group", METHOD,
     [('optimizer.param_groups[slot]["params"]', 'optimizer.param_groups[(slot + 1) % len(self.slots)]["params"]')],
     LOSIA_TESTS),
    ("compat_keep_step_counter zeroes the step", METHOD,
     [('if key != "step" and torch.is_tensor(value):', "if torch.is_tensor(value):")],
     LOSIA_TESTS + ["tests/test_losia_resume.py"]),
    ("rewarm ramp on the dense-extras group", METHOD,
     [("factors.append(self.ctx.schedule.factor(step))", "factors.append(self.rewarm.factor(step, self.restarts[-1]))")],
     LOSIA_TESTS + ["tests/test_losia_schedule.py"]),
    ("tied lm_head loses the embedding path", "losia_cli/methods/losia/tied.py",
     [("        training = torch.is_grad_enabled()", "        return None\n        training = torch.is_grad_enabled()")],
     LOSIA_TESTS),
    ("compat_eps is torch's eps placement", METHOD,
     [('group["eps"] = 1e-6 / math.sqrt', 'group["eps"] = 1e-6 + 0 * math.sqrt')], LOSIA_TESTS),
    ("GSM8K exact_match always 0", "losia_cli/eval/runner.py",
     [('ok = answers_match(answer, item["reference"])', "ok = False")],
     ["tests/test_eval_extract.py", "tests/test_eval_model.py", "tests/test_eval_cli.py"]),
    ("merge without both verification checks", "losia_cli/merge.py",
     [("        if mismatched:", "        if False:"),
      ("            if not torch.equal(reloaded(tokens).logits, logits):", "            if False:")],
     ["tests/test_merge.py"]),
    ("logged loss is inf", "losia_cli/engine/loop.py",
     [("step_loss = float(loss_total) / max(step_targets, 1)", 'step_loss = float("inf")')], ["tests/test_engine.py"]),
    ("ranks_in_sync always true", "losia_cli/engine/fingerprint.py",
     [("    return bool((gathered == gathered[0]).all())", "    return True")], ["tests/test_fingerprint.py"]),
]


def copy_tree(rev: str | None, dest: Path) -> None:
    if rev:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs", "*.egg-info")
        shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_one(rev: str | None, file: str, edits: list[tuple[str, str]], tests: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(rev, tree)
        path = tree / file
        source = path.read_text() if path.is_file() else ""
        for code, mutated in edits:
            if source.count(code) != 1:
                return "n/a (code absent)"
            source = source.replace(code, mutated)
        path.write_text(source)
        present = [t for t in tests if (tree / t).is_file()]
        if not present:
            return "n/a (no test)"
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *present],
            cwd=tree, env=env, capture_output=True, text=True,
        )
        return {0: "NO", 1: "yes"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="git revision to mutate instead of the working tree")
    args = parser.parse_args()
    print(f"| mutation | guarding tests | caught ({args.rev or 'working tree'}) |\n|---|---|---|")
    for name, file, edits, tests in MUTATIONS:
        caught = run_one(args.rev, file, edits, tests)
        print(f"| {name} | {', '.join(Path(t).stem for t in tests)} | {caught} |", flush=True)


if __name__ == "__main__":
    main()
