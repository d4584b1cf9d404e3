"""Celery's own unit tests, on plain Celery and with ``ResilientTask`` as every app's task class.

``nox -s celery-compat`` runs this; by hand, in an environment with the project installed::

    python tools/celery_compat/run.py [--celery-src DIR] [--tests t/unit/tasks] [-- PYTEST_ARGS]

It fetches the source release of the *installed* Celery (``pip download --no-binary :all:``;
the sdist carries ``t/unit``), unpacks its tests (not its ``celery`` package: the tests must
import the installed one) into a cache folder, and runs ``--tests`` twice with pytest:

1. plain, as Celery's CI does;
2. with ``-p celery_compat.plugin``, which makes ``resilient_tasks:ResilientTask`` every app's
   default task class.

It then compares the outcomes test by test. A test that passes in run 1 and does not pass in
run 2 is a regression, unless its node id is listed in ``expected_differences.txt`` (an
intended difference of the library, with the reason). Any regression fails the run (exit 1).

``--celery-src DIR`` (or ``$CELERY_COMPAT_SRC``) reuses an unpacked source release (the folder
holding ``t/unit``) instead of downloading one; the cache folder is reused too when it already
holds the installed version, so a rerun costs only the two test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parent
EXPECTED = HERE / "expected_differences.txt"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import celery

    version = celery.__version__
    print(f"celery-compat: installed celery {version} at {Path(celery.__file__).parent}")
    cache = Path(args.cache_dir).resolve()
    source = Path(args.celery_src).resolve() if args.celery_src else fetch_source(version, cache)
    check_source(source, version)
    expected = read_expected(args.expected)
    work = cache / "reports"
    work.mkdir(parents=True, exist_ok=True)

    runs = {}
    for name, plugins in (("plain", []), ("resilient", ["-p", "celery_compat.plugin"])):
        report = work / f"{name}.jsonl"
        report.unlink(missing_ok=True)
        started = time.monotonic()
        code = run_pytest(source, args.tests, plugins, report, args.pytest_args)
        elapsed = time.monotonic() - started
        if code not in (0, 1) or not report.exists():  # 2+: interrupted, internal error, usage
            print(f"celery-compat: the {name} run did not complete (pytest exit {code}), see")
            print(f"celery-compat:   {report.with_suffix('.log')}")
            return 2
        results, session = read_report(report)
        runs[name] = results
        print(
            f"celery-compat: {name} run: pytest exit {code} in {elapsed:.0f} s; " + counts(results)
        )
        if session.get("celery_version") != version or not is_installed(session, source):
            print(f"celery-compat: the {name} run imported {session}, not the installed celery")
            return 2
        if name == "resilient":
            injected = session.get("injected", {})
            print(
                f"celery-compat: {injected.get('resilient', 0)} of "
                f"{injected.get('task_classes', 0)} app task classes derived from ResilientTask"
            )
            if not injected.get("resilient"):
                print("celery-compat: ResilientTask was never injected; the comparison is void")
                return 2
    return compare(runs["plain"], runs["resilient"], expected)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--celery-src",
        default=os.environ.get("CELERY_COMPAT_SRC"),
        help="an unpacked Celery source release (default: $CELERY_COMPAT_SRC, else download it)",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("CELERY_COMPAT_CACHE")
        or Path(tempfile.gettempdir()) / "resilient-tasks-celery-compat",
        help="where the source release is unpacked and the reports written",
    )
    parser.add_argument(
        "--tests", default="t/unit/tasks", help="the tests to run, relative to the source release"
    )
    parser.add_argument("--expected", type=Path, default=EXPECTED, help="intended differences")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    return parser.parse_args(argv)


def fetch_source(version: str, cache_dir: str | Path) -> Path:
    """``t/`` (and the metadata) of Celery's sdist ``version``, unpacked once into the cache."""
    target = Path(cache_dir) / f"celery-{version}"
    if (target / "t" / "unit").is_dir() and (target / "PKG-INFO").is_file():
        print(f"celery-compat: reusing {target}")
        return target
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", f"celery=={version}", "-d", download],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("celery-*.tar.gz")
        unpack = Path(cache_dir) / f".unpack-{os.getpid()}"
        with tarfile.open(sdist) as tar:
            top = f"celery-{version}/"
            wanted = [
                m
                for m in tar.getmembers()
                if m.name.startswith(top + "t/")
                or m.name in (top + "PKG-INFO", top + "pyproject.toml")
            ]
            extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(unpack, members=wanted, **extract)
    (unpack / f"celery-{version}").rename(target)
    unpack.rmdir()
    print(f"celery-compat: unpacked the tests of {sdist.name} into {target}")
    return target


def check_source(source: Path, version: str) -> None:
    if not (source / "t" / "unit").is_dir():
        sys.exit(f"celery-compat: {source} holds no t/unit: not a Celery source release")
    pkg_info = source / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(encoding="utf-8").splitlines():
            if line.startswith("Version:") and line.split(":", 1)[1].strip() != version:
                sys.exit(
                    f"celery-compat: {source} is Celery {line.split(':', 1)[1].strip()}, "
                    f"the installed one is {version}"
                )


def run_pytest(source: Path, tests: str, plugins: list[str], report: Path, extra: list[str]) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-P",  # not the source release's own celery/ package, if the folder has one
        "-m",
        "pytest",
        tests,
        "-q",
        "--no-header",
        "-p",
        "no:cacheprovider",
        "-p",
        "celery_compat.record",
        f"--compat-report={report}",
        *plugins,
        *extra,
    ]
    print("celery-compat: $", " ".join(command))
    done = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    (report.with_suffix(".log")).write_text(done.stdout + done.stderr, encoding="utf-8")
    # pytest's last line, e.g. "3 failed, 1292 passed, 1 skipped, ... in 27.27s"
    tail = [line for line in done.stdout.splitlines() if line.strip() and " in " in line][-1:]
    print("celery-compat:   " + (tail[0].strip("= ") if tail else done.stderr.strip()[-500:]))
    return done.returncode


def is_installed(session: dict[str, str], source: Path) -> bool:
    path = session.get("celery_file") or ""
    return bool(path) and not Path(path).resolve().is_relative_to(source.resolve())


def read_report(path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    results, session = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "session" in record:
            session = record["session"]
        else:
            results[record["nodeid"]] = record
    return results, session


def read_expected(path: Path) -> dict[str, str]:
    """``node id  # reason`` per line; blank lines and lines starting with ``#`` are ignored."""
    expected = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        nodeid, _, reason = line.partition("#")
        expected[nodeid.strip()] = reason.strip()
    return expected


def counts(results: dict[str, dict[str, str]]) -> str:
    tally = Counter(r["outcome"] for r in results.values())
    return ", ".join(f"{tally[o]} {o}" for o in OUTCOMES if tally[o] or o in ("passed", "failed"))


def compare(
    plain: dict[str, dict[str, str]],
    resilient: dict[str, dict[str, str]],
    expected: dict[str, str],
) -> int:
    missing = {"outcome": "missing", "message": "not run with ResilientTask"}
    differ = {
        nodeid: resilient.get(nodeid, missing)
        for nodeid, result in plain.items()
        if result["outcome"] in ("passed", "xfailed")
        and resilient.get(nodeid, missing)["outcome"] != result["outcome"]
    }
    seen = {nodeid: differ.pop(nodeid) for nodeid in list(differ) if nodeid in expected}
    gained = sorted(
        nodeid
        for nodeid, result in resilient.items()
        if result["outcome"] == "passed" and plain.get(nodeid, {}).get("outcome") != "passed"
    )

    print()
    print("celery-compat: summary")
    for name, results in (("plain Celery", plain), ("ResilientTask", resilient)):
        tally = Counter(r["outcome"] for r in results.values())
        print(
            f"  {name:14} passed {tally['passed']}, failed {tally['failed'] + tally['error']}"
            f" (errors {tally['error']}), skipped {tally['skipped']}, xfailed {tally['xfailed']}"
        )
    print(f"  expected differences seen: {len(seen)} of {len(expected)} listed")
    for nodeid, result in sorted(seen.items()):
        print(f"    {nodeid}: {result['outcome']}  # {expected[nodeid]}")
    unseen = sorted(set(expected) - set(seen))
    if unseen:
        print(f"  listed but not seen: {len(unseen)}")
        for nodeid in unseen:
            now = resilient.get(nodeid, {}).get("outcome", "not run")
            print(f"    {nodeid}: {plain.get(nodeid, {}).get('outcome', 'not run')} plain, {now}")
    if gained:
        print(f"  pass only with ResilientTask: {len(gained)}")
        for nodeid in gained:
            print(f"    {nodeid} (plain: {plain.get(nodeid, {}).get('outcome', 'missing')})")
    print(f"  regressions: {len(differ)}")
    for nodeid, result in sorted(differ.items()):
        print(f"    {nodeid}: {result['outcome']}: {result['message']}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
